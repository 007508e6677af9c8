"""ChannelDropBack (Hershkovitch Neiterman & Ben-Artzi, ICPR 2024): a backward-only regularizer.

At every optimizer step CDB picks one or more eligible layers and, inside each, a random subset of
channels (rows by default); only those receive this step's update. The forward pass is untouched, so
the trained model is a plain model.

The module is torch-only and is built around three objects:

* :class:`ChannelDropBackConfig` - every knob, validated when it is built;
* :class:`ChannelDropBack` - owns eligibility, selection, masking and the (tiny) state;
* optimizer step hooks installed by :meth:`ChannelDropBack.attach` (or the explicit
  :meth:`ChannelDropBack.before_step` / :meth:`ChannelDropBack.after_step` pair).

Selections are a pure function of ``(seed, step)``: each step reseeds dedicated generators, so the
global RNG is never consumed, every rank of a distributed job draws the same rows, and a checkpoint
only needs the step counter, which :meth:`ChannelDropBack.attach` keeps in the optimizer's param groups
(``cdb_step``) so that the optimizer's own ``state_dict`` carries it. Layer names are the bare model's,
whatever wraps it (DDP, ``torch.compile``, FSDP1, activation checkpointing).

All decisions that steer Python control flow (which layers, how many rows) are drawn on the host
from a CPU generator; only *which* rows is drawn on the parameter's device. The number of dropped
rows is therefore known on the host and the step path never reads a device value back (no
``.item()``, no boolean indexing).

FSDP2 (``torch.distributed.fsdp.fully_shard``) parameters are DTensors sharded ``Shard(0)`` on a 1-D
mesh; their gradients and optimizer state are sharded the same way. CDB draws every selection over
the global shape, as for a plain tensor, and applies it to each rank's local shard (see
:class:`_DroppedRows`), so all ranks agree by construction and no collective is needed.
"""

from __future__ import annotations

import bisect
import contextlib
import fnmatch
import logging
import math
import os
import sys
import sysconfig
import types
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

logger = logging.getLogger(__name__)

__all__ = ["ChannelDropBack", "ChannelDropBackConfig", "ELIGIBLE_MODULE_TYPES", "StatsWindow", "eligible_layers"]

#: Module types whose ``weight`` is eligible. Eligibility is by type, not by parameter name, because
#: names change between library versions (ViT's ``query`` became ``q_proj`` in transformers 5).
ELIGIBLE_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)

_LAYER_SELECTIONS = ("single", "bernoulli")
_CHANNEL_SAMPLINGS = ("bernoulli", "exact")
_AXES = {"rows": 0, "cols": 1}
_MODES = ("grad", "exact")
_ALL_DROPPED_RULES = ("keep_all", "keep_one")
_SCHEDULES = ("constant", "step", "linear", "piecewise")
_SCHEDULE_UNITS = ("steps", "epochs")


def _check_choice(name: str, value: Any, valid: tuple[str, ...] | dict) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")


def _check_rate(name: str, value: float, high_inclusive: bool = True) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (is_number and 0.0 <= value and (value <= 1.0 if high_inclusive else value < 1.0)):
        interval = "[0, 1]" if high_inclusive else "[0, 1)"
        raise ValueError(f"{name}={value!r} is out of range; it must be a number in {interval}")


