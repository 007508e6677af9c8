"""ChannelDropBack as a transformers ``TrainerCallback``: the Trainer face of :mod:`cdb_hf.core`.

Usage with any ``Trainer`` (ours or yours)::

    trainer = Trainer(model=model, args=args, ...)
    add_channel_drop_back(trainer, ChannelDropBackConfig(channel_rate=0.3))

or ``Trainer(..., callbacks=[ChannelDropBackCallback(config)])``. Both apply CDB identically (reach the core
as ``callback.cdb`` once training has begun). They differ
in where the ``cdb/*`` statistics go: ``Trainer.log`` hands each log to the ``report_to`` integrations
(TensorBoard, W&B, ...) before user callbacks, so a callback passed in ``callbacks=`` adds its statistics
to ``state.log_history`` and the console only; :func:`add_channel_drop_back` (and
:class:`~cdb_hf.trainer.CDBTrainer`, which does the same for callbacks it is given) places the
callback ahead of the integrations, so the statistics reach every tracker too.

Order against gradient clipping. In one optimizer step the Trainer (1) runs every micro-batch's
backward, (2) clips the full gradient to ``max_grad_norm`` and logs the norm measured *before*
clipping (``grad_norm``), (3) calls ``optimizer.step()``. CDB's hooks sit on the optimizer's step,
so they run inside (3): after clipping and after AMP unscaling. CDB therefore masks (and, with
``rescale``, scales up by 1/keep) an already clipped gradient; the logged ``grad_norm`` is the
unmasked one, and the selected layer's effective norm may exceed ``max_grad_norm`` after rescaling.
The accelerate loop uses the same order.

Resume. The selection of optimizer step ``s`` is a pure function of ``(seed, s)``, and the callback
sets ``cdb.step = state.global_step`` before every step, so a resumed run draws exactly the rows the
uninterrupted run would have drawn; nothing beyond the Trainer's own ``trainer_state.json`` has to be
restored (the step also rides in ``optimizer.pt``, in the optimizer's param groups) (the callback is also an ``ExportableState`` for visibility, but does not depend on
``restore_callback_states_from_checkpoint``).

Hyperparameter search. ``cdb`` and ``cdb_*`` keys in a trial's parameters (``Trainer.hyperparameter_search``
with optuna, ray or wandb) configure that trial's CDB: at ``on_train_begin`` the callback applies them on top
of its own config, through the CLI's ``CDBArguments`` and ``to_config`` (so the same names and checks), and
``cdb: false`` makes the trial a baseline. :class:`~cdb_hf.trainer.CDBTrainer` hands them over exactly as
its ``hp_space`` returned them (and keeps them out of ``TrainingArguments``, which has no such fields); any
other Trainer passes them through ``state.trial_params`` (optuna: name each suggestion after its key).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback, ExportableState
from transformers.utils import logging

from .arguments import CDB_PREFIX, CDBArguments
from .checks import check_supported_setup
from .core import ChannelDropBack, ChannelDropBackConfig, StatsWindow
from .errors import UsageError, usage_errors

if TYPE_CHECKING:  # an annotation only: importing transformers.Trainer loads datasets and pyarrow
    from transformers import Trainer

__all__ = ["ChannelDropBackCallback", "LOG_PREFIX", "add_channel_drop_back", "cdb_trial_params",
           "place_before_integrations", "trial_config"]

logger = logging.get_logger(__name__)

#: Prefix of the statistics the callback adds to the Trainer's training logs.
LOG_PREFIX = "cdb/"

class ChannelDropBackCallback(TrainerCallback, ExportableState):
    """Apply ChannelDropBack inside any transformers ``Trainer``.

    When training begins it builds :class:`~cdb_hf.core.ChannelDropBack` from the Trainer's model and
    attaches it to the Trainer's optimizer, so every optimizer step (once per gradient-accumulation
    window) updates only the selected rows. It adds ``cdb/applied`` (fraction of steps that applied
    CDB), ``cdb/layers`` (mean selected layers per step), ``cdb/keep_fraction`` (mean kept fraction
    of the selected layers) and ``cdb/layer_rate`` (scheduled rate) to every training log: they reach
    ``state.log_history`` and the console always, and the ``report_to`` integrations when the callback
    was added with :func:`add_channel_drop_back` (or given to :class:`~cdb_hf.trainer.CDBTrainer`).

    Args:
        config: the CDB knobs (a :class:`ChannelDropBackConfig` or its ``to_dict()``); the paper's
            defaults when omitted. A ``schedule_total_steps`` left ``None`` is filled from the
            Trainer's ``max_steps`` (and ``schedule_steps_per_epoch`` from the dataloader).
    """

    def __init__(self, config: ChannelDropBackConfig | dict[str, Any] | None = None) -> None:
        if isinstance(config, dict):
            config = ChannelDropBackConfig.from_dict(config)
        self.config = config if config is not None else ChannelDropBackConfig()
        self.cdb: ChannelDropBack | None = None
        #: CDB's step at the last export (informational; trainer_state.json's global_step is what resumes).
        self.cdb_step: int = 0
        self._handle = None
        #: Set by :func:`place_before_integrations`: the statistics then reach the report_to trackers.
        self.reaches_trackers = False
        self._window = StatsWindow()
        #: The current hyperparameter-search trial's cdb/cdb_* values, set by CDBTrainer (None: read
        #: state.trial_params); ``_baseline_trial`` is True while a ``cdb: false`` trial trains.
        self.trial_params: dict[str, Any] | None = None
        self._baseline_trial = False

    # ------------------------------------------------------------------ checkpoint visibility
    def state(self) -> dict[str, Any]:
        """JSON-serialisable state written into each checkpoint's ``trainer_state.json``."""
        step = self.cdb.step if self.cdb is not None else self.cdb_step
        config = self.cdb.config if self.cdb is not None else self.config
        return {"args": {"config": config.to_dict()}, "attributes": {"cdb_step": int(step)}}

    # ------------------------------------------------------------------ lifecycle
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        check_supported_setup(args)  # fail at Trainer(...) already, before any work

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model=None, optimizer=None, train_dataloader=None, **kwargs):
        check_supported_setup(args)
        if model is None or optimizer is None:
            raise ValueError("ChannelDropBackCallback needs the Trainer's model and optimizer at on_train_begin; "
                             f"got model={type(model).__name__}, optimizer={type(optimizer).__name__}")
        _refuse_sharded_model(model)
        if self._handle is not None:  # a second train() on the same Trainer: start from a clean optimizer
            self._handle.remove()
            self._handle = None
        params = self.trial_params if self.trial_params is not None else cdb_trial_params(state.trial_params)
        config = trial_config(self.config, params) if params else self.config
        self._baseline_trial = config is None
        if config is None:
            self.cdb = None
            logger.info(f"ChannelDropBack is off for this trial ({params})")
            return
        self.cdb = ChannelDropBack(model, self._run_config(config, state, args, train_dataloader))
        self._handle = self.cdb.attach(optimizer)
        self.cdb.step = state.global_step
        self._window = StatsWindow()
        logger.info(f"ChannelDropBack on {len(self.cdb.layers)} layers, starting at optimizer step "
                    f"{state.global_step}: {self.cdb.config}")
        trackers = [name for name in (args.report_to or []) if name != "none"]
        if trackers and not self.reaches_trackers:
            logger.warning(f"cdb/* statistics go to state.log_history and the console but not to {trackers}: add the "
                           "callback with cdb_hf.add_channel_drop_back(trainer, config) (or use cdb_hf.CDBTrainer) "
                           "so that it runs before the report_to integrations")

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._baseline_trial:
            return
        if self.cdb is None:
            raise RuntimeError("ChannelDropBackCallback was added after training began; add it before train()")
        # The selection depends only on (seed, step): pinning the step to the Trainer's counter makes
        # resumed runs and every rank draw the same rows, whatever happened before.
        self.cdb.step = state.global_step

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          optimizer=None, **kwargs):
        if self._baseline_trial:
            return
        if self.cdb.stepped(state.global_step, getattr(optimizer, "step_was_skipped", False)):
            self._window.add(self.cdb.last_stats)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self._window.steps:
            return  # evaluation and end-of-training summaries carry no CDB statistics
        stats = self._window.flush(LOG_PREFIX)
        logs.update(stats)
        # Trainer.log appended a copy of `logs` to log_history just before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step \
                and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(stats)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.cdb is not None:
            self.cdb_step = self.cdb.step

    # ------------------------------------------------------------------ helpers
    def _run_config(self, config: ChannelDropBackConfig, state: TrainerState, args: TrainingArguments,
                    train_dataloader) -> ChannelDropBackConfig:
        """``config`` with the schedule's length filled from this run, when left open."""
        needs_epoch_length = (config.schedule != "constant" and config.schedule_unit == "epochs"
                              and config.schedule_steps_per_epoch is None)
        steps_per_epoch = _update_steps_per_epoch(args, train_dataloader) if needs_epoch_length else None
        return config.for_run(state.max_steps, steps_per_epoch)



