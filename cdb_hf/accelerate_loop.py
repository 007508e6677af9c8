"""The accelerate face of ChannelDropBack: a fine-tuning loop that reads top to bottom.

It follows accelerate's ``complete_cv_example.py`` and timm's ``train.py``: :func:`train` sets up
(``Accelerator`` -> shared data and model setup -> optimizer -> ``prepare`` -> ChannelDropBack -> resume, in
:func:`_prepare` and :func:`_resume`), loops over the epochs with :func:`train_one_epoch` (which logs, evaluates
and saves as due after each optimizer step), then evaluates (:func:`~cdb_hf.inference.evaluate`) and saves the
shared outputs. What the run works with is one :class:`LoopRun`. ChannelDropBack is two lines: build it from
the model, attach it to the optimizer.

It takes the same :class:`~cdb_hf.preflight.RunPlan` as the Trainer path and honours ``TrainingArguments``'
names, so one recipe drives both::

    python run_finetune.py recipe.yaml --trainer accelerate                                  # one device
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml \\
        run_finetune.py recipe.yaml --trainer accelerate                                     # DDP, 8 GPUs
    torchrun --nproc_per_node 8 run_finetune.py recipe.yaml --trainer accelerate             # the same

Checkpoints are accelerate ``save_state`` folders, ``output_dir/checkpoint-<optimizer step>``, written by
``save_strategy``/``save_steps``, and completed by ``cdb_hf_checkpoint.json`` (written last), which carries
the loop's position, its log history and the run's CDB settings as plain JSON. Not
``register_for_checkpointing``: accelerate unpickles registered objects with ``weights_only=False``, so
resuming from a checkpoint someone else made could run arbitrary code. A resumed run continues the
uninterrupted trajectory: CDB's selection is a pure function of (seed, optimizer step), the data order of
epoch ``e`` a pure function of (seed, e), and each example's augmentation runs under its own seed.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, InitProcessGroupKwargs
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from . import streaming
from .checks import trackers_for
from .core import ChannelDropBack, ChannelDropBackConfig, StatsWindow
from .errors import UsageError
from .evaluation import FinalEvaluation
from .inference import evaluate, predict
from .optimization import build_lr_scheduler, build_optimizer, optimizer_steps_per_epoch
from .plan import RunPlan
from .preemption import PREEMPTION
from .resume import check_resume_matches, checkpoint_load_error, loop_state_error
from .run import DivergenceGuard, RunParts, RunSession, last_checkpoint, preempted, prepare_run
from .run_dir import write_checkpoint_record
from .streaming import StreamTrainImages
from .train_set import data_seed

__all__ = ["LoopProgress", "LoopRun", "build_optimizer", "train", "train_one_epoch"]

logger = get_logger(__name__)


def train(plan: RunPlan) -> dict[str, float]:
    """Fine-tune an image classifier with ChannelDropBack in an accelerate loop; return the final metrics.

    Runs unchanged on one device and under ``accelerate launch`` / ``torchrun`` (DDP). Bad input fails
    before ``output_dir`` changes; a failure after that restores what it held.
    """
    args = plan.training
    accelerator = _accelerator(plan)
    with RunSession(plan) as session:
        logger.info(accelerator.state)
        run = _prepare(plan, accelerator)  # data, model, optimizer, accelerator.prepare, ChannelDropBack
        if plan.resume_checkpoint is not None:
            _check_loop_record(plan, run.max_steps, run.cdb_config)
        session.open_run_dir()
        if plan.resume_checkpoint is not None:
            _resume(run)
        session.ready()
        _start_logging(run)

        # Train: epoch after epoch, until max_steps optimizer steps are done.
        starting_epoch, resume_step = divmod(run.progress.completed_steps, run.steps_per_epoch)
        first_step, start_time = run.progress.completed_steps, time.time()
        run_loss, run_batches = torch.zeros((), device=accelerator.device), 0
        run.model.train()
        with PREEMPTION.training_steps():  # a SIGTERM/SIGUSR1 now waits for the end of the current step
            for epoch in range(starting_epoch, math.ceil(run.max_steps / run.steps_per_epoch)):
                batches = _epoch_batches(run, epoch, resume_step if epoch == starting_epoch else 0)
                epoch_loss, epoch_batches = train_one_epoch(run, batches)
                run_loss, run_batches = run_loss + epoch_loss, run_batches + epoch_batches
                if run.progress.completed_steps >= run.max_steps:
                    break
        run.progress_bar.close()
        metrics = _train_metrics(run, time.time() - start_time, first_step, run_loss, run_batches)

        # Evaluate (and predict), then save.
        run.guard.check(run.progress.completed_steps, last_checkpoint(args.output_dir))
        run.progress.log_history.append({**metrics, "step": run.progress.completed_steps})
        final = FinalEvaluation()
        eval_metrics = evaluate(run.model, run.eval_dataloader, accelerator, len(run.parts.labels), final=final)
        log_event(accelerator, eval_metrics, run.progress.completed_steps, metrics["epoch"], run.progress.log_history)
        metrics.update(eval_metrics)
        if run.parts.predict is not None:
            final.predict_logits = predict(run.model, run.parts.predict, accelerator, args)
        if run.cdb_handle is not None:
            run.cdb_handle.remove()  # the model may outlive this run: leave its optimizer plain
        accelerator.wait_for_everyone()
        for tracker in accelerator.trackers:  # not end_training(): the process group must outlive this call
            tracker.finish()                  # (A/B runs and callers train several times in one process)
        if accelerator.is_main_process:
            state = {"global_step": run.progress.completed_steps, "max_steps": run.max_steps,
                     "epoch": metrics["epoch"], "log_history": run.progress.log_history}
            session.finish(run.parts, accelerator.unwrap_model(run.model), run.cdb_config, metrics,
                           trainer_state=state, log_history=run.progress.log_history, final=final)
        accelerator.wait_for_everyone()
    return metrics


def train_one_epoch(run: LoopRun, batches) -> tuple[torch.Tensor, int]:
    """One pass over ``batches``: accumulate, clip, step (CDB masks inside ``optimizer.step()``).

    Returns the summed loss (on the device) and the number of micro-batches; after every optimizer step,
    :func:`_after_step` logs, evaluates and saves as due. Stops early once ``max_steps`` optimizer steps are done.
    """
    accelerator, model, optimizer, args = run.accelerator, run.model, run.optimizer, run.plan.training
    cdb, progress, window = run.cdb, run.progress, run.window
    loss_sum, micro_batches = torch.zeros((), device=accelerator.device), 0
    for batch in batches:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            run.guard.observe(loss)  # folded into a device flag: no host sync here
            window.add_loss(loss.detach())
            loss_sum, micro_batches = loss_sum + loss.detach(), micro_batches + 1
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if args.max_grad_norm and args.max_grad_norm > 0:
                    window.grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                if cdb is not None:
                    cdb.step = progress.completed_steps  # the selection is a pure function of (seed, this step)
            optimizer.step()
            if accelerator.sync_gradients:
                window.learning_rate = run.lr_scheduler.get_last_lr()[0]  # the rate this step used
                if not accelerator.optimizer_step_was_skipped:
                    run.lr_scheduler.step()
            optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue
        progress.completed_steps += 1
        if cdb is not None and cdb.stepped(progress.completed_steps - 1, accelerator.optimizer_step_was_skipped):
            window.add_cdb(cdb.last_stats)
        _after_step(run, progress.completed_steps % run.steps_per_epoch == 0
                    or progress.completed_steps >= run.max_steps)
        if progress.completed_steps >= run.max_steps:
            break
    return loss_sum, micro_batches


# ---------------------------------------------------------------------------- set-up
@dataclass
class LoopRun:
    """What one run of the loop works with: built once by :func:`_prepare`, then passed to each step of it."""

    plan: RunPlan
    accelerator: Accelerator
    parts: RunParts
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    train_dataloader: Any
    eval_dataloader: Any
    max_steps: int
    steps_per_epoch: int
    #: the run-sized CDB configuration (epoch milestones resolved), None without CDB
    cdb_config: ChannelDropBackConfig | None
    cdb: ChannelDropBack | None
    cdb_handle: Any
    streamed: bool
    progress: LoopProgress = field(default_factory=lambda: LoopProgress())
    window: LogWindow = field(default_factory=lambda: LogWindow())
    guard: DivergenceGuard | None = None  # from _start_logging on
    progress_bar: Any = None  # from _start_logging on


def _accelerator(plan: RunPlan) -> Accelerator:
    """The run's ``Accelerator``, configured from ``TrainingArguments``' names as the Trainer would be."""
    args = plan.training
    return Accelerator(
        cpu=args.use_cpu,
        # --bf16/--fp16 win; without them `accelerate launch --mixed_precision` (or its config) decides.
        mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else None,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=args.gradient_accumulation_steps),
        log_with=trackers_for(args.report_to) or None,
        project_dir=os.path.join(args.output_dir, "runs"),
        # Epoch e is shuffled by a generator seeded with (data seed + e) on every rank: the Trainer's order.
        # A stream (--streaming) is split per rank by cdb_hf.streaming: each process reads its own, none dispatches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=data_seed(args),
                                                  dispatch_batches=False if plan.data.streaming else None),
        # The schedule counts optimizer steps, like the Trainer's; the loop steps it once per real step.
        step_scheduler_with_optimizer=False,
        # --ddp_timeout bounds every barrier, as on the Trainer path (a first image check may be long).
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
    )


def _prepare(plan: RunPlan, accelerator: Accelerator) -> LoopRun:
    """Data and model (:func:`~cdb_hf.run.prepare_run`), dataloaders, optimizer and schedule, all prepared by
    ``accelerator``; then ChannelDropBack: build it from the model, attach it to the optimizer."""
    args = plan.training
    parts = prepare_run(plan)
    model = parts.model
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    streamed = isinstance(parts.train_dataset, StreamTrainImages)
    if streamed:  # shuffled, split per rank and endless already: the loop only batches it
        train_dataloader = DataLoader(parts.train_dataset, collate_fn=parts.collate_fn,
                                      batch_size=args.per_device_train_batch_size)
    else:
        train_dataloader = DataLoader(
            parts.train_dataset, shuffle=args.train_sampling_strategy != "sequential",
            collate_fn=parts.collate_fn, batch_size=args.per_device_train_batch_size,
            num_workers=args.dataloader_num_workers, drop_last=args.dataloader_drop_last,
            # A private generator keeps the loader's seed draws off the global RNG, which dropout uses.
            generator=torch.Generator().manual_seed(data_seed(args)))
    eval_dataloader = DataLoader(parts.eval_dataset, collate_fn=parts.collate_fn,
                                 batch_size=args.per_device_eval_batch_size, num_workers=args.dataloader_num_workers)

    optimizer = build_optimizer(model, args, plan.run.weight_decay_all)
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader)
    if streamed:  # a stream has no epochs: the whole run is one (pre-flight required --max_steps)
        train_dataloader = streaming.unshard(train_dataloader)
        steps_per_epoch = max_steps = args.max_steps
    else:
        steps_per_epoch = optimizer_steps_per_epoch(len(train_dataloader), args.gradient_accumulation_steps)
        max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    lr_scheduler = accelerator.prepare(build_lr_scheduler(optimizer, args, plan.run, max_steps, steps_per_epoch))

    # ChannelDropBack: build it from the model, attach it to the optimizer (its step hooks mask the rows).
    cdb_config = plan.cdb_config.for_run(max_steps, steps_per_epoch) if plan.cdb_config else None
    cdb = ChannelDropBack(accelerator.unwrap_model(model), cdb_config) if cdb_config else None
    cdb_handle = cdb.attach(optimizer) if cdb else None
    return LoopRun(plan=plan, accelerator=accelerator, parts=parts, model=model, optimizer=optimizer,
                   lr_scheduler=lr_scheduler, train_dataloader=train_dataloader, eval_dataloader=eval_dataloader,
                   max_steps=max_steps, steps_per_epoch=steps_per_epoch, cdb_config=cdb_config, cdb=cdb,
                   cdb_handle=cdb_handle, streamed=streamed)


def _resume(run: LoopRun) -> None:
    """Load the checkpoint's state (model, optimizer, scheduler, RNG) and the loop's position."""
    checkpoint = run.plan.resume_checkpoint
    logger.info(f"Resuming from {checkpoint}")
    _load_state_or_refuse(run.accelerator, checkpoint)
    run.progress.load_state_dict(run.plan.resume_record["loop"])
    if run.streamed:  # the stream starts where the checkpoint's stood (no batches to skip)
        run.parts.train_dataset.resume_at(**streaming.read_stream_state(checkpoint, run.accelerator.process_index))


def _start_logging(run: LoopRun) -> None:
    """Trackers, the run's summary line, the divergence guard and the progress bar."""
    accelerator, args = run.accelerator, run.plan.training
    if accelerator.log_with:
        accelerator.init_trackers(getattr(args, "project", None) or "cdb_hf",
                                  config=_hyperparameters(run.plan, run.cdb_config),
                                  init_kwargs={"wandb": {"name": args.run_name}} if args.run_name else None)
    num_epochs = math.ceil(run.max_steps / run.steps_per_epoch)
    logger.info(f"***** {'a stream of' if run.streamed else len(run.parts.train_dataset)} training examples, "
                f"{run.max_steps} optimizer steps over {num_epochs} epoch(s), total batch {_total_batch(run)} on "
                f"{accelerator.num_processes} process(es); CDB {f'on {len(run.cdb.layers)} layers' if run.cdb else 'off'} *****")
    run.guard = DivergenceGuard(run.model)
    run.progress_bar = tqdm(range(run.max_steps), initial=run.progress.completed_steps, desc="train",
                            disable=not accelerator.is_local_main_process or args.disable_tqdm)