@dataclass
class ChannelDropBackConfig:
    """Every ChannelDropBack knob. Defaults follow the paper: one layer per step, rows, grad mode."""

    layer_selection: Literal["single", "bernoulli"] = field(
        default="single",
        metadata={"help": "'single': one eligible layer per step, uniformly (paper, Alg. 1). "
                          "'bernoulli': every eligible layer independently with probability layer_rate "
                          "(official code)."},
    )
    layer_rate: float = field(
        default=1.0,
        metadata={"help": "The scheduled selection rate (the schedule's final value). 'single': probability "
                          "that a step selects its one layer; 'bernoulli': per-layer selection probability."},
    )
    layer_rate_init: float = field(
        default=0.0,
        metadata={"help": "Start value of the 'step' and 'linear' schedules (ignored by 'constant')."},
    )
    step_rate: float = field(
        default=1.0,
        metadata={"help": "Probability that a step applies CDB at all (both layer selections)."},
    )
    channel_rate: float = field(
        default=0.3,
        metadata={"help": "Fraction of a selected layer's channels that is DROPPED (not updated), in [0, 1)."},
    )
    channel_sampling: Literal["bernoulli", "exact"] = field(
        default="bernoulli",
        metadata={"help": "'bernoulli': each channel dropped independently with channel_rate (official); "
                          "'exact': exactly round(channel_rate * channels) channels dropped."},
    )
    axis: Literal["rows", "cols"] = field(
        default="rows",
        metadata={"help": "'rows': dim 0 (output features / output channels); 'cols': dim 1 (input "
                          "features / input channels, as in the official code)."},
    )
    mode: Literal["grad", "exact"] = field(
        default="grad",
        metadata={"help": "'grad': zero the dropped gradients (official; momentum and weight decay still "
                          "move dropped rows). 'exact': dropped rows and their optimizer state are bitwise "
                          "unchanged by the step."},
    )
    rescale: bool = field(
        default=True,
        metadata={"help": "Divide the kept gradients by the realized keep fraction (official code)."},
    )
    all_dropped: Literal["keep_all", "keep_one"] = field(
        default="keep_all",
        metadata={"help": "When a Bernoulli draw drops every channel: 'keep_all' masks nothing (official), "
                          "'keep_one' keeps one random channel."},
    )
    include: list[str] | None = field(
        default=None,
        metadata={"help": "Glob patterns over parameter names; only eligible weights matching one are used."},
    )
    exclude: list[str] | None = field(
        default=None,
        metadata={"help": "Glob patterns over parameter names to leave out (e.g. '*classifier*')."},
    )
    skip_first: int = field(
        default=0,
        metadata={"help": "Skip the first k eligible layers in module order (official code: skip_init_layers)."},
    )
    schedule: Literal["constant", "step", "linear", "piecewise"] = field(
        default="constant",
        metadata={"help": "layer_rate schedule: 'constant'; 'step' (the official three stages, layer_rate_init "
                          "until 30% of the run, layer_rate/2 until 60%, then layer_rate; it switches at exactly "
                          "30%/60%, whereas the official code switches two epochs after round(0.3E)/round(0.6E), "
                          "e.g. epochs 28 and 53 of 85 instead of 26 and 51: use 'piecewise' with "
                          "schedule_milestones [round(0.3E)+2, round(0.6E)+2] and schedule_unit 'epochs' for "
                          "the official boundaries); 'linear' ramp from layer_rate_init; 'piecewise': "
                          "schedule_rates between schedule_milestones."},
    )
    schedule_milestones: list[int] | None = field(
        default=None,
        metadata={"help": "For schedule='piecewise': strictly increasing boundaries (>= 0) in schedule_unit "
                          "(epochs or optimizer steps, 0-based); rate i applies from milestone i-1 (inclusive) "
                          "to milestone i (exclusive)."},
    )
    schedule_rates: list[float] | None = field(
        default=None,
        metadata={"help": "For schedule='piecewise': the layer rates, one more than schedule_milestones, each in "
                          "[0, 1] (replace layer_rate_init/layer_rate)."},
    )
    schedule_total_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps the schedule spans (the trainers fill it from max_steps)."},
    )
    schedule_unit: Literal["steps", "epochs"] = field(
        default="steps",
        metadata={"help": "'steps': the rate moves every optimizer step; 'epochs': only at epoch boundaries "
                          "(needs schedule_steps_per_epoch)."},
    )
    schedule_steps_per_epoch: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps per epoch, for schedule_unit='epochs'."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of CDB's own generators; selections are a pure function of (seed, step)."},
    )

    def __post_init__(self) -> None:
        _check_choice("layer_selection", self.layer_selection, _LAYER_SELECTIONS)
        _check_choice("channel_sampling", self.channel_sampling, _CHANNEL_SAMPLINGS)
        _check_choice("axis", self.axis, _AXES)
        _check_choice("mode", self.mode, _MODES)
        _check_choice("all_dropped", self.all_dropped, _ALL_DROPPED_RULES)
        _check_choice("schedule", self.schedule, _SCHEDULES)
        _check_choice("schedule_unit", self.schedule_unit, _SCHEDULE_UNITS)
        _check_rate("layer_rate", self.layer_rate)
        _check_rate("layer_rate_init", self.layer_rate_init)
        _check_rate("step_rate", self.step_rate)
        _check_rate("channel_rate", self.channel_rate, high_inclusive=False)
        if not isinstance(self.rescale, bool):
            raise ValueError(f"rescale={self.rescale!r} is not valid; it must be True or False")
        if not isinstance(self.skip_first, int) or isinstance(self.skip_first, bool) or self.skip_first < 0:
            raise ValueError(f"skip_first={self.skip_first!r} is not valid; it must be an integer >= 0")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed={self.seed!r} is not valid; it must be an integer")
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if isinstance(patterns, str):  # a lone pattern is a common slip; accept it as a list of one
                patterns = [patterns]
            if patterns is not None:
                patterns = list(patterns)
                if not patterns or not all(isinstance(p, str) and p for p in patterns):
                    raise ValueError(f"{name}={patterns!r} is not valid; it must be a non-empty list of glob "
                                     "patterns, or None")
            setattr(self, name, patterns)
        for name in ("schedule_total_steps", "schedule_steps_per_epoch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}={value!r} is not valid; it must be a positive integer or None")
        self._check_piecewise()

    def _check_piecewise(self) -> None:
        milestones, rates = self.schedule_milestones, self.schedule_rates
        if self.schedule != "piecewise":
            for name in ("schedule_milestones", "schedule_rates"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}={getattr(self, name)!r} is only used by schedule='piecewise' "
                                     f"(schedule={self.schedule!r}); set schedule='piecewise' or leave it unset")
            return
        if milestones is None or rates is None:
            raise ValueError("schedule='piecewise' needs schedule_milestones and schedule_rates (e.g. milestones "
                             f"[28, 53] and rates [0.03, 0.15, 0.3]); got schedule_milestones={milestones!r}, "
                             f"schedule_rates={rates!r}")
        milestones, rates = list(milestones), list(rates)
        if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in milestones) or any(
                later <= earlier for earlier, later in zip(milestones, milestones[1:])):
            raise ValueError(f"schedule_milestones={milestones!r} is not valid; it must be a list of strictly "
                             f"increasing integers >= 0 ({self.schedule_unit})")
        if len(rates) != len(milestones) + 1:
            raise ValueError(f"schedule_rates={rates!r} is not valid; it needs len(schedule_milestones) + 1 = "
                             f"{len(milestones) + 1} values (one before the first milestone, one after each)")
        for rate in rates:
            _check_rate("schedule_rates entry", rate)
        self.schedule_milestones, self.schedule_rates = milestones, [float(r) for r in rates]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (for checkpoints, model cards and recipes)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ChannelDropBackConfig:
        """Build from a dict, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ChannelDropBackConfig field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**values)

    def for_run(self, total_steps: int, steps_per_epoch: int | None = None) -> ChannelDropBackConfig:
        """This config with the schedule's length taken from the run where the user left it open.

        The trainers call it once they know the run's size; a ``constant`` schedule needs nothing.
        """
        if self.schedule == "constant":
            return self
        overrides = {}
        if self.schedule_total_steps is None and self.schedule != "piecewise":  # piecewise has no length
            overrides["schedule_total_steps"] = max(int(total_steps), 1)
        if self.schedule_unit == "epochs" and self.schedule_steps_per_epoch is None and steps_per_epoch is not None:
            overrides["schedule_steps_per_epoch"] = max(int(steps_per_epoch), 1)
        return replace(self, **overrides) if overrides else self

    def rate_at(self, step: int) -> float:
        """The scheduled ``layer_rate`` at optimizer step ``step`` (0-based)."""
        if self.schedule == "constant":
            return self.layer_rate
        if self.schedule == "piecewise":
            position = step
            if self.schedule_unit == "epochs":
                if self.schedule_steps_per_epoch is None:
                    raise ValueError("schedule_unit='epochs' needs schedule_steps_per_epoch (optimizer steps per "
                                     "epoch)")
                position = step // self.schedule_steps_per_epoch
            return self.schedule_rates[bisect.bisect_right(self.schedule_milestones, position)]
        if self.schedule_total_steps is None:
            raise ValueError(f"schedule={self.schedule!r} needs schedule_total_steps (the number of optimizer "
                             "steps of the run); the Trainer callback and the accelerate loop fill it in")
        position = step
        if self.schedule_unit == "epochs":
            if self.schedule_steps_per_epoch is None:
                raise ValueError("schedule_unit='epochs' needs schedule_steps_per_epoch (optimizer steps per epoch)")
            position = (step // self.schedule_steps_per_epoch) * self.schedule_steps_per_epoch
        progress = min(position / self.schedule_total_steps, 1.0)
        if self.schedule == "step":
            if progress < 0.3:
                return self.layer_rate_init
            return self.layer_rate / 2 if progress < 0.6 else self.layer_rate
        return self.layer_rate_init + (self.layer_rate - self.layer_rate_init) * progress


def _mix_seed(*values: int) -> int:
    """SplitMix64 over a tuple of ints: well-spread, platform-independent 63-bit seeds."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        state = (state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state = z ^ (z >> 31)
    return state & 0x7FFFFFFFFFFFFFFF