def cdb_trial_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """The ``cdb`` and ``cdb_*`` entries of a hyperparameter-search trial's parameters."""
    return {key: value for key, value in (params or {}).items() if key == "cdb" or key.startswith(CDB_PREFIX)}


def trial_config(base: ChannelDropBackConfig, params: dict[str, Any]) -> ChannelDropBackConfig | None:
    """``base`` with a trial's ``cdb``/``cdb_*`` values applied, built as the CLI builds it (``CDBArguments``
    -> ``to_config``, which checks every value); None when the trial sets ``cdb`` false.

    Raises :class:`~cdb_hf.errors.UsageError` naming an unknown key or a bad value.
    """
    arguments = CDBArguments(cdb=True, **{CDB_PREFIX + name: value for name, value in base.to_dict().items()})
    unknown = sorted(set(params) - set(vars(arguments)))
    if unknown:
        raise UsageError(f"hyperparameter search key(s) {unknown} are not ChannelDropBack settings; the valid cdb "
                         f"keys are {', '.join(sorted(vars(arguments)))}")
    if not isinstance(params.get("cdb", True), bool):
        raise UsageError(f"hyperparameter search value cdb={params['cdb']!r} is not valid; it must be true or false")
    for key, value in params.items():
        setattr(arguments, key, value)
    with usage_errors():
        return arguments.to_config()