def _epoch_batches(run: LoopRun, epoch: int, resume_step: int):
    """Epoch ``epoch``'s batches; a resumed epoch skips the ``resume_step`` optimizer steps it already made
    (epoch orders are fixed, so skipping the consumed batches lands where the saved run was)."""
    run.parts.train_dataset.set_epoch(epoch)
    run.train_dataloader.set_epoch(epoch)
    skip = resume_step * run.plan.training.gradient_accumulation_steps if not run.streamed else 0
    return run.accelerator.skip_first_batches(run.train_dataloader, skip) if skip else run.train_dataloader


def _after_step(run: LoopRun, end_of_epoch: bool) -> None:
    """Logging, evaluation and checkpoints due after this optimizer step (the Trainer's strategies)."""
    accelerator, args, progress = run.accelerator, run.plan.training, run.progress
    step = progress.completed_steps
    run.progress_bar.update(1)
    epoch_position = step / run.steps_per_epoch
    due = {name: _due(getattr(args, f"{name}_strategy"), getattr(args, f"{name}_steps"), step, run.max_steps,
                      end_of_epoch) for name in ("logging", "eval", "save")}
    due["logging"] |= args.logging_first_step and step == 1
    if any(due.values()) or step >= run.max_steps:  # values are read back here anyway: check them first
        run.guard.check(step, last_checkpoint(args.output_dir))
    if due["logging"]:
        log_event(accelerator, run.window.flush(accelerator), step, epoch_position, progress.log_history)
        run.progress_bar.set_postfix(loss=f"{progress.log_history[-1]['loss']:.4f}")
    if due["eval"]:
        log_event(accelerator, evaluate(run.model, run.eval_dataloader, accelerator, len(run.parts.labels)), step,
                  epoch_position, progress.log_history)
    if due["save"]:
        save_checkpoint(accelerator, run.plan, progress, run.cdb_config,
                        stream=run.parts.train_dataset if run.streamed else None)
    if PREEMPTION.due(accelerator.num_processes):  # this step is done: save, stop
        if not due["save"]:
            run.guard.check(step, last_checkpoint(args.output_dir))
            save_checkpoint(accelerator, run.plan, progress, run.cdb_config,
                            stream=run.parts.train_dataset if run.streamed else None)
        raise preempted(run.plan, step)