def eligible_layers(model: nn.Module, config: ChannelDropBackConfig | None = None) -> dict[str, nn.Parameter]:
    """The weights ChannelDropBack would act on, ``{parameter name: parameter}`` in module order.

    Linear and Conv weights that require grad and have at least 2 slices along ``config.axis``,
    refined by ``include``/``exclude`` and ``skip_first``. A PEFT LoRA layer (found by its structure) is one
    layer: its ``lora_B[adapter].weight`` for ``axis='rows'`` (``lora_A``'s for ``'cols'``); the other factor is
    shared by every row (column) of the update ``B @ A`` and is never masked, and the frozen base weight is
    not eligible. Trainable plain layers (e.g. a classifier in ``modules_to_save``) stay eligible as they are.
    Pre-flight checks use it to validate a config
    against a model without building a :class:`ChannelDropBack`; it raises ``ValueError`` naming the bad
    pattern when the config selects nothing or a pattern matches nothing.
    """
    config = config if config is not None else ChannelDropBackConfig()
    dim = _AXES[config.axis]
    model = _bare_model(model)
    names = {id(p): _bare_name(n) for n, p in model.named_parameters()}
    lora_targets, lora_factors = _lora_structure(model, dim)
    typed: dict[str, nn.Parameter] = {}
    for module in model.modules():
        if _is_lora_layer(module):  # one CDB layer per adapter: the factor that carries the masked axis
            candidates = [lora_targets[id(m.weight)] for m in _lora_factor_modules(module, dim)]
        elif isinstance(module, ELIGIBLE_MODULE_TYPES) and isinstance(getattr(module, "weight", None), nn.Parameter):
            candidates = [module.weight] if id(module.weight) not in lora_factors else []
        else:
            continue
        for weight in candidates:
            if not weight.requires_grad or id(weight) not in names or names[id(weight)] in typed:
                continue
            if weight.dim() <= dim or weight.shape[dim] < 2:
                continue  # e.g. a depthwise conv along dim 1: a single channel cannot be dropped
            typed[names[id(weight)]] = weight
    if not typed:
        raise ValueError(f"{type(model).__name__} has no eligible layer: ChannelDropBack needs Linear or Conv "
                         f"weights that require grad with at least 2 channels along axis={config.axis!r}")

    def matches(name: str, patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    for kind, patterns in (("include", config.include), ("exclude", config.exclude)):
        for pattern in patterns or []:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in typed):
                raise ValueError(f"{kind} pattern {pattern!r} matches no eligible layer; eligible layers "
                                 f"are e.g. {_preview(list(typed))}")
    selected = {n: p for n, p in typed.items()
                if (config.include is None or matches(n, config.include))
                and not (config.exclude and matches(n, config.exclude))}
    selected = dict(list(selected.items())[config.skip_first:])
    if not selected:
        raise ValueError(f"include={config.include!r}, exclude={config.exclude!r} and "
                         f"skip_first={config.skip_first} leave no eligible layer out of {len(typed)} "
                         f"(e.g. {_preview(list(typed))})")
    return selected


def _is_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer, recognised by structure (no peft import): a ``base_layer`` plus ``lora_A`` and
    ``lora_B`` ModuleDicts keyed by adapter name, as peft's ``LoraLayer`` has."""
    return (isinstance(getattr(module, "base_layer", None), nn.Module)
            and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), nn.ModuleDict))


def _lora_factor_modules(module: nn.Module, dim: int) -> list[nn.Module]:
    """The factor of each adapter that carries the masked axis of the update ``B @ A``: ``lora_B`` (its rows are
    the output rows) for rows, ``lora_A`` (its columns are the input columns) for cols."""
    factors = module.lora_B if dim == 0 else module.lora_A
    return [m for m in factors.values() if isinstance(getattr(m, "weight", None), nn.Parameter)]


def _lora_structure(model: nn.Module, dim: int) -> tuple[dict[int, nn.Parameter], set[int]]:
    """``({id: weight} of the LoRA factors CDB masks, ids of every lora_A/lora_B weight})``."""
    targets: dict[int, nn.Parameter] = {}
    factors: set[int] = set()
    for module in model.modules():
        if not _is_lora_layer(module):
            continue
        for child in (*module.lora_A.values(), *module.lora_B.values()):
            if isinstance(getattr(child, "weight", None), nn.Parameter):
                factors.add(id(child.weight))
        targets.update({id(m.weight): m.weight for m in _lora_factor_modules(module, dim)})
    return targets, factors


@dataclass(slots=True)
class _Selected:
    """One selected layer at one step: the dropped indices along ``dim`` and the grad scale."""

    name: str
    param: nn.Parameter
    dim: int
    size: int
    dropped: torch.Tensor | None  # ``count`` int64 indices on the parameter's device (None when 0)
    scale: float
    shard: tuple[int, int] | None  # (start, length) of this rank's slices when ``dim`` is sharded
    count: int  # how many slices are dropped: known on the host (a shape, never a device read)


class _HookHandle:
    """Removes CDB's optimizer hooks (same interface as torch's RemovableHandle)."""

    def __init__(self, cdb: ChannelDropBack, handles: list) -> None:
        self._cdb, self._handles = cdb, handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._cdb._optimizer, self._cdb._chain, self._cdb._watching = None, [], False
        _WATCHED.discard(self._cdb)