def place_before_integrations(trainer: Trainer, callback: ChannelDropBackCallback) -> None:
    """Put ``callback`` right after the Trainer's flow callback, ahead of the report_to integrations.

    ``Trainer.log`` hands one ``logs`` dict to every callback in list order, and the integrations are
    registered before user callbacks: statistics a later callback adds reach neither the trackers nor the
    console printer. Moving the callback to the front fixes that; nothing else depends on the order.
    """
    callbacks = trainer.callback_handler.callbacks
    if callback in callbacks:
        callbacks.remove(callback)
    position = 1 if callbacks and isinstance(callbacks[0], DefaultFlowCallback) else 0
    callbacks.insert(position, callback)
    callback.reaches_trackers = True


def add_channel_drop_back(trainer: Trainer, config: ChannelDropBackConfig | dict[str, Any] | None = None
                          ) -> ChannelDropBackCallback:
    """Apply ChannelDropBack in ``trainer`` (any ``transformers.Trainer``) with ``config``; return the callback.

    The callback goes ahead of the ``report_to`` integrations, so the ``cdb/*`` statistics reach every
    tracker as well as ``state.log_history``. Call it before ``trainer.train()``.
    """
    callback = ChannelDropBackCallback(config)
    place_before_integrations(trainer, callback)
    return callback


def _update_steps_per_epoch(args: TrainingArguments, train_dataloader) -> int:
    """Optimizer steps per epoch, computed the way the Trainer computes them."""
    accumulation = max(int(args.gradient_accumulation_steps), 1)
    try:
        batches = len(train_dataloader)
    except TypeError as error:  # an IterableDataset has no length, so it has no epoch boundaries either
        raise ValueError("schedule_unit='epochs' needs the number of optimizer steps per epoch, which a training "
                         "set without a length cannot give: set schedule_steps_per_epoch "
                         "(--cdb_schedule_steps_per_epoch) or use schedule_unit='steps'") from error
    return max(batches // accumulation + int(batches % accumulation > 0), 1)


def _refuse_sharded_model(model) -> None:
    """FSDP wrappers (FSDP1 classes, FSDP2 fully_shard) shard the rows CDB would select."""
    for module in model.modules():
        name = type(module).__name__
        if name == "FullyShardedDataParallel" or (name.startswith("FSDP") and hasattr(module, "reshard")):
            raise ValueError(f"ChannelDropBack does not support FSDP-sharded models (found {name}); train "
                             "without FSDP (plain DDP is supported)")