def _total_batch(run: LoopRun) -> int:
    args = run.plan.training
    return args.per_device_train_batch_size * run.accelerator.num_processes * args.gradient_accumulation_steps


def _train_metrics(run: LoopRun, runtime: float, first_step: int, run_loss: torch.Tensor,
                   run_batches: int) -> dict[str, float]:
    """The Trainer's ``train_*`` metrics of this run (its steps since ``first_step``; loss over every process)."""
    steps_run = run.progress.completed_steps - first_step
    return {
        "train_runtime": round(runtime, 4),
        "train_samples_per_second": round(steps_run * _total_batch(run) / runtime, 3) if runtime else 0.0,
        "train_steps_per_second": round(steps_run / runtime, 3) if runtime else 0.0,
        "train_loss": (run.accelerator.reduce(run_loss / max(run_batches, 1), reduction="mean").item()
                       if run_batches else float("nan")),
        "epoch": run.progress.completed_steps / run.steps_per_epoch,
    }


# ---------------------------------------------------------------------------- checkpoints
class LoopProgress:
    """The loop's position (completed optimizer steps) and log history, saved in every checkpoint's record so
    that a resumed run continues both (the model card lists the whole run)."""

    def __init__(self) -> None:
        self.completed_steps = 0
        self.log_history: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"completed_steps": self.completed_steps, "log_history": list(self.log_history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.completed_steps = int(state_dict["completed_steps"])
        self.log_history[:] = state_dict.get("log_history", [])


def _check_loop_record(plan: RunPlan, max_steps: int, cdb_config) -> None:
    """The resume checkpoint's loop state must be well formed and within this run; its run-sized CDB
    settings must be this run's (the user-level ones were checked in pre-flight)."""
    record = plan.resume_record
    problem = loop_state_error(plan.resume_checkpoint, record.get("loop"), max_steps)
    if problem is None and record["loop"]["completed_steps"] != record["step"]:
        problem = f"completed_steps={record['loop']['completed_steps']} differs from the checkpoint's step {record['step']}"
    if problem is not None:
        raise UsageError(f"--resume_from_checkpoint {plan.resume_checkpoint!r}: its accelerate-loop state is not usable "
                         f"({problem}); resume from a checkpoint-N folder this loop wrote")
    check_resume_matches(record, cdb_config.to_dict() if cdb_config else None, plan.run, plan.resume_checkpoint)


def _load_state_or_refuse(accelerator: Accelerator, checkpoint: str) -> None:
    """``accelerator.load_state`` (tensors only: safetensors / weights_only); a damaged checkpoint is one line."""
    try:
        accelerator.load_state(checkpoint)
    except Exception as error:
        raise checkpoint_load_error(checkpoint, "its saved state", error) from error


def save_checkpoint(accelerator: Accelerator, plan: RunPlan, progress: LoopProgress, cdb_config,
                    stream: StreamTrainImages | None = None) -> str:
    """``save_state`` into ``checkpoint-<step>`` (model, optimizer, scheduler, RNG), every rank's ``stream``
    position, then its record (last: a checkpoint without one is incomplete), then delete the oldest beyond
    ``save_total_limit``."""
    args = plan.training
    folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{progress.completed_steps}")
    accelerator.save_state(folder)
    if stream is not None:
        yielded = progress.completed_steps * args.gradient_accumulation_steps * args.per_device_train_batch_size
        streaming.write_stream_state(folder, stream, yielded, accelerator.process_index)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_checkpoint_record(folder, trainer="accelerate", step=progress.completed_steps,
                                cdb=cdb_config.to_dict() if cdb_config else None,
                                extra={"loop": progress.state_dict()})
        rotate_checkpoints(args.output_dir, save_total_limit=args.save_total_limit)
    accelerator.wait_for_everyone()
    return folder


# ---------------------------------------------------------------------------- logging
class LogWindow:
    """Means over the optimizer steps since the last log: loss, and CDB's statistics as the callback logs them."""

    def __init__(self) -> None:
        self.grad_norm: torch.Tensor | float | None = None
        self.learning_rate = 0.0
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.micro_batches = None, 0
        self.cdb = StatsWindow()

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.micro_batches += 1

    def add_cdb(self, stats: dict[str, float]) -> None:
        self.cdb.add(stats)

    def flush(self, accelerator: Accelerator) -> dict[str, float]:
        """The window as a Trainer-style log entry (loss averaged over every process); resets the window."""
        logs = {"loss": accelerator.reduce(self.loss_sum / self.micro_batches, reduction="mean").item()}
        if self.grad_norm is not None:
            logs["grad_norm"] = float(self.grad_norm)
        logs["learning_rate"] = float(self.learning_rate)
        logs.update(self.cdb.flush())  # the same cdb/* statistics the Trainer callback logs
        self._reset()
        return logs


def log_event(accelerator: Accelerator, logs: dict[str, float], step: int, epoch: float,
              history: list[dict[str, float]]) -> None:
    """Record ``logs`` in the Trainer's ``log_history`` format and send them to the trackers.

    Tracker names follow the Trainer's integrations (``train/loss``, ``eval/accuracy``); CDB's
    statistics keep their own ``cdb/`` names.
    """
    history.append({**logs, "epoch": round(epoch, 4), "step": step})
    tracked = {}
    for key, value in {**logs, "epoch": epoch}.items():
        if key.startswith("eval_"):
            tracked["eval/" + key.removeprefix("eval_")] = value
        elif key.startswith("cdb/"):
            tracked[key] = value
        else:
            tracked["train/" + key] = value
    accelerator.log(tracked, step=step)
    logger.info(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))


