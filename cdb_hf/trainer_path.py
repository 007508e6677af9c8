"""The transformers ``Trainer`` face of ``run_finetune.py``: shared setup -> Trainer -> shared ending.

Everything before and after training is :mod:`cdb_hf.run`'s; what is the Trainer's own is here:
ChannelDropBack arrives as a callback, and the Trainer is a :class:`~cdb_hf.trainer.CDBTrainer` (the public
class, in :mod:`cdb_hf.trainer`) that also guards against divergence and completes each checkpoint with its
record before older ones are rotated out.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import torch
from accelerate import PartialState
from transformers import TrainerCallback
from transformers.trainer_utils import EvalPrediction, rotate_checkpoints
from transformers.utils import logging

from .callback import ChannelDropBackCallback
from .evaluation import FinalEvaluation
from .metrics import build_compute_metrics
from .plan import RunPlan
from .preemption import PREEMPTION
from .resume import check_resume_matches
from .run import DivergenceGuard, RunSession, last_checkpoint, prepare_run
from .run_dir import write_checkpoint_record
from .streaming import StreamEvalImages, StreamTrainImages, read_stream_state, unshard, write_stream_state
from .trainer import CDBTrainer

__all__ = ["train"]

logger = logging.get_logger(__name__)


def train(plan: RunPlan) -> dict[str, float]:
    """Fine-tune with the transformers Trainer (+ ChannelDropBackCallback); return the final metrics.

    Bad input fails before ``output_dir`` changes; a failure after that restores what it held (see
    :class:`cdb_hf.run.RunSession`).
    """
    args = plan.training
    with RunSession(plan) as session:
        parts = prepare_run(plan)
        trainer_args = copy.copy(args)
        trainer_args.remove_unused_columns = False  # the transforms read the image column lazily
        trainer_args.push_to_hub = False  # pushed once at the end, by session.finish
        # Pinned memory only speeds up copies to a CUDA device (torch warns about it on every CPU run).
        trainer_args.dataloader_pin_memory = args.dataloader_pin_memory and torch.cuda.is_available()
        streamed = isinstance(parts.train_dataset, StreamTrainImages)
        if streamed:
            # Each rank reads its own part of the stream (no dispatching from rank 0); a resume starts the stream
            # at the checkpoint's position instead of iterating past the batches the run already used.
            trainer_args.accelerator_config = dataclasses.replace(args.accelerator_config, dispatch_batches=False)
            trainer_args.ignore_data_skip = True
            if plan.resume_checkpoint is not None:
                parts.train_dataset.resume_at(**read_stream_state(plan.resume_checkpoint, PartialState().process_index))
        guard = DivergenceGuard(parts.model)
        cdb_callback = ChannelDropBackCallback(plan.cdb_config) if plan.cdb_config is not None else None
        run_watch = _RunWatch(plan, session, guard, cdb_callback)
        trainer = _RunTrainer(
            guard,
            run_watch,
            run_args=plan.run,
            model=parts.model,
            args=trainer_args,
            train_dataset=parts.train_dataset,
            eval_dataset=parts.eval_dataset,
            processing_class=parts.image_processor,
            data_collator=parts.collate_fn,
            compute_metrics=build_compute_metrics(len(parts.labels)),
            callbacks=[_EpochSetter(parts.train_dataset), run_watch]
            + ([cdb_callback] if cdb_callback is not None else []),
        )
        session.open_run_dir()
        with PREEMPTION.training_steps():
            result = trainer.train(resume_from_checkpoint=plan.resume_checkpoint)
        if run_watch.preempted_step is not None:  # stopped at a signal, checkpoint written: continue later
            raise session.preempted(run_watch.preempted_step)
        metrics: dict[str, float] = dict(result.metrics)
        trainer.log_metrics("train", result.metrics)
        # Trainer.predict is Trainer.evaluate that also returns the logits (for the per-class results); logging
        # its metrics puts the final evaluation into the log history as evaluate() would.
        evaluated = trainer.predict(parts.eval_dataset, metric_key_prefix="eval")
        eval_metrics = dict(evaluated.metrics)
        trainer.log(eval_metrics)
        metrics.update(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)
        final = FinalEvaluation(predictions=_logits(evaluated.predictions).argmax(-1), references=evaluated.label_ids)
        if parts.predict is not None:
            trainer.data_collator = parts.predict.collate_fn  # the predict set has no labels
            final.predict_logits = _logits(trainer.predict(parts.predict.dataset, metric_key_prefix="predict").predictions)

        if trainer.is_world_process_zero():
            session.finish(parts, trainer.model, plan.cdb_config, metrics,
                           trainer_state=trainer.state, log_history=trainer.state.log_history, final=final)
        trainer.accelerator.wait_for_everyone()
    return metrics


class _RunTrainer(CDBTrainer):
    """The run's Trainer: every training loss goes through the divergence guard (on the device, no sync), and
    each checkpoint is complete (has its record) before older ones are rotated out."""

    def __init__(self, guard: DivergenceGuard, run_watch: _RunWatch, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.divergence_guard, self.run_watch = guard, run_watch

    def get_train_dataloader(self):
        return unshard(super().get_train_dataloader())  # a streamed rank's examples are all its own

    def training_step(self, *args: Any, **kwargs: Any):
        loss = super().training_step(*args, **kwargs)
        self.divergence_guard.observe(loss)
        return loss

    def evaluation_loop(self, dataloader, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"):
        """transformers' loop, with the loss recomputed per image from the gathered logits and labels.

        The Trainer repeats each batch's mean loss for every image of the batch, so on several processes the
        duplicates that even out the last batch leak into it; the gathered logits and labels have those
        duplicates dropped. The same per-image mean as the accelerate loop (label smoothing included, as the
        Trainer's own loss has it).
        """
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        output = self._without_stream_padding(dataloader, output, metric_key_prefix)
        key = f"{metric_key_prefix}_loss"
        if key in output.metrics and output.predictions is not None and output.label_ids is not None:
            output.metrics[key] = mean_loss_per_image(output.predictions, output.label_ids,
                                                      self.args.label_smoothing_factor)
        return output

    def _without_stream_padding(self, dataloader, output, prefix: str):
        """A streamed evaluation on several processes ends with a batch evened out by examples from the stream's
        start, which accelerate cannot drop (no length): keep the first ``examples_read`` and recompute."""
        shard = getattr(dataloader, "dataset", None)
        stream = getattr(shard, "dataset", None)
        if not isinstance(stream, StreamEvalImages) or output.label_ids is None \
                or len(output.label_ids) <= stream.examples_read:
            return output
        keep = stream.examples_read
        predictions = output.predictions
        predictions = type(predictions)(p[:keep] for p in predictions) if isinstance(predictions, (tuple, list)) \
            else predictions[:keep]
        output = output._replace(predictions=predictions, label_ids=output.label_ids[:keep], num_samples=keep)
        if self.compute_metrics is not None:
            computed = self.compute_metrics(EvalPrediction(predictions=predictions, label_ids=output.label_ids))
            output.metrics.update({f"{prefix}_{name}": value for name, value in computed.items()})
        return output

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's save, with the checkpoint's record written *before* older checkpoints are rotated
        out: the Trainer rotates before its ``on_save`` callbacks run, so a kill in between would leave no
        complete checkpoint at all."""
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if isinstance(self.train_dataset, StreamTrainImages):  # every rank's stream position, before the record
            yielded = self.state.global_step * self.args.gradient_accumulation_steps * self.args.per_device_train_batch_size
            write_stream_state(os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}"),
                               self.train_dataset, yielded, self.args.process_index)
            self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            self.run_watch.write_record(self.args, self.state)
        if self.args.should_save:
            rotate_checkpoints(self._get_output_dir(trial=trial), save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)


