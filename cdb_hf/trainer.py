"""The public Trainer classes: :class:`CDBTrainer` and the :class:`ResumeSafeTrainer` it builds on.

:class:`ResumeSafeTrainer` loads checkpoints through the model's own ``from_pretrained`` path and checks they
match the model (transformers 5.24's Trainer drops ViT weights on resume, transformers#43701);
:class:`CDBTrainer` also places each :class:`~cdb_hf.callback.ChannelDropBackCallback` ahead of the
``report_to`` integrations, so its ``cdb/*`` statistics reach every tracker, and brings cdb_hf's optimizer
settings. The CLI's Trainer face (:mod:`cdb_hf.trainer_path`) runs a subclass of it.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer
from transformers.trainer_utils import has_length
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, logging

from .callback import ChannelDropBackCallback, cdb_trial_params, place_before_integrations
from .checks import check_lr_schedule
from .errors import UsageError
from .optimization import build_lr_scheduler, decay_parameter_names
from .resume import checkpoint_load_error

__all__ = ["CDBTrainer", "ResumeSafeTrainer", "load_checkpoint_weights"]

logger = logging.get_logger(__name__)


def load_checkpoint_weights(model: PreTrainedModel, checkpoint_dir: str | os.PathLike) -> None:
    """Copy the weights of a ``save_pretrained`` checkpoint into ``model``, bitwise and completely.

    ``save_pretrained`` writes legacy key names for some architectures (ViT's ``attention.attention.query``)
    that only ``from_pretrained`` converts back; a plain ``load_state_dict`` misses them. Loading a twin
    through ``from_pretrained`` and copying its state dict with ``strict=True`` gets every tensor, and a
    checkpoint of another model (missing, unexpected or differently shaped weights) is refused.
    """
    try:
        twin, info = type(model).from_pretrained(checkpoint_dir, config=copy.deepcopy(model.config),
                                                 output_loading_info=True)
    except Exception as error:  # safetensors, OSError, ... : a damaged file
        raise checkpoint_load_error(checkpoint_dir, "its model weights", error) from error
    problems = {kind: info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if info.get(kind)}
    if problems:
        detail = "; ".join(f"{kind.replace('_', ' ')}: {_preview(list(keys))}" for kind, keys in problems.items())
        raise UsageError(f"checkpoint {str(checkpoint_dir)!r} does not hold this model's weights ({detail})")
    model.load_state_dict(twin.state_dict(), strict=True)


class ResumeSafeTrainer(Trainer):
    """A ``Trainer`` whose resume (and ``load_best_model_at_end``) restores every weight, or refuses.

    transformers 5.24's ``Trainer._load_from_checkpoint`` loads checkpoint files with a plain
    ``load_state_dict(strict=False)``, so keys saved under legacy names (ViT, transformers#43701)
    silently keep their current values. For ordinary (non-PEFT, non-FSDP/DeepSpeed) models this class
    loads through :func:`load_checkpoint_weights` instead. A damaged checkpoint (truncated weights, an
    optimizer file that a safe ``weights_only`` load refuses) is a :class:`~cdb_hf.preflight.UsageError`
    naming the file, never a suggestion to load it unsafely.
    """

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = model if model is not None else self.model
        if self._loads_through_from_pretrained(target, resume_from_checkpoint):
            logger.info(f"Loading model weights from {resume_from_checkpoint} through from_pretrained.")
            load_checkpoint_weights(target, resume_from_checkpoint)
        else:
            _load_or_refuse(super()._load_from_checkpoint, resume_from_checkpoint, "its model weights", model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        _load_or_refuse(super()._load_optimizer_and_scheduler, checkpoint, "its optimizer or scheduler state")

    def _load_rng_state(self, checkpoint: str | None) -> None:
        _load_or_refuse(super()._load_rng_state, checkpoint, "its random-number-generator state")

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is not None and self._loads_through_from_pretrained(self.model, best):
            logger.info(f"Loading best model from {best} (score: {self.state.best_metric}).")
            load_checkpoint_weights(self.model, best)
        else:
            super()._load_best_model()

    def _loads_through_from_pretrained(self, model, checkpoint: str) -> bool:
        return (isinstance(model, PreTrainedModel) and not getattr(model, "peft_config", None)
                and not self.is_deepspeed_enabled and not self.is_fsdp_enabled
                and os.path.isfile(os.path.join(checkpoint, "config.json"))
                and (os.path.isfile(os.path.join(checkpoint, SAFE_WEIGHTS_NAME))
                     or os.path.isfile(os.path.join(checkpoint, SAFE_WEIGHTS_INDEX_NAME))))


class CDBTrainer(ResumeSafeTrainer):
    """:class:`ResumeSafeTrainer` that places every :class:`ChannelDropBackCallback` it is given ahead of
    the ``report_to`` integrations, so the ``cdb/*`` statistics reach every tracker.

    ``run_args`` (a :class:`~cdb_hf.arguments.RunArguments`, optional) brings cdb_hf's optimizer settings,
    built by :mod:`cdb_hf.optimization` exactly as the accelerate loop builds them: ``weight_decay_all``
    (decay every parameter) and ``lr_schedule="multistep"`` (the official MultiStepLR at epoch milestones).
    """

    def __init__(self, *args: Any, run_args: Any = None, **kwargs: Any) -> None:
        self.run_args = run_args
        self._steps_per_epoch: int | None = None
        super().__init__(*args, **kwargs)
        if run_args is not None:  # the CLI checked this already; a script building the Trainer itself has not
            check_lr_schedule(run_args, self.args)
        for callback in list(self.callback_handler.callbacks):
            if isinstance(callback, ChannelDropBackCallback):
                place_before_integrations(self, callback)

    def _hp_search_setup(self, trial: Any) -> None:
        """A search trial's ``cdb``/``cdb_*`` parameters go to the ChannelDropBack callbacks (which build the
        trial's config from them), not to ``TrainingArguments``, which would drop them with a warning."""
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, ChannelDropBackCallback)]
        params = self._trial_params(trial) if self.hp_search_backend is not None and trial is not None else {}
        cdb_params = cdb_trial_params(params)
        if cdb_params and not callbacks:
            raise UsageError(f"the hyperparameter search sets {sorted(cdb_params)} but this Trainer has no "
                             "ChannelDropBackCallback to apply them; pass callbacks=[ChannelDropBackCallback()]")
        for callback in callbacks:
            callback.trial_params = cdb_params if trial is not None else None
        if not cdb_params:
            return super()._hp_search_setup(trial)
        if isinstance(trial, dict):  # ray, wandb: the trial is its parameters
            super()._hp_search_setup({k: v for k, v in trial.items() if k not in cdb_params})
            self._trial = trial
            return None
        hp_space = self.hp_space  # optuna: the parameters come from hp_space(trial)
        self.hp_space = lambda t: {k: v for k, v in hp_space(t).items() if k not in cdb_params}
        try:
            return super()._hp_search_setup(trial)
        finally:
            self.hp_space = hp_space

    def _trial_params(self, trial: Any) -> dict[str, Any]:
        """The parameters ``Trainer._hp_search_setup`` assigns for ``trial`` (the same source per backend)."""
        if isinstance(trial, dict):
            return dict(trial)
        return dict(self.hp_space(trial))

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        return decay_parameter_names(model, bool(getattr(self.run_args, "weight_decay_all", False)))

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's estimate (``total_flos``), with the parameter count taken once per model.

        The Trainer recounts the parameters at every step, a Python walk over all of them that cost a
        few ms a step on a small CPU; the count does not change while training.
        """
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        cached = getattr(self, "_num_parameters_cache", None)
        if cached is None or cached[0] is not self.model:
            cached = (self.model, self.model.num_parameters(exclude_embeddings=True))
            self._num_parameters_cache = cached
        return 6 * inputs[main_input].numel() * cached[1]

    def set_initial_training_values(self, args, dataloader, *rest: Any, **kwargs: Any):
        values = super().set_initial_training_values(args, dataloader, *rest, **kwargs)
        # The Trainer's own count (None without a dataloader length): the epoch the lr milestones refer to.
        self._steps_per_epoch = values[1] if has_length(dataloader) else None
        return values

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None and getattr(self.run_args, "lr_schedule", "trainer") != "trainer":
            self.lr_scheduler = build_lr_scheduler(optimizer if optimizer is not None else self.optimizer,
                                                   self.args, self.run_args, num_training_steps, self._steps_per_epoch)
            self._created_lr_scheduler = True
        return super().create_scheduler(num_training_steps, optimizer)


def _load_or_refuse(load, checkpoint: str | None, what: str, *args: Any) -> None:
    try:
        load(checkpoint, *args)
    except UsageError:
        raise
    except Exception as error:
        raise checkpoint_load_error(checkpoint, what, error) from error


def _preview(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(str(n)) for n in names[:limit])
    return f"{shown}{', ...' if len(names) > limit else ''} ({len(names)})"
