"""The checks the faces also run mid-run, below them and light (no data or image library).

:func:`check_supported_setup` refuses DeepSpeed, FSDP and Megatron-LM (pre-flight, the callback and the loop
call it); :func:`check_cdb_against_model` refuses include/exclude patterns that leave no layer of the loaded
model, and warns when the settings make CDB do (almost) nothing. The checks of ``TrainingArguments`` values
(the run's, an A/B extra arm's, a trial's ``--lr_schedule``) and :func:`trackers_for` (the loop's
``report_to``) live here too.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from transformers import TrainingArguments
from transformers.utils import logging

from .core import ChannelDropBackConfig, eligible_layers
from .errors import _TRUE_STRINGS, UsageError, preview, usage_errors

__all__ = ["LOOP_OPTIMIZERS", "check_cdb_against_model", "check_finite_everywhere", "check_loop_arguments",
           "check_lr_schedule", "check_supported_setup", "check_training_arguments", "trackers_for"]

logger = logging.get_logger(__name__)

#: ``TrainingArguments.optim`` values the accelerate loop builds (through the Trainer's own factory).
LOOP_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop", "adafactor")


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


def check_finite_everywhere(*argument_objects) -> None:
    """No NaN or infinity in any numeric argument: they pass argparse and fail (or corrupt) much later."""
    for arguments in argument_objects:
        for item in dataclasses.fields(arguments):
            value = getattr(arguments, item.name, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            for number in values:
                if isinstance(number, float) and not math.isfinite(number):
                    raise UsageError(f"--{item.name} {number!r} is not valid: it must be a finite number")


def check_training_arguments(args: Any) -> None:
    """The TrainingArguments values the Trainer or the loop would reject (or misuse) only after work began."""
    def at_least(name: str, low: float, *, strict: bool = False) -> None:
        value = getattr(args, name)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (strict and value == low):
            sign = ">" if strict else ">="
            raise UsageError(f"--{name} {value!r} is not valid; it must be a number {sign} {low:g}")

    at_least("learning_rate", 0)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        at_least(name, 1)
    for name in ("weight_decay", "max_grad_norm", "warmup_steps", "adam_epsilon", "dataloader_num_workers",
                 "label_smoothing_factor"):
        at_least(name, 0)
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(args, name)
        if not 0 <= value < 1:
            raise UsageError(f"--{name} {value!r} is not valid; it must be in [0, 1)")
    if not args.label_smoothing_factor < 1:
        raise UsageError(f"--label_smoothing_factor {args.label_smoothing_factor!r} is not valid; it must be in "
                         "[0, 1)")
    if args.max_steps is not None and args.max_steps > 0:
        pass  # max_steps wins over num_train_epochs, as in the Trainer
    elif not args.num_train_epochs > 0:
        raise UsageError(f"--num_train_epochs {args.num_train_epochs!r} gives a run of no training step; give a "
                         "number > 0 (or --max_steps N > 0)")
    for strategy, steps in (("logging_strategy", "logging_steps"), ("eval_strategy", "eval_steps"),
                            ("save_strategy", "save_steps")):
        if str(getattr(getattr(args, strategy), "value", getattr(args, strategy))) == "steps":
            value = getattr(args, steps)
            if value is not None and not value > 0:
                raise UsageError(f"--{steps} {value!r} is not valid with --{strategy} steps; it must be > 0")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        raise UsageError(f"--save_total_limit {args.save_total_limit!r} is not valid; it must be >= 1 (or unset)")
    if getattr(args, "batch_eval_metrics", False):
        raise UsageError("--batch_eval_metrics true is not supported: cdb_hf computes its metrics over the whole "
                         "evaluation set at once; drop the flag")
    if args.dataloader_persistent_workers and args.dataloader_num_workers > 0:
        raise UsageError("--dataloader_persistent_workers true is not supported: persistent workers keep the "
                         "first epoch's augmentation seeds, so every epoch would crop and flip alike; drop the "
                         f"flag (--dataloader_num_workers {args.dataloader_num_workers} alone starts fresh "
                         "workers each epoch)")


def check_loop_arguments(args: Any) -> None:
    """The TrainingArguments values the accelerate loop cannot honour, refused by name."""
    optim = str(getattr(args.optim, "value", args.optim))
    if optim not in LOOP_OPTIMIZERS:
        raise UsageError(f"optim={optim!r} is not supported by the accelerate loop; choose one of "
                         f"{', '.join(LOOP_OPTIMIZERS)} (or use --trainer hf)")
    if str(getattr(args.save_strategy, "value", args.save_strategy)) == "best" or args.load_best_model_at_end:
        raise UsageError("save_strategy='best' and load_best_model_at_end are not supported by the accelerate "
                         "loop; use save_strategy 'steps', 'epoch' or 'no' (or --trainer hf)")
    unsupported = {"label_smoothing_factor": args.label_smoothing_factor != 0, "torch_compile": args.torch_compile,
                   "auto_find_batch_size": args.auto_find_batch_size,
                   "train_sampling_strategy": args.train_sampling_strategy not in ("random", "sequential")}
    for name, is_set in unsupported.items():
        if is_set:
            raise UsageError(f"{name}={getattr(args, name)!r} is not supported by the accelerate loop (use --trainer "
                             "hf, or drop the flag; train_sampling_strategy may be 'random' or 'sequential')")
    trackers_for(args.report_to)
    launcher_accumulation = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if launcher_accumulation and int(launcher_accumulation) != args.gradient_accumulation_steps:
        raise UsageError(f"the accelerate launcher sets gradient_accumulation_steps={launcher_accumulation} but the "
                         f"run has --gradient_accumulation_steps {args.gradient_accumulation_steps}; set it once, "
                         "with --gradient_accumulation_steps (the value both training paths read)")


def trackers_for(report_to: list[str] | str | None) -> list[str]:
    """``report_to`` as accelerate's ``log_with`` (the loop's trackers); unknown names raise UsageError."""
    from accelerate.utils import LoggerType

    supported = [str(t.value) for t in LoggerType if t != LoggerType.ALL]
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [name for name in names if name != "none"]
    if "all" in names:
        return ["all"]
    unknown = [name for name in names if name not in supported]
    if unknown:
        raise UsageError(f"report_to={unknown} is not supported by the accelerate loop; choose from "
                         f"{', '.join(supported)}, 'all' or 'none'")
    return names


def check_lr_schedule(run_args, args: TrainingArguments) -> None:
    """``--lr_schedule``, its milestones and factor, and no conflicting ``TrainingArguments`` schedule.

    ``multistep`` replaces ``lr_scheduler_type``: a non-default type, scheduler kwargs or a warmup next to it
    would be silently ignored, so they are refused by name.
    """
    schedule = getattr(run_args, "lr_schedule", "trainer")
    if schedule not in ("trainer", "multistep"):
        raise UsageError(f"--lr_schedule {schedule!r} is not valid; choose 'trainer' (TrainingArguments' "
                         "--lr_scheduler_type) or 'multistep' (the official MultiStepLR)")
    gamma = run_args.lr_gamma
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise UsageError(f"--lr_gamma {gamma!r} is not valid; it must be a number in (0, 1] (official: 0.1)")
    milestones = run_args.lr_milestones
    if milestones is not None:
        if (not isinstance(milestones, (list, tuple)) or not milestones
                or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones)
                or list(milestones) != sorted(set(milestones))):
            raise UsageError(f"--lr_milestones {preview(milestones)} is not valid; give increasing epochs >= 1 (the first "
                             "epoch at each lower rate, e.g. 26 51 72), or leave it unset for the official "
                             "round(0.3E), round(0.6E), round(0.85E)")
    if schedule != "multistep":
        if milestones is not None:
            raise UsageError(f"--lr_milestones {list(milestones)} needs --lr_schedule multistep (the current "
                             f"--lr_schedule {schedule!r} would ignore it)")
        return
    scheduler_type = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    default_type = TrainingArguments.__dataclass_fields__["lr_scheduler_type"].default
    default_type = str(getattr(default_type, "value", default_type))
    conflicts = {"lr_scheduler_type": scheduler_type != default_type, "lr_scheduler_kwargs": bool(args.lr_scheduler_kwargs),
                 "warmup_steps": bool(args.warmup_steps), "warmup_ratio": bool(getattr(args, "warmup_ratio", 0))}
    for name, conflicting in conflicts.items():
        if conflicting:
            value = getattr(args, name)
            raise UsageError(f"--{name} {getattr(value, 'value', value)!r} conflicts with --lr_schedule multistep, which sets "
                             f"the whole schedule (MultiStepLR, no warmup); drop --{name} or use --lr_schedule "
                             "trainer")
