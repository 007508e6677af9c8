"""The checks the faces also run mid-run, below them and light (no data or image library).

:func:`check_supported_setup` refuses DeepSpeed, FSDP and Megatron-LM (pre-flight, the callback and the loop
call it); :func:`check_cdb_against_model` refuses include/exclude patterns that leave no layer of the loaded
model, and warns when the settings make CDB do (almost) nothing.
"""

from __future__ import annotations

import os
from typing import Any

from transformers.utils import logging

from .core import ChannelDropBackConfig, eligible_layers
from .errors import _TRUE_STRINGS, UsageError, usage_errors

__all__ = ["check_cdb_against_model", "check_supported_setup"]

logger = logging.get_logger(__name__)


def check_supported_setup(args: Any) -> None:
    """Refuse DeepSpeed, FSDP and Megatron-LM, from flags or from an accelerate launch config (its env).

    DeepSpeed runs the optimizer step inside ``backward()`` (with ``param.grad`` usually ``None`` under
    ZeRO), before any hook or callback could mask it; FSDP through the Trainer or accelerate is not
    tested end to end (the core alone supports FSDP2 shards). Each would make CDB silently do nothing
    or the wrong thing. The one place that refuses them, for the CLI, the callback and the loop alike.
    """
    def env(name: str) -> bool:
        return os.environ.get(name, "").lower() in _TRUE_STRINGS

    if getattr(args, "deepspeed", None) or env("ACCELERATE_USE_DEEPSPEED"):
        raise UsageError("ChannelDropBack does not support DeepSpeed: DeepSpeed runs the optimizer step inside "
                         "backward(), before any callback can mask the gradients; train without --deepspeed "
                         "(plain DDP via torchrun/accelerate launch is supported)")
    if getattr(args, "fsdp", None) or env("ACCELERATE_USE_FSDP"):
        raise UsageError(f"ChannelDropBack does not support FSDP (fsdp={getattr(args, 'fsdp', None)!r}) in the "
                         "Trainer or the accelerate loop: FSDP shards the gradient rows CDB selects; train "
                         "without --fsdp (plain DDP via torchrun/accelerate launch is supported)")
    if env("ACCELERATE_USE_MEGATRON_LM"):
        raise UsageError("ChannelDropBack does not support Megatron-LM; launch plain DDP instead "
                         "(accelerate launch --multi_gpu or torchrun)")


def check_cdb_against_model(model, cdb_config: ChannelDropBackConfig | None) -> None:
    """Raise UsageError now if include/exclude/skip_first leave no layer of this model (None: baseline)."""
    if cdb_config is not None:
        with usage_errors():
            layers = eligible_layers(model, cdb_config)
        _check_cdb_does_something(cdb_config, layers)


def _check_cdb_does_something(config: ChannelDropBackConfig, layers: dict[str, Any]) -> None:
    """Settings under which CDB never drops a channel (or almost never) train like ``--cdb false``: say so once.

    Not refused: a zero rate is a legitimate way to check that CDB changes nothing (``--cdb false`` is the
    plain baseline)."""
    rates = {"constant": [config.layer_rate], "step": [config.layer_rate_init, config.layer_rate / 2, config.layer_rate],
             "linear": [config.layer_rate_init, config.layer_rate],
             "piecewise": list(config.schedule_rates or [config.layer_rate])}[config.schedule]
    sizes = [int(weight.shape[1 if config.axis == "cols" else 0]) for weight in layers.values()]
    expected = max(config.channel_rate * n for n in sizes)  # channels dropped in the widest selected layer
    if max(rates) == 0 or config.step_rate == 0:
        what = "--cdb_step_rate 0" if config.step_rate == 0 else f"--cdb_layer_rate {config.layer_rate:g}"
        reason = f"{what} (schedule {config.schedule!r}) never selects a layer"
    elif config.channel_sampling == "exact" and all(min(round(config.channel_rate * n), n - 1) == 0 for n in sizes):
        reason = (f"--cdb_channel_rate {config.channel_rate:g} with exact sampling drops round(rate x channels) = 0 "
                  f"channels in every layer (at most {max(sizes)} channels)")
    elif config.channel_sampling == "bernoulli" and expected < 0.01:
        reason = (f"--cdb_channel_rate {config.channel_rate:g} drops {expected:.2g} channels per selected layer on "
                  f"average (at most {max(sizes)} channels)")
    else:
        return
    logger.warning(f"{reason}, so ChannelDropBack does (almost) nothing: cdb/applied stays near 0 and the run trains "
                   "like --cdb false; the paper drops 0.3 to 0.5 of the channels of its selected layers")
