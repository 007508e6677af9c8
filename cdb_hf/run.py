"""One setup and one ending for the faces (the Trainer path, the accelerate loop, evaluation only).

A face reads::

    with RunSession(plan) as session:           # logging; buffers chatter; errors before training are bad input
        parts = prepare_run(plan)               # data, labels, model, processor, transforms, checks
        ...build the Trainer / the Accelerator, optimizer, CDB...
        session.open_run_dir()                  # only now may output_dir change (transactionally)
        ...load the resume checkpoint...
        session.ready()
        ...train, with a DivergenceGuard read at logging, saving and the end...
        session.finish(parts, model, ...)       # outputs, card, push; then the run is complete

and a failure anywhere inside restores what ``--output_dir`` held (:func:`failed_run`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import set_seed

from . import evaluation, image_check, sources, train_set, transforms
from .checks import check_cdb_against_model
from .core import ChannelDropBackConfig
from .errors import UsageError, usage_errors
from .evaluation import FinalEvaluation
from .hub import push_outputs, save_merged_model, save_outputs, write_model_card
from .models import check_image_size, check_lora_targets, load_model_and_processor
from .perf import apply_memory_format
from .plan import RunPlan
from .preemption import PREEMPTION, Preempted
from .run_dir import RunDirectory, read_checkpoint_record

__all__ = ["DivergenceGuard", "PredictSet", "RunParts", "RunSession", "Startup", "TrainingDiverged", "failed_run",
           "finish_run", "load_predict_set", "open_run_dir", "prepare_run", "setup_logging",
           "write_evaluation_files"]

logger = logging.getLogger(__name__)

#: Loggers whose records are held back until the run has started (see :class:`Startup`).
_BUFFERED_LOGGERS = ("", "transformers", "datasets", "accelerate", "cdb_hf", "timm", "huggingface_hub")


class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite: the run stops, keeping its last good checkpoint."""


@dataclass
class RunParts:
    """What :func:`prepare_run` loads for a face: data, model and the objects built from them."""

    labels: list[str]
    model: torch.nn.Module
    image_processor: Any
    train_dataset: train_set.TrainImages
    eval_dataset: Any
    collate_fn: Any
    #: Corrupt images left out by ``--corrupt_images skip``, by split ("train", "validation").
    skipped_images: dict[str, int] = field(default_factory=dict)
    #: ``--do_predict``: what to predict at the end (None: nothing).
    predict: PredictSet | None = None


@dataclass
class PredictSet:
    """The images ``--do_predict`` predicts: each example is ``{"pixel_values"}``; ``keys`` name the rows of
    ``predictions.csv`` (``key_name`` is ``file``, a path relative to ``--predict_dir``, or ``index``)."""

    key_name: str
    keys: list[Any]
    dataset: Any
    collate_fn: Any = transforms.collate_pixels
    #: each image's true class name, when the predicted split has class labels (``predictions.csv``'s ``label``)
    true_labels: list[str] | None = None


# ------------------------------------------------------------------------------------------------ session
class RunSession:
    """A face's shared frame: logging, held-back start-up logs, the run folder, failure and the ending.

    One object instead of loose helpers and a holder list, so the order that keeps user data safe
    (check everything, then open the folder, then train, then complete) lives in one place.
    ``kind`` is the run marker's kind (``"run"``, or the evaluation-only kind).
    """

    def __init__(self, plan: RunPlan, kind: str = "run") -> None:
        self.plan, self.kind = plan, kind
        self.run_dir: RunDirectory | None = None
        self._opened: list[RunDirectory] = []
        self._startup: Startup | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> RunSession:
        args = self.plan.training
        setup_logging(args)
        with self._stack as stack:  # failed_run outside Startup: it sees the UsageError that Startup makes
            stack.enter_context(failed_run(self._opened))
            self._startup = stack.enter_context(Startup(hold_back=args.get_process_log_level() > logging.DEBUG))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        return self._stack.__exit__(kind, error, traceback)

    @property
    def started(self) -> bool:
        """Whether :meth:`ready` was called (errors are then failures, not bad input)."""
        return self._startup.started

    def ready(self) -> None:
        """Training is about to begin: print the held-back start-up logs (see :class:`Startup`)."""
        self._startup.ready()

    def open_run_dir(self) -> RunDirectory:
        """Make ``output_dir`` this run's (see :func:`open_run_dir`); from here a failure restores it."""
        self.run_dir = open_run_dir(self.plan, self.kind)
        self._opened.append(self.run_dir)
        return self.run_dir

    def preempted(self, step: int) -> Preempted:
        """The exception to raise after ``checkpoint-<step>`` was written at a preemption signal."""
        return preempted(self.plan, step)

    def finish(self, parts: RunParts, model: torch.nn.Module, cdb_config: ChannelDropBackConfig | None,
               metrics: dict[str, float], **records: Any) -> None:
        """Write the outputs and complete the run (:func:`finish_run`; main process)."""
        finish_run(self.plan, self.run_dir, parts, model, cdb_config, metrics, **records)

    def complete(self) -> None:
        """Mark the run complete, for a face that wrote its own outputs (evaluation only; main process)."""
        self.run_dir.complete()


