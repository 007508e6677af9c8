"""The optimizer's parameter groups and the learning-rate schedule, one definition for both training paths.

The Trainer path (:class:`~cdb_hf.trainer.CDBTrainer`) and the accelerate loop both ask this module
which parameters are weight-decayed and which scheduler to step, so a recipe gives the same optimizer and
the same learning rate at every optimizer step whichever path runs it. Two settings exist to reproduce the
official ChannelDropBack scripts, which ``TrainingArguments`` cannot express:

* ``--weight_decay_all``: decay every parameter (the official optimizer), not only the Trainer's
  choice (biases and norm weights left out);
* ``--lr_schedule multistep``: torch's ``MultiStepLR`` stepped once per epoch (x ``lr_gamma`` at the
  ``lr_milestones`` epochs; unset, the official round(0.3E), round(0.6E), round(0.85E)), run here per
  optimizer step with each epoch milestone moved to the epoch's first optimizer step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

__all__ = ["OFFICIAL_LR_MILESTONE_FRACTIONS", "build_lr_scheduler", "build_optimizer", "decay_parameter_names",
           "lr_milestone_epochs", "lr_milestone_steps", "optimizer_steps_per_epoch"]

#: The official scripts' MultiStepLR milestones, as fractions of the epochs (``round(fraction * epochs)``).
OFFICIAL_LR_MILESTONE_FRACTIONS = (0.3, 0.6, 0.85)

# The Trainer's exclusions (Trainer.get_decay_parameter_names), kept for --weight_decay_all false.
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def decay_parameter_names(model: torch.nn.Module, weight_decay_all: bool = False) -> list[str]:
    """Names of the parameters that get ``weight_decay``: all of them (``weight_decay_all``, the official
    optimizer) or the Trainer's rule, which leaves biases and LayerNorm/norm weights undecayed."""
    if weight_decay_all:
        return [name for name, _ in model.named_parameters()]
    return get_parameter_names(model, [torch.nn.LayerNorm], _NO_DECAY_PATTERNS)


def build_optimizer(model: torch.nn.Module, args: TrainingArguments, weight_decay_all: bool = False
                    ) -> torch.optim.Optimizer:
    """The accelerate loop's optimizer: the Trainer's class and kwargs, and its decay groups (see
    :func:`decay_parameter_names`), so both paths optimise with the same groups."""
    decay = set(decay_parameter_names(model, weight_decay_all))
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay and p.requires_grad],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n not in decay and p.requires_grad],
         "weight_decay": 0.0},
    ]
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return optimizer_cls([group for group in groups if group["params"]], **optimizer_kwargs)


def optimizer_steps_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in an epoch of ``num_batches`` micro-batches: the Trainer's count, in which a
    shorter last accumulation window still makes a step."""
    return max(math.ceil(num_batches / max(int(gradient_accumulation_steps), 1)), 1)


def lr_milestone_epochs(milestones: list[int] | None, num_epochs: int) -> list[int]:
    """The epochs at which ``multistep`` multiplies the rate by ``lr_gamma`` (the first epoch at the lower
    rate): ``milestones`` as given, or the official ``round(f * num_epochs)`` for f = 0.3, 0.6, 0.85."""
    if milestones is not None:
        return [int(m) for m in milestones]
    return [round(num_epochs * fraction) for fraction in OFFICIAL_LR_MILESTONE_FRACTIONS]


def lr_milestone_steps(milestones: list[int] | None, max_steps: int, steps_per_epoch: int) -> list[int]:
    """The optimizer steps (0-based, the first step at the lower rate) of the epoch milestones of a run of
    ``max_steps`` steps, ``steps_per_epoch`` per epoch. Stepping a MultiStepLR once per optimizer step with
    these milestones gives every step the rate that epoch-wise stepping gives its epoch."""
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    return [epoch * steps_per_epoch for epoch in lr_milestone_epochs(milestones, num_epochs)]


def build_lr_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, run_args: Any,
                       max_steps: int, steps_per_epoch: int | None) -> torch.optim.lr_scheduler.LRScheduler:
    """The run's learning-rate scheduler, stepped once per optimizer step on both training paths.

    ``run_args.lr_schedule == "multistep"``: ``MultiStepLR`` at :func:`lr_milestone_steps`; otherwise
    ``TrainingArguments``' ``lr_scheduler_type`` (with its warmup), as the Trainer builds it.
    """
    if getattr(run_args, "lr_schedule", "trainer") == "multistep":
        if steps_per_epoch is None:
            raise ValueError("--lr_schedule multistep places its milestones at epoch boundaries, which a training "
                             "set without a length does not have; use --lr_schedule trainer")
        milestones = lr_milestone_steps(run_args.lr_milestones, max_steps, steps_per_epoch)
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=run_args.lr_gamma)
    return get_scheduler(args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.get_warmup_steps(max_steps),
                         num_training_steps=max_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})