class _RunWatch(TrainerCallback):
    """The run's bookkeeping around the Trainer's own: start-up, divergence, checkpoint records.

    * at the first step, the held-back start-up logs are printed (:meth:`RunSession.ready`), after the
      run-sized CDB configuration was checked against the resume checkpoint's;
    * wherever the Trainer is about to read values back anyway (a log, an evaluation, a save, the
      end), the divergence guard is checked, before anything is saved;
    * each checkpoint is completed by ``cdb_hf_checkpoint.json`` (:meth:`write_record`, from the save).
    """

    def __init__(self, plan: RunPlan, session: RunSession, guard: DivergenceGuard,
                 cdb_callback: ChannelDropBackCallback | None) -> None:
        self.plan, self.session, self.guard, self.cdb_callback = plan, session, guard, cdb_callback
        self.preempted_step: int | None = None

    def _run_config(self) -> dict[str, Any] | None:
        return self.cdb_callback.cdb.config.to_dict() if self.cdb_callback is not None else None

    def on_train_begin(self, args, state, control, **kwargs):
        # A resume loads the checkpoint's TrainerState, intervals included: the run keeps the ones it was given.
        state.compute_steps(args, state.max_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.session.started:
            if self.plan.resume_checkpoint is not None:
                check_resume_matches(self.plan.resume_record, self._run_config(), self.plan.run,
                                     self.plan.resume_checkpoint)
            self.session.ready()

    def on_step_end(self, args, state, control, **kwargs):
        if PREEMPTION.due(args.world_size):  # finish this step: save it, then stop
            control.should_save = control.should_training_stop = True
            self.preempted_step = state.global_step
        if control.should_log or control.should_evaluate or control.should_save or state.global_step >= state.max_steps:
            self.guard.check(state.global_step, last_checkpoint(args.output_dir))

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_evaluate or control.should_save:
            self.guard.check(state.global_step, last_checkpoint(args.output_dir))

    def write_record(self, args, state) -> None:
        """Complete ``checkpoint-<step>`` with its record (called by the Trainer's save, before rotation)."""
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        write_checkpoint_record(folder, trainer="hf", step=state.global_step, cdb=self._run_config())

    def on_save(self, args, state, control, **kwargs):
        PartialState().wait_for_everyone()


class _EpochSetter(TrainerCallback):
    """Tell the per-example seeding which epoch it is: with the Trainer's seedable sampler, accelerate
    forwards ``set_epoch`` to the sampler only, so without this every epoch would crop alike."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))


def mean_loss_per_image(predictions: Any, label_ids: Any, label_smoothing: float = 0.0) -> float:
    """The mean cross-entropy per image of gathered predictions, smoothed as transformers' ``LabelSmoother``."""
    logits = torch.as_tensor(_logits(predictions)).float()
    losses = torch.nn.functional.cross_entropy(logits, torch.as_tensor(label_ids).long(), reduction="none",
                                               label_smoothing=label_smoothing)
    return losses.double().mean().item()


def _logits(predictions: Any) -> Any:
    """The logits of ``Trainer.predict``'s predictions (a tuple when the model returns more than logits)."""
    return predictions[0] if isinstance(predictions, (tuple, list)) else predictions