# ---------------------------------------------------------------------------- small helpers
def _interval(value: float, max_steps: int) -> int:
    """TrainingArguments' convention: a value below 1 is a fraction of the run."""
    return max(math.ceil(value * max_steps), 1) if value < 1 else int(value)


def _due(strategy: Any, steps: float | None, completed_steps: int, max_steps: int, end_of_epoch: bool) -> bool:
    """Whether a ``steps``/``epoch``/``no`` strategy (logging, eval, save) fires after this optimizer step."""
    strategy = str(getattr(strategy, "value", strategy))
    if strategy == "steps":
        return bool(steps) and completed_steps % _interval(steps, max_steps) == 0
    return strategy == "epoch" and end_of_epoch


def _hyperparameters(plan: RunPlan, cdb_config) -> dict[str, Any]:
    """A flat, tracker-safe copy of the run's settings, without any token."""
    values: dict[str, Any] = dict(plan.training.to_sanitized_dict())
    values.update({f"model_{k}": v for k, v in vars(plan.model).items() if k != "token"})
    values.update({f"data_{k}": v for k, v in vars(plan.data).items()})
    values.update({f"cdb_{k}": v for k, v in (cdb_config.to_dict() if cdb_config else {"enabled": False}).items()})
    values.pop("hub_token", None)
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in values.items()}