class ChannelDropBack:
    """Apply ChannelDropBack to ``model``'s Linear and Conv weights.

    Build it once from the model, then :meth:`attach` it to the optimizer: each ``optimizer.step()``
    then updates only the selected rows of the selected layers. Nothing in the forward pass changes.

    Args:
        model: any ``nn.Module``; only its Linear/Conv weights that require grad are eligible.
        config: the knobs; the defaults are the paper's.
    """

    def __init__(self, model: nn.Module, config: ChannelDropBackConfig | None = None) -> None:
        self.config = config if config is not None else ChannelDropBackConfig()
        # The run's length is known only to the trainer, which fills these in before building the core.
        if self.config.schedule not in ("constant", "piecewise") and self.config.schedule_total_steps is None:
            raise ValueError(f"schedule={self.config.schedule!r} needs schedule_total_steps (the number of "
                             "optimizer steps of the run); the Trainer callback and the accelerate loop fill "
                             "it in")
        if (self.config.schedule != "constant" and self.config.schedule_unit == "epochs"
                and self.config.schedule_steps_per_epoch is None):
            raise ValueError("schedule_unit='epochs' needs schedule_steps_per_epoch (optimizer steps per epoch); "
                             "the Trainer callback and the accelerate loop fill it in")
        self.dim = _AXES[self.config.axis]
        self.layers: dict[str, nn.Parameter] = eligible_layers(model, self.config)
        lora_targets, _ = _lora_structure(model, self.dim)
        if lora_targets:
            adapted = sum(id(p) in lora_targets for p in self.layers.values())
            factor = "rows of lora_B" if self.dim == 0 else "columns of lora_A"
            logger.info("ChannelDropBack: PEFT LoRA model: %d adapted layers (%s), %d plain layer%s", adapted,
                        factor, len(self.layers) - adapted, "" if len(self.layers) - adapted == 1 else "s")
        self._names = list(self.layers)
        self._params = list(self.layers.values())
        self._shards = [_local_shard(name, param, self.dim) for name, param in self.layers.items()]
        self._sizes = [param.shape[self.dim] for param in self._params]
        self._param_ids = {id(p) for p in self._params}
        self._step, self._step_known = 0, False
        self._wrote_step: weakref.WeakSet = weakref.WeakSet()  # optimizers whose groups CDB wrote its step into
        self._host_generator = torch.Generator(device="cpu")
        # Which rows a selected layer drops comes from its device's generator, reseeded from (seed, step)
        # once per step: a pure function of those two numbers (and the model), on every rank alike.
        # (Created lazily: the model may move to its device after CDB is built.)
        self._device_generators: dict[torch.device, torch.Generator] = {}
        self._optimizer: torch.optim.Optimizer | None = None  # the innermost attached optimizer
        self._chain: list[torch.optim.Optimizer] = []  # attached: [outermost wrapper, ..., innermost]
        self._selected: list[_Selected] = []
        self._work: list[tuple[_Selected, _DroppedRows]] = []
        self._snapshots: list[tuple[_Selected, _DroppedRows, dict[Any, torch.Tensor]]] = []
        self._step_chain: list[torch.optim.Optimizer] = []
        self._in_step = self._framed_outside = self._masked = False
        self._warned_no_grad: set[str] = set()
        self._warned: set[str] = set()
        # Any optimizer step in this process that updates CDB's layers while CDB's hooks did not run is
        # noticed (warned once, counted in unseen_steps), until handle.remove().
        self._watching, self._unseen_steps = True, 0
        self._holds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        _watch_steps(self)
        self.last_stats: dict[str, float] = {"applied": 0.0, "layers": 0.0, "keep_fraction": 1.0,
                                             "layer_rate": self.config.rate_at(0)}

    # ------------------------------------------------------------------ optimizer hooks
    def attach(self, optimizer: Any) -> _HookHandle:
        """Install CDB on ``optimizer``'s step and return a removable handle.

        Works with any ``torch.optim.Optimizer`` (foreach and fused included), with accelerate's
        ``AcceleratedOptimizer``, and with optimizers that wrap another one and expose it as
        ``base_optimizer``, ``_base_optimizer`` or ``optimizer`` (timm's ``Lookahead``, ...): the rows are
        masked right before the wrapped optimizer's update, and exact mode restores them (and every
        per-element state of every optimizer in the chain) after the wrapper's whole step. A wrapper
        exposing something other than a torch optimizer is refused here. The hooks run after gradient
        clipping and AMP unscaling, whichever trainer drives the loop.

        CDB's step counter travels in the optimizer's param groups (``cdb_step``), so restoring the
        optimizer (``load_state_dict``, accelerate's ``load_state``, a Trainer checkpoint), before or
        after ``attach``, also resumes the selection sequence.
        """
        chain = _optimizer_chain(optimizer)
        if self._optimizer is not None:
            raise RuntimeError("this ChannelDropBack is already attached to an optimizer; call "
                               "handle.remove() first")
        inner = chain[-1]
        self._check_optimizer_covers_layers(inner)
        self._optimizer, self._chain, self._watching = inner, chain, True
        _watch_steps(self)
        self._sync_step(inner)
        handles: list[Any] = [inner.register_step_pre_hook(lambda opt, args, kwargs: self._inner_pre_step()),
                              inner.register_step_post_hook(lambda opt, args, kwargs: self._inner_post_step())]
        # A wrapper updates the weights after (Lookahead's sync) or around its inner step, and an optimizer
        # that skipped Optimizer.__init__ runs no step hooks until its class is patched (timm's Lookahead:
        # at the first zero_grad): CDB then frames the outermost step itself.
        if len(chain) > 1 or not getattr(type(inner).step, "hooked", False):
            handles.append(_StepFrame(chain[0], self))
        return _HookHandle(self, handles)

    def _check_optimizer_covers_layers(self, optimizer: torch.optim.Optimizer) -> None:
        """Leave out eligible layers the optimizer does not update: selecting them would be a silent no-op."""
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in self.layers.items() if id(p) not in in_optimizer]
        if len(missing) == len(self.layers):
            raise ValueError("none of the eligible layers is in the optimizer: build ChannelDropBack from the "
                             "same model (after wrapping, the parameters must be the same objects)")
        if missing:
            warnings.warn(f"{len(missing)} eligible layer(s) are not in the optimizer and are left out of CDB: "
                          f"{_preview(missing)}; use include/exclude to silence this", stacklevel=_caller_stacklevel(sys._getframe()))
            missing_names = set(missing)
            keep = [i for i, name in enumerate(self._names) if name not in missing_names]
            self._names = [self._names[i] for i in keep]
            self._params = [self._params[i] for i in keep]
            self._shards = [self._shards[i] for i in keep]
            self._sizes = [self._sizes[i] for i in keep]
            self.layers = dict(zip(self._names, self._params))
            self._param_ids = {id(p) for p in self._params}

    # The step hooks. A step is framed by _begin (draw the selection, snapshot for exact mode) and _end
    # (restore, advance the counter); _mask works on the gradients right before the innermost update.
    def _inner_pre_step(self) -> None:
        if not self._in_step:  # a plain optimizer (or the inner one stepped on its own): frame the step here
            self._begin(self._chain, framed_outside=False)
        if not self._masked:
            self._mask()

    def _inner_post_step(self) -> None:
        if self._in_step and not self._framed_outside:
            self.after_step()

    @torch.no_grad()
    def before_step(self, optimizer: Any = None) -> None:
        """Draw this step's selection and mask the selected gradients (call right before ``step()``).

        The per-layer work is batched: one ``index_fill_`` per selected gradient (a fill, not a multiply, so
        an fp16 inf in a dropped row cannot become NaN), then one ``torch._foreach_mul_`` per device/dtype
        group for the rescale; exact mode saves the dropped rows of every selected weight and its
        per-element optimizer state (one gather per tensor, one scatter back in :meth:`after_step`), and
        skips the fill when the optimizer is one of torch's element-wise ones.
        """
        chain = _optimizer_chain(optimizer) if optimizer is not None else self._chain
        self._begin(chain, framed_outside=True)
        self._mask()

    @torch.no_grad()
    def after_step(self, optimizer: Any = None) -> None:
        """Restore the dropped rows in exact mode and advance the step counter (call after ``step()``)."""
        if not self._in_step:
            raise RuntimeError("after_step() without before_step(): call before_step(optimizer) right before "
                               "optimizer.step() and after_step(optimizer) right after it")
        self._end()

    @torch.no_grad()
    def _begin(self, chain: list[torch.optim.Optimizer], framed_outside: bool) -> None:
        if self.config.mode == "exact" and not chain:
            raise ValueError("mode='exact' restores the optimizer state of dropped rows: pass the optimizer to "
                             "before_step(optimizer)/after_step(optimizer), or attach(optimizer)")
        if chain:
            self._sync_step(chain[-1])
        drawn = self._draw(self._step)
        # A selected layer without a gradient this step (unused by the forward, frozen by the user) gets no
        # update at all: it is left out of the selection and of the statistics, and named once.
        self._selected = [sel for sel in drawn if sel.param.grad is not None]
        if len(self._selected) < len(drawn):
            self._warn_no_grad([sel.name for sel in drawn if sel.param.grad is None])
        self.last_stats = {"applied": float(bool(self._selected)), "layers": float(len(self._selected)),
                           "keep_fraction": (sum(1.0 - sel.count / sel.size for sel in self._selected)
                                             / len(self._selected)) if self._selected else 1.0,
                           "layer_rate": self.config.rate_at(self._step)}
        # A shape, known on the host: a layer whose draw dropped nothing needs no kernel at all.
        work = [sel for sel in self._selected if sel.count]
        self._in_step, self._framed_outside, self._masked = True, framed_outside, False
        self._step_chain, self._snapshots = chain, []
        self._work = [(sel, _DroppedRows(sel)) for sel in work]
        if work and self.config.mode == "exact":
            with _one_cpu_thread(work):
                self._snapshot(chain)

    @torch.no_grad()
    def _mask(self) -> None:
        self._masked = True
        if not self._work:
            return
        # Exact mode puts every dropped row back after the step. With an optimizer whose update of an element
        # depends on that element alone, what a dropped row's gradient held cannot reach a kept row or survive
        # the restore, so zeroing it would be wasted memory traffic. Any other optimizer (Adafactor's factored
        # moments, LAMB's trust ratio, a wrapper, ...) mixes rows and must see the zeros.
        zero_dropped = self.config.mode != "exact" or any(
            type(opt) not in _ELEMENTWISE_OPTIMIZERS for opt in self._step_chain)
        with _one_cpu_thread([sel for sel, _ in self._work]):
            scaled: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[float]]] = {}
            for sel, dropped in self._work:
                if sel.param.grad is None:
                    continue
                grad = _local(sel.param.grad)
                if zero_dropped:
                    dropped.zero_(grad)
                if sel.scale != 1.0:
                    tensors, scales = scaled.setdefault((grad.device, grad.dtype), ([], []))
                    tensors.append(grad)
                    scales.append(sel.scale)
            for tensors, scales in scaled.values():
                torch._foreach_mul_(tensors, scales)

    @torch.no_grad()
    def _end(self) -> None:
        """Restore the dropped rows (exact mode) and advance the step, unless the optimizer did not step."""
        stepped = self._masked
        if not stepped:  # a wrapper's step returned without running its inner optimizer's step
            self._warn_once("unstepped", f"{type(self._step_chain[0]).__name__}.step() returned without running "
                            f"{type(self._step_chain[-1]).__name__}.step(): ChannelDropBack counted it as a skipped "
                            "step (as an AMP overflow skip); if that wrapper updates the weights itself, CDB cannot "
                            "mask that update")
        states = _optimizer_states(self._step_chain)
        with _one_cpu_thread([sel for sel, _, _ in self._snapshots]):
            for sel, rows, saved in self._snapshots:
                rows.restore_(sel.param, saved.pop(None))
                for level, optimizer_state in enumerate(states):
                    for key, value in optimizer_state.get(sel.param, {}).items():
                        if not _is_per_element(value, sel.param):
                            continue
                        if (level, key) in saved:
                            rows.restore_(value, saved[(level, key)])
                        elif key in _CREATED_AS_WEIGHT_COPY:  # e.g. Lookahead's slow weights, born a copy
                            rows.restore_(value, rows.save(sel.param))
                        else:  # state created by this very step: "not happened" is its initial value, zero
                            rows.zero_(value)
        self._snapshots, self._work, self._in_step = [], [], False
        if stepped:
            self._step += 1
            self._step_known = True
            if self._step_chain:
                self._write_step(self._step_chain[-1])

    def _warn_no_grad(self, names: list[str]) -> None:
        new = [name for name in names if name not in self._warned_no_grad]
        if new:
            self._warned_no_grad.update(new)
            warnings.warn(f"ChannelDropBack selected layer(s) without a gradient: {_preview(new)}; they are not "
                          "counted in cdb/layers or cdb/applied (unused by the forward pass, or frozen after CDB "
                          "was built?). Leave them out with exclude=[...]; this warning is shown once per layer",
                          stacklevel=_caller_stacklevel(sys._getframe()))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=_caller_stacklevel(sys._getframe()))

    def _snapshot(self, chain: list[torch.optim.Optimizer]) -> None:
        """Save the dropped rows of each selected weight (key None) and of its per-element state in every
        optimizer of the chain (key ``(level, name)``)."""
        states = _optimizer_states(chain)
        for sel, dropped in self._work:
            saved: dict[Any, torch.Tensor] = {
                (level, key): dropped.save(value) for level, optimizer_state in enumerate(states)
                for key, value in optimizer_state.get(sel.param, {}).items() if _is_per_element(value, sel.param)}
            saved[None] = dropped.save(sel.param)
            self._snapshots.append((sel, dropped, saved))

    # ------------------------------------------------------------------ the step counter
    @property
    def step(self) -> int:
        """Completed optimizer steps, the position in the selection sequence.

        Kept in the attached optimizer's param groups (``cdb_step``) as well, so that it is saved and
        restored with the optimizer; a value restored there is what the next step uses.
        """
        restored = _group_step(self._optimizer) if self._optimizer is not None else None
        return self._step if restored is None else restored

    @step.setter
    def step(self, value: int) -> None:
        self._step, self._step_known = int(value), True
        if self._optimizer is not None:
            self._write_step(self._optimizer)

    def _sync_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Adopt a step restored into ``optimizer``'s param groups; say so when it contradicts CDB's own."""
        restored = _group_step(optimizer)
        if restored is None:
            if optimizer in self._wrote_step:
                self._warn_once("lost", "the optimizer's param groups no longer carry ChannelDropBack's step "
                                f"('{_STEP_KEY}'): it was restored from a state saved without CDB; CDB continues at "
                                f"its own step {self._step}. If this run resumes a CDB run, set cdb.step to the "
                                "completed optimizer steps, or the earlier selections repeat")
        elif restored != self._step:
            if self._step_known:
                self._warn_once("disagree", f"the restored optimizer carries ChannelDropBack step {restored} but "
                                f"CDB's own step is {self._step} (set or loaded separately): continuing from the "
                                f"optimizer's, {restored}; set cdb.step after restoring the optimizer if that is "
                                "wrong")
            self._step = restored
        self._step_known = self._step_known or restored is not None
        self._write_step(optimizer)

    def _write_step(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            group[_STEP_KEY] = self._step
        self._wrote_step.add(optimizer)

    # ------------------------------------------------------------------ hooks that never ran
    def _after_any_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Global post-step hook: an optimizer updated CDB's layers in a step CDB did not see."""
        if not self._watching or self._in_step or any(optimizer is o for o in self._chain):
            return
        holds = self._holds.get(optimizer)
        if holds is None:
            holds = self._holds[optimizer] = any(
                id(p) in self._param_ids for group in optimizer.param_groups for p in group["params"])
        if holds:
            self._unseen_steps += 1
            attached = type(self._chain[0]).__name__ if self._chain else "no optimizer"
            self._warn_once("unseen", f"{type(optimizer).__name__}.step() updated ChannelDropBack's layers but "
                            f"CDB's hooks did not run (CDB is attached to {attached}): CDB did nothing in that "
                            "step. attach() CDB to the optimizer your loop steps (again if the loop replaced it), "
                            "or call before_step()/after_step() around optimizer.step(); shown once, "
                            "cdb.unseen_steps counts them")

    @property
    def unseen_steps(self) -> int:
        """Optimizer steps that updated CDB's layers without CDB's hooks running (0 in a working loop)."""
        return self._unseen_steps

    # ------------------------------------------------------------------ selection
    def _draw(self, step: int) -> list[_Selected]:
        """The selection of optimizer step ``step``: a pure function of (seed, step)."""
        config = self.config
        rate = config.rate_at(step)
        host = self._host_generator.manual_seed(_mix_seed(config.seed, step, 0))
        apply_draw, rate_draw, pick_draw = torch.rand(3, generator=host).tolist()
        if apply_draw >= config.step_rate:
            chosen = []
        elif config.layer_selection == "single":
            chosen = [min(int(pick_draw * len(self._params)), len(self._params) - 1)] if rate_draw < rate else []
        else:
            chosen = (torch.rand(len(self._params), generator=host) < rate).nonzero().flatten().tolist()
        if not chosen:
            return []

        sizes = [self._sizes[i] for i in chosen]
        if config.channel_sampling == "exact":
            drops = [min(round(config.channel_rate * n), n - 1) for n in sizes]
        else:
            # Bernoulli(p) per channel == Binomial(n, p) many channels, uniformly chosen: drawing the
            # count on the host keeps the step free of device-to-host reads.
            counts = torch.tensor(sizes, dtype=torch.float64)
            drops = torch.binomial(counts, torch.full_like(counts, config.channel_rate), generator=host)
            drops = [int(d) for d in drops.tolist()]
            rule = config.all_dropped
            drops = [(0 if rule == "keep_all" else n - 1) if d == n else d for d, n in zip(drops, sizes)]

        selected, reseeded = [], set()
        for index, size, dropped in zip(chosen, sizes, drops):
            indices = None
            if dropped:
                device = self._params[index].device
                generator = self._device_generators.get(device)
                if generator is None:
                    generator = self._device_generators[device] = torch.Generator(device=device)
                if device not in reseeded:  # one reseed per device and step; the layers then draw in order
                    generator.manual_seed(_mix_seed(config.seed, step, 1))
                    reseeded.add(device)
                indices = torch.randperm(size, generator=generator, device=device)[:dropped]
            keep = (size - dropped) / size
            scale = 1.0 / keep if config.rescale else 1.0
            selected.append(_Selected(self._names[index], self._params[index], self.dim, size, indices, scale,
                                      self._shards[index], count=dropped))
        return selected

    def stepped(self, steps_before: int, step_was_skipped: bool = False) -> bool:
        """Whether the hooks ran for the optimizer step that followed ``steps_before`` completed steps.

        Trainers call it after each optimizer step: an AMP overflow skip (``step_was_skipped``) is the one
        legitimate reason for the hooks not to run; anything else (the optimizer was replaced, or stepped
        outside ``torch.optim``) would mean CDB silently did nothing, and raises ``RuntimeError``.
        """
        if self.step == steps_before + 1:
            return True
        if step_was_skipped:
            return False
        raise RuntimeError("ChannelDropBack's optimizer hooks did not run during this optimizer step: the optimizer "
                           "was replaced after training began, or the step ran outside torch.optim (e.g. "
                           "DeepSpeed). Refusing to continue without CDB.")

    # ------------------------------------------------------------------ introspection & state
    @property
    def last_selection(self) -> dict[str, torch.Tensor]:
        """``{parameter name: bool mask over the masked axis}`` (True = updated) of the last step."""
        masks = {}
        for sel in self._selected:
            keep = torch.ones(sel.size, dtype=torch.bool, device=sel.param.device)
            masks[sel.name] = keep if sel.dropped is None else keep.index_fill_(0, sel.dropped, False)
        return masks

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same selection sequence: the step counter (and the seed)."""
        return {"step": self.step, "seed": self.config.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; selections resume exactly where they stopped."""
        if "step" not in state_dict:
            raise ValueError(f"not a ChannelDropBack state dict (keys {sorted(state_dict)}); expected 'step'")
        if state_dict.get("seed", self.config.seed) != self.config.seed:
            warnings.warn(f"loading CDB state saved with seed {state_dict['seed']} into a run with seed "
                          f"{self.config.seed}: the selection sequence will differ from the saved run",
                          stacklevel=_caller_stacklevel(sys._getframe()))
        self.step = int(state_dict["step"])  # also into the attached optimizer's param groups

    def __repr__(self) -> str:
        return (f"ChannelDropBack(layers={len(self.layers)}, step={self.step}, "
                f"config={self.config})")