# ------------------------------------------------------------------------------------------------ start-up
class Startup:
    """Hold back log records and warnings until the run has started, and classify errors until then.

    Loading a model and data prints tens of lines; when the input turns out to be bad, the error must
    be the one line a user sees. Records are kept in memory and replayed by :meth:`ready` (called right
    before the first training step); on failure they are dropped. ``ValueError``/``OSError``/
    ``ImportError`` raised before :meth:`ready` are bad input and become :class:`UsageError`.
    With ``--log_level debug`` nothing is held back.
    """

    def __init__(self, hold_back: bool = True) -> None:
        self.hold_back = hold_back
        self.started = False
        self._records: list[logging.LogRecord] = []
        self._warnings: list[warnings.WarningMessage] = []
        self._saved: dict[str, tuple[list[logging.Handler], bool]] = {}
        self._catcher = None

    def __enter__(self) -> Startup:
        if self.hold_back:
            collector = _Collector(self._records)
            for name in _BUFFERED_LOGGERS:
                target = logging.getLogger(name)
                self._saved[name] = (target.handlers[:], target.propagate)
                target.handlers = [collector]
                target.propagate = False
            self._catcher = warnings.catch_warnings(record=True)
            self._warnings = self._catcher.__enter__()
            warnings.simplefilter("default")
            self._progress_bar = _transformers_progress_bar(False)
        return self

    def ready(self) -> None:
        """Training is about to begin: print what was held back; later errors are failures, not input."""
        self._release(replay=True)
        self.started = True

    def __exit__(self, kind, error, traceback) -> bool:
        self._release(replay=self.started or error is None)
        if error is not None and not self.started and not isinstance(error, UsageError) \
                and isinstance(error, (ValueError, OSError, ImportError)):
            raise UsageError(" ".join(str(error).split()) or type(error).__name__) from error
        return False

    def _release(self, replay: bool) -> None:
        if not self._saved:
            return
        for name, (handlers, propagate) in self._saved.items():
            target = logging.getLogger(name)
            target.handlers, target.propagate = handlers, propagate
        self._saved = {}
        self._catcher.__exit__(None, None, None)
        _transformers_progress_bar(self._progress_bar)
        if replay:
            for record in self._records:
                logging.getLogger(record.name).handle(record)
            for caught in self._warnings:
                warnings.showwarning(caught.message, caught.category, caught.filename, caught.lineno)
        self._records, self._warnings = [], []