class _DroppedRows:
    """One selection's dropped slices, applied to this process's part of a tensor.

    A plain tensor, a replicated DTensor or one sharded along another dim holds every slice of the
    masked dim, so the dropped indices apply to it as they are. A DTensor sharded along the masked
    dim holds only the slices ``[start, start + length)``, and how many dropped indices fall there is
    device data: reading it back would stall the step. That case therefore uses a bool mask over the
    local slices (static shape) with ``masked_fill_``/``where``, and exact mode saves the whole local
    shard of the selected layer (weight and per-element optimizer state) for the length of one
    ``optimizer.step()`` instead of only the dropped rows.
    """

    def __init__(self, sel: _Selected) -> None:
        self.dim, self.indices = sel.dim, sel.dropped
        self.local_mask: torch.Tensor | None = None
        if sel.shard is not None:
            start, length = sel.shard
            dropped = torch.zeros(sel.size, dtype=torch.bool, device=sel.dropped.device)
            dropped.index_fill_(0, sel.dropped, True)
            shape = [1] * sel.param.dim()
            shape[sel.dim] = length
            self.local_mask = dropped[start:start + length].view(shape)  # broadcasts over the other dims

    def zero_(self, tensor: torch.Tensor) -> None:
        """Zero the dropped slices (``fill`` rather than a multiply: 0 * inf would give NaN in fp16)."""
        local = _local(tensor)
        if self.local_mask is None:
            local.index_fill_(self.dim, self.indices, 0)
        else:
            local.masked_fill_(self.local_mask, 0)

    def save(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of what :meth:`restore_` needs to put the dropped slices back."""
        local = _local(tensor)
        return local.index_select(self.dim, self.indices) if self.local_mask is None else local.clone()

    def restore_(self, tensor: torch.Tensor, saved: torch.Tensor) -> None:
        """Put the dropped slices saved by :meth:`save` back into ``tensor``."""
        local = _local(tensor)
        if self.local_mask is None:
            local.index_copy_(self.dim, self.indices, saved)
        else:
            local.copy_(torch.where(self.local_mask, saved, local))


def _dtensor_module() -> Any:
    """``torch.distributed.tensor`` if something has loaded it (no DTensor can exist otherwise).

    Looking it up instead of importing it keeps ``import cdb_hf`` about a second faster.
    """
    return sys.modules.get("torch.distributed.tensor")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process holds: the local shard of a DTensor, else the tensor."""
    dtensor = _dtensor_module()
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor.DTensor) else tensor


def _local_shard(name: str, param: torch.Tensor, dim: int) -> tuple[int, int] | None:
    """``(start, length)`` of this rank's slices along ``dim`` when ``param`` is sharded on it, else None.

    Accepts FSDP2's layout (``Shard(0)`` on a 1-D mesh) and replicated DTensors, and refuses every other
    DTensor layout (tensor parallel, HSDP's 2-D mesh, ...) by name, before any training step.
    """
    dtensor = _dtensor_module()
    if dtensor is None or not isinstance(param, dtensor.DTensor):
        return None
    mesh, placements = param.device_mesh, tuple(param.placements)
    supported = mesh.ndim == 1 and (type(placements[0]) is dtensor.Replicate
                                    or (type(placements[0]) is dtensor.Shard and placements[0].dim == 0))
    if not supported:
        raise ValueError(f"parameter {name!r} is a DTensor with placements {placements} on a {mesh.ndim}-D "
                         "device mesh; ChannelDropBack supports DTensors sharded Shard(0) or Replicate() on a "
                         "1-D mesh (FSDP2's fully_shard default); leave this layer out with exclude=[...]")
    if type(placements[0]) is dtensor.Replicate or dim != 0:
        return None  # every slice of the masked dim is local
    size, coordinate = param.shape[0], mesh.get_coordinate()
    start, length = _chunk_range(size, mesh.size(), coordinate[0]) if coordinate is not None else (size, 0)
    if _local(param).shape[0] != length:
        raise ValueError(f"parameter {name!r}: the local shard has {_local(param).shape[0]} of {size} rows "
                         f"where DTensor's Shard(0) rule gives {length}; ChannelDropBack cannot map its "
                         "selection onto this layout")
    return start, length