class _Collector(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _transformers_progress_bar(enabled: bool) -> bool:
    """Turn transformers' progress bars (weight loading) on or off; return whether they were on."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    return was_enabled


def setup_logging(training_args) -> None:
    """The logging of transformers' example scripts: one format; info on the main process, and the libraries
    at ``log_level`` (main process) / ``log_level_replica`` (the others)."""
    import datasets
    import transformers

    main = PartialState().is_local_main_process
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=logging.INFO if main else logging.WARNING)
    level = training_args.get_process_log_level()
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    # --disable_tqdm true means no bars at all: also transformers' own ("Writing model shards" at each save).
    _transformers_progress_bar(not training_args.disable_tqdm)


# ------------------------------------------------------------------------------------------------ setup
def prepare_run(plan: RunPlan) -> RunParts:
    """Load and check everything a face trains on; nothing is written to ``output_dir``.

    Data -> labels -> model and processor -> CDB against the model -> memory format -> transforms ->
    per-example seeded training set. Every check that needs the data or the model runs here.
    """
    model_args, data_args, run_args, args = plan.model, plan.data, plan.run, plan.training
    state = PartialState()
    with usage_errors():
        check_image_size(model_args)  # reads only the config: fail before a large dataset loads
        check_lora_targets(model_args)  # the same, on a model built on the meta device
        set_seed(args.seed)  # a new classification head is drawn from the global RNG
        skipped_images: dict[str, int] = {}
        if getattr(data_args, "streaming", False):
            return _prepare_streaming_run(plan, skipped_images)
        # The main process fills the datasets cache and the image-check cache first; the others read both.
        with state.main_process_first():
            dataset = sources.load_image_datasets(data_args, seed=args.seed, cache_dir=model_args.cache_dir,
                                                      token=model_args.token, skipped_images=skipped_images)
        labels = dataset["train"].features["label"].names
        _warn_about_unseen_classes(dataset, labels)
        _check_enough_examples(len(dataset["train"]), args, state.num_processes)
        model, image_processor = load_model_and_processor(model_args, labels)
        check_cdb_against_model(model, plan.cdb_config)
        apply_memory_format(model, run_args.channels_last)  # before the optimizer, so its state shares the layout
        train_transform, _ = transforms.build_transforms(image_processor, data_args.train_augmentation)
        # Each example's augmentation is drawn from its own (seed, epoch, index) stream, so prefetching and a
        # resume's skipped batches cannot shift it; the images are decoded once when they fit in memory.
        train_dataset = train_set.TrainImages(dataset["train"], train_transform, seed=train_set.data_seed(args),
                                                cache_bytes=data_args.train_image_cache_mb * 2**20)
        eval_dataset = transforms.apply_eval_transform(dataset["validation"], image_processor)
    predict = load_predict_set(plan, image_processor) if args.do_predict else None
    return RunParts(labels=labels, model=model, image_processor=image_processor, train_dataset=train_dataset,
                    eval_dataset=eval_dataset, collate_fn=transforms.collate_fn, predict=predict,
                    skipped_images=skipped_images)


def _prepare_streaming_run(plan: RunPlan, skipped_images: dict[str, int]) -> RunParts:
    """:func:`prepare_run` for ``--streaming``: streams opened (no image read), this rank's training stream."""
    from . import streaming

    model_args, data_args, run_args, args = plan.model, plan.data, plan.run, plan.training
    state = PartialState()
    streams = streaming.open_streams(data_args, seed=args.seed, cache_dir=model_args.cache_dir, token=model_args.token)
    model, image_processor = load_model_and_processor(model_args, streams.labels)
    check_cdb_against_model(model, plan.cdb_config)
    apply_memory_format(model, run_args.channels_last)
    train_transform, eval_transform = transforms.build_transforms(image_processor, data_args.train_augmentation)
    train_dataset = streaming.StreamTrainImages(
        streams.train, train_transform, train_set.data_seed(args), buffer_size=data_args.shuffle_buffer_size,
        rank=state.process_index, world_size=state.num_processes, corrupt_images=data_args.corrupt_images,
        source=streams.source, skipped=skipped_images)
    eval_dataset = streaming.StreamEvalImages(streams.validation, eval_transform,
                                              corrupt_images=data_args.corrupt_images, source=streams.source,
                                              skipped=skipped_images)
    predict = load_predict_set(plan, image_processor) if args.do_predict else None
    return RunParts(labels=streams.labels, model=model, image_processor=image_processor, train_dataset=train_dataset,
                    eval_dataset=eval_dataset, collate_fn=transforms.collate_fn, predict=predict,
                    skipped_images=skipped_images)


def load_predict_set(plan: RunPlan, image_processor) -> PredictSet:
    """``--predict_dir`` / ``--predict_split_name`` through the checkpoint's evaluation preprocessing."""
    with usage_errors():
        key_name, keys, dataset, true_labels = sources.load_predict_images(
            plan.data, cache_dir=plan.model.cache_dir, token=plan.model.token)
        return PredictSet(key_name, keys, transforms.apply_eval_transform(dataset, image_processor),
                          true_labels=true_labels)


def _check_enough_examples(num_examples: int, args, world_size: int) -> None:
    """A training set smaller than one global batch with ``dataloader_drop_last`` gives no training step."""
    global_batch = args.per_device_train_batch_size * world_size
    if args.dataloader_drop_last and num_examples < global_batch:
        raise UsageError(f"the training set has {num_examples} example(s), fewer than one batch of {global_batch} "
                         "with --dataloader_drop_last true: the run would have no training step; lower "
                         "--per_device_train_batch_size or drop --dataloader_drop_last")


def _warn_about_unseen_classes(dataset, labels: list[str]) -> None:
    """A class in validation that train never shows (a tiny dataset, a carved split) can only be wrong."""
    present = {}
    for split in ("train", "validation"):
        present[split] = image_check.label_ids(dataset[split])
    unseen = sorted(present["validation"] - present["train"])
    if unseen:
        logger.warning(f"the validation split has class(es) with no training example: {[labels[i] for i in unseen]}; "
                       "their accuracy can only be 0 (use more data or a larger --train_val_split)")


# ------------------------------------------------------------------------------------------------ output dir
def open_run_dir(plan: RunPlan, kind: str = "run") -> RunDirectory:
    """Make ``output_dir`` this run's (main process; the others wait): from here on it may change."""
    run_dir = RunDirectory(plan.training.output_dir, plan.output_mode, kind=kind)
    state = PartialState()
    if state.is_main_process:
        for note in plan.notes:  # what pre-flight found: said once, and recorded in the run's marker
            logger.warning(f"note: {note}")
        run_dir.open(plan.notes)
        if plan.output_mode == "resume":
            remove_incomplete_checkpoints(plan)
    state.wait_for_everyone()
    return run_dir


def remove_incomplete_checkpoints(plan: RunPlan) -> None:
    """Delete the half-written checkpoints that the resume skipped (this tool's own, in this run's folder).

    Left in place, one would be saved over piecemeal at its step, or outrank the resumed run's complete
    checkpoints when ``save_total_limit`` rotates them out.
    """
    output_dir = Path(plan.training.output_dir).resolve()
    for checkpoint in plan.incomplete_checkpoints:
        path = Path(checkpoint).resolve()
        if path.parent == output_dir and path.is_dir() and read_checkpoint_record(path)[0] is None:
            logger.warning(f"removing incomplete checkpoint {checkpoint} before resuming")
            shutil.rmtree(path)


@contextlib.contextmanager
def failed_run(run_dir_holder: list[RunDirectory]):
    """On any failure after :func:`open_run_dir`, mark the run failed and, if it was replacing an earlier
    run, put that one back (main process). The exception goes on, with a note of what was kept."""
    try:
        yield
    except Preempted as error:
        if run_dir_holder and PartialState().is_main_process:
            kept = run_dir_holder[0].interrupt()
            if kept is not None:
                error.args = (f"{error.args[0]}; the earlier run it replaces is kept in {str(kept)!r} until the "
                              "continued run completes",)
        raise
    except BaseException as error:
        if run_dir_holder and PartialState().is_main_process:
            kept = run_dir_holder[0].fail()
            if run_dir_holder[0].mode == "replace":
                where = f"; the failed run's checkpoints are kept in {str(kept)!r}" if kept else ""
                note = f"the previous run in {str(run_dir_holder[0].output_dir)!r} was restored{where}"
                if isinstance(error, (UsageError, TrainingDiverged)):
                    message = str(error.args[0]) if error.args else str(error)
                    if kept:  # checkpoints the message names moved with the failed attempt
                        message = message.replace(str(run_dir_holder[0].output_dir) + os.sep, str(kept) + os.sep)
                    error.args = (f"{message}; {note}",)
                else:
                    logger.error(note)
        raise


def preempted(plan: RunPlan, step: int) -> Preempted:
    """The stop at a preemption signal, after ``checkpoint-<step>`` was written: one line on how to continue."""
    import signal

    signum = PREEMPTION.signum or signal.SIGTERM
    instead = " (instead of --overwrite_output_dir)" if plan.run.overwrite_output_dir else ""
    return Preempted(signum, f"stopped by {signal.Signals(signum).name} after optimizer step {step}: "
                             f"{os.path.join(plan.training.output_dir, f'checkpoint-{step}')} is complete and the run "
                             f"is marked interrupted; to continue, run the same command with --resume_from_checkpoint "
                             f"true{instead}")


# ------------------------------------------------------------------------------------------------ divergence
class DivergenceGuard:
    """Notices a non-finite loss or non-finite weights without adding a host-device sync to the step.

    :meth:`observe` folds each loss into a flag on the device; :meth:`check` reads it back (and the
    weights) only where a face reads values anyway: at logging steps, before each save, at the end.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._bad: torch.Tensor | None = None
        self._first_bad_loss: torch.Tensor | None = None

    def observe(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad = bad if self._bad is None else self._bad | bad

    def check(self, step: int, last_checkpoint: str | None = None) -> None:
        """Raise :class:`TrainingDiverged` if a loss since the last check, or any weight, is non-finite."""
        loss_bad = bool(self._bad) if self._bad is not None else False
        params = [p.detach() for p in self.model.parameters()]
        weights_bad = bool(params) and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
        if not (loss_bad or weights_bad):
            return
        what = " and ".join(part for part, bad in (("the training loss", loss_bad), ("the weights", weights_bad))
                            if bad)
        kept = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else "; no checkpoint was saved"
        raise TrainingDiverged(f"training diverged by optimizer step {step}: {what} became NaN or infinite, so no "
                               f"final model was saved{kept}. Try a lower --learning_rate, gradient clipping "
                               "(--max_grad_norm 1.0), or --bf16 instead of --fp16")


# ------------------------------------------------------------------------------------------------ ending
def finish_run(plan: RunPlan, run_dir: RunDirectory, parts: RunParts, model: torch.nn.Module,
               cdb_config: ChannelDropBackConfig | None, metrics: dict[str, float], *,
               trainer_state: Any, log_history: list[dict[str, Any]],
               final: FinalEvaluation | None = None) -> None:
    """Write the final model and records, the per-class results and predictions, the model card, push if
    asked; then the run is complete.

    Runs on the main process (the caller synchronises the others).
    """
    args = plan.training
    if getattr(plan.data, "corrupt_images", "error") == "skip":  # the results say how much data was left out
        metrics.update({"train_skipped_images": parts.skipped_images.get("train", 0),
                        "eval_skipped_images": parts.skipped_images.get("validation", 0)})
    save_outputs(args.output_dir, model, parts.image_processor, cdb_config, metrics, trainer_state=trainer_state)
    per_class = write_evaluation_files(args.output_dir, parts.labels, final, parts.predict)
    write_model_card(args.output_dir, plan.model, plan.data, cdb_config, metrics, training_args=args,
                     log_history=log_history, model=model, per_class=per_class, run_args=plan.run)
    if getattr(plan.model, "lora_merge", False):
        save_merged_model(args.output_dir, model, parts.image_processor)  # merges in place: the model's last use
    if args.push_to_hub:
        push_outputs(args.output_dir, args)
    run_dir.complete()


def write_evaluation_files(output_dir: str | os.PathLike, labels: list[str], final: FinalEvaluation | None,
                           predict: PredictSet | None) -> list[dict[str, Any]] | None:
    """The per-class CSV, the confusion matrix (CSV, PNG) and ``predictions.csv``, as far as ``final`` has them;
    returns the per-class rows (None without an evaluation)."""
    if final is None:
        return None
    rows = None
    if final.predictions is not None and final.references is not None:
        rows = evaluation.write_per_class_files(output_dir, final.predictions, final.references, labels)
    if predict is not None and final.predict_logits is not None:
        evaluation.write_predictions_csv(Path(output_dir) / evaluation.PREDICTIONS_CSV, predict.key_name,
                                         predict.keys, final.predict_logits, labels, true_labels=predict.true_labels)
    return rows


def last_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint in ``output_dir`` (for the divergence message), or None."""
    from .run_dir import find_checkpoints

    for checkpoint in find_checkpoints(output_dir):
        if read_checkpoint_record(checkpoint)[0] is not None:
            return str(checkpoint)
    return None