def _chunk_range(size: int, ranks: int, rank: int) -> tuple[int, int]:
    """``(start, length)`` of rank ``rank``'s slices under DTensor's ``Shard`` rule.

    The rule is torch.chunk's: ``ceil(size / ranks)`` slices per rank, so the last parts may be shorter
    or empty.
    """
    chunk = math.ceil(size / ranks)
    start = min(rank * chunk, size)
    return start, min(chunk, size - start)


class StatsWindow:
    """Means of :attr:`ChannelDropBack.last_stats` over the optimizer steps since the last :meth:`flush`.

    What both trainers log: the share of steps that applied CDB, the mean number of selected layers,
    the mean kept fraction of the selected layers, and the scheduled rate at the last step.
    """

    def __init__(self) -> None:
        self.steps, self.applied, self.layers, self.keep_sum, self.layer_rate = 0, 0, 0.0, 0.0, 0.0

    def add(self, stats: dict[str, float]) -> None:
        self.steps += 1
        self.layers += stats["layers"]
        self.layer_rate = stats["layer_rate"]
        if stats["applied"]:
            self.applied += 1
            self.keep_sum += stats["keep_fraction"]

    def flush(self, prefix: str = "cdb/") -> dict[str, float]:
        """The means as ``{prefix + name: value}`` ({} when no step was added); starts a new window."""
        if not self.steps:
            return {}
        means = {"applied": self.applied / self.steps, "layers": self.layers / self.steps,
                 "keep_fraction": self.keep_sum / self.applied if self.applied else 1.0,
                 "layer_rate": self.layer_rate}
        self.__init__()
        return {prefix + name: value for name, value in means.items()}


@contextlib.contextmanager
def _one_cpu_thread(work: list[_Selected]) -> Iterator[None]:
    """Run CDB's CPU kernels on the calling thread only.

    They are many small, memory-bound fills and row copies: splitting each over intra-op threads costs
    more in wake-ups than it saves (on a 2-core machine it doubled their time). The results do not
    depend on the thread count; the setting (per calling thread under OpenMP) is restored afterwards.
    """
    threads = torch.get_num_threads()
    if threads == 1 or not any(sel.param.device.type == "cpu" for sel in work):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


#: torch optimizers whose update of each element reads only that element's gradient and state (what
#: exact mode relies on to skip zeroing the rows it restores). Exact types: a subclass may mix elements.
_ELEMENTWISE_OPTIMIZERS = frozenset({
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
    torch.optim.Adagrad, torch.optim.RMSprop, torch.optim.Adadelta, torch.optim.Rprop, torch.optim.ASGD,
})


def _is_per_element(value: Any, param: torch.Tensor) -> bool:
    """Optimizer state that has one entry per weight element (momentum, Adam moments, ...)."""
    return isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 0


#: Attributes under which optimizer wrappers expose the optimizer they wrap (timm's Lookahead:
#: ``_base_optimizer``; SAM-style wrappers: ``base_optimizer``; accelerate, torch-optimizer's Lookahead:
#: ``optimizer``).
_INNER_OPTIMIZER_ATTRIBUTES = ("base_optimizer", "_base_optimizer", "optimizer")

#: Optimizer state born as a copy of the weight (Lookahead's slow weights: timm, torch-optimizer): when a step
#: creates it, the dropped rows get the weight's unchanged rows, as if it had been created without them.
_CREATED_AS_WEIGHT_COPY = frozenset({"lookahead_slow_buff", "slow_param"})

#: The param-group entry that carries CDB's step counter inside the optimizer's own state_dict.
_STEP_KEY = "cdb_step"


def _optimizer_chain(optimizer: Any) -> list[torch.optim.Optimizer]:
    """``[outermost wrapper, ..., innermost torch.optim.Optimizer]`` behind ``optimizer``.

    accelerate's ``AcceleratedOptimizer`` only forwards (skipping AMP-overflow steps) and is left out; any
    other optimizer exposing an inner one is a wrapper with an update of its own.
    """
    chain = [optimizer]
    while True:
        current = chain[-1]
        found = [(name, getattr(current, name, None)) for name in _INNER_OPTIMIZER_ATTRIBUTES]
        found = [(name, inner) for name, inner in found if inner is not None and inner is not current]
        if not found:
            break
        name, inner = found[0]
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"{type(current).__name__}.{name} is a {type(inner).__name__}, not a "
                            "torch.optim.Optimizer: ChannelDropBack cannot see or mask the update it makes; attach "
                            "CDB to a torch optimizer (or a wrapper of one)")
        if any(inner is seen for seen in chain):
            break
        chain.append(inner)
    if not isinstance(chain[-1], torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, or a wrapper exposing one as "
                        f"{'/'.join(_INNER_OPTIMIZER_ATTRIBUTES)}; got {type(optimizer).__name__}")
    hidden = [name for name, value in vars(chain[-1]).items() if isinstance(value, torch.optim.Optimizer)]
    if hidden:
        raise TypeError(f"{type(chain[-1]).__name__} wraps an optimizer under .{hidden[0]}, where ChannelDropBack "
                        f"does not look for one (it follows {'/'.join(_INNER_OPTIMIZER_ATTRIBUTES)}): it could not "
                        "mask that optimizer's update or restore its state; attach CDB to that inner optimizer instead "
                        "if the wrapper adds no update of its own")
    while len(chain) > 1 and type(chain[0]).__module__.split(".")[0] == "accelerate":
        chain.pop(0)
    return chain


#: The ChannelDropBack objects that watch every optimizer step of the process (weakly held: a WeakSet defers the
#: removal of a collected one while it is being iterated, which removing a global hook would not).
_WATCHED: weakref.WeakSet = weakref.WeakSet()
_WATCH_HOOK: list = []


def _watch_steps(cdb: ChannelDropBack) -> None:
    """Have ``cdb`` see every optimizer step of the process (one global post-step hook for all of them)."""
    if not _WATCH_HOOK:
        def after_any_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for watcher in list(_WATCHED):
                watcher._after_any_step(optimizer)

        _WATCH_HOOK.append(register_optimizer_step_post_hook(after_any_step))
    _WATCHED.add(cdb)


def _optimizer_states(chain: list[torch.optim.Optimizer]) -> list[dict]:
    """The distinct per-parameter state dicts of the optimizers in ``chain``."""
    states: list[dict] = []
    for optimizer in chain:
        state = getattr(optimizer, "state", None)
        if isinstance(state, dict) and not any(state is seen for seen in states):
            states.append(state)
    return states


def _group_step(optimizer: torch.optim.Optimizer) -> int | None:
    """CDB's step as stored in ``optimizer``'s param groups (None when no group carries it)."""
    for group in optimizer.param_groups:
        if _STEP_KEY in group:
            return int(group[_STEP_KEY])
    return None


class _StepFrame:
    """Frames the outermost optimizer's ``step`` (an instance attribute, as torch's LR schedulers do) so CDB
    draws and snapshots before the wrapper does anything and restores after its whole step."""

    def __init__(self, optimizer: Any, cdb: ChannelDropBack) -> None:
        self._optimizer, self._original = optimizer, optimizer.step
        self._active = True
        frame = self

        def step(owner: Any, *args: Any, **kwargs: Any) -> Any:
            if not frame._active or cdb._in_step:
                return frame._original(*args, **kwargs)
            cdb._begin(cdb._chain, framed_outside=True)
            if cdb._chain[0] is cdb._chain[-1]:  # no inner optimizer whose pre-hook would mask
                cdb._mask()
            try:
                result = frame._original(*args, **kwargs)
            except BaseException:
                cdb._snapshots, cdb._work, cdb._in_step = [], [], False
                raise
            cdb.after_step()
            return result

        # A bound method, as torch's LR schedulers expect when they wrap optimizer.step after us, with the
        # signature of the step it frames (``__wrapped__``: the function, since the method binds the owner); and
        # the mark of a scheduler that wrapped it before us, so that it does not warn that step() was overridden.
        step.__wrapped__ = getattr(self._original, "__func__", self._original)
        if getattr(self._original, "_wrapped_by_lr_sched", False):
            step._wrapped_by_lr_sched = True
        self._step = types.MethodType(step, optimizer)
        optimizer.step = self._step

    def remove(self) -> None:
        self._active = False
        if self._optimizer.__dict__.get("step") is self._step:  # nobody wrapped it after us
            del self._optimizer.step


def _bare_model(model: nn.Module) -> nn.Module:
    """``model`` without the wrappers that only forward to it (DDP, DataParallel, ``torch.compile``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


#: Name segments that wrappers put inside a model: FSDP1, activation checkpointing, torch.compile.
_WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def _bare_name(name: str) -> str:
    """A parameter name as the bare model spells it."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def _caller_stacklevel(frame: types.FrameType | None) -> int:
    """``warnings.warn``'s stacklevel that names the caller's line: the first frame outside this module and the
    installed libraries, counted from ``frame``, the frame that calls ``warnings.warn`` (``sys._getframe()``).

    Between a loop's ``optimizer.step()`` and the warning lie torch's step wrapper, its hooks and ``no_grad``
    wrappers, as many as the path (hooks, explicit calls, a framed wrapper) takes: a fixed stacklevel would point
    into torch on some of them.
    """
    paths = sysconfig.get_paths()
    libraries = tuple({os.path.join(paths[key], "") for key in ("stdlib", "platstdlib", "purelib", "platlib")})
    level = 1
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.startswith(libraries)):
        frame, level = frame.f_back, level + 1
    return level


def _preview(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} in all)"

