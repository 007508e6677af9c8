"""The accelerate face of ChannelDropBack: a fine-tuning loop that reads top to bottom.

It follows accelerate's ``complete_cv_example.py``: ``Accelerator`` -> data -> model -> optimizer ->
``prepare`` -> epochs (accumulate, clip, step) -> evaluation -> checkpoints -> outputs. ChannelDropBack
is two lines in the middle: build it from the model, attach it to the optimizer.

It takes the same five argument dataclasses as the Trainer path and honours ``TrainingArguments``'
names, so one recipe drives both::

    python run_finetune.py recipe.yaml --trainer accelerate                                  # one device
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml \\
        run_finetune.py recipe.yaml --trainer accelerate                                     # DDP, 8 GPUs
    torchrun --nproc_per_node 8 run_finetune.py recipe.yaml --trainer accelerate             # the same

Checkpoints are accelerate ``save_state`` folders, ``output_dir/checkpoint-<optimizer step>``, written
by ``save_strategy``/``save_steps`` (``steps`` + N, or ``epoch``). ``resume_from_checkpoint`` takes one
of them, or ``true``/``latest`` for the newest. A resumed run continues the uninterrupted trajectory:
CDB's selection is a pure function of (seed, optimizer step), the data order of epoch ``e`` a pure
function of (seed, e), each example's augmentation runs under its own seed (seed, epoch, index), and
``save_state`` carries the model, optimizer, scheduler and RNG states; ``cdb_hf_loop_state.json`` next to them
carries the loop's position, its log history and CDB's state.

FSDP and DeepSpeed are refused before any work: see :func:`refuse_unsupported_distribution`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    GradientAccumulationPlugin,
    LoggerType,
    set_seed,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments, get_scheduler
from transformers.trainer_pt_utils import get_parameter_names
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from . import cli
from . import metrics as cdb_metrics
from .arguments import CDBArguments, DataArguments, ModelArguments, RunArguments
from .core import ChannelDropBack, ChannelDropBackConfig, StatsWindow
from .data import PerExampleSeeded, apply_transforms, collate_fn, data_seed, load_image_datasets
from .hub import push_outputs, save_outputs, write_model_card
from .models import check_image_size, load_model_and_processor
from .perf import apply_memory_format

__all__ = ["LOOP_CHECKPOINT_MARKER", "SUPPORTED_OPTIMIZERS", "LoopProgress", "evaluate", "load_loop_state",
           "refuse_unsupported_distribution", "resolve_loop_checkpoint", "train"]

logger = get_logger(__name__)

#: ``TrainingArguments.optim`` values the loop builds, through the Trainer's own factory so that the
#: optimizer class and hyperparameters are exactly the Trainer path's.
SUPPORTED_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop", "adafactor")

#: ``report_to`` names that accelerate's trackers understand.
SUPPORTED_TRACKERS = tuple(str(t.value) for t in LoggerType if t != LoggerType.ALL)

#: The loop's own state in every checkpoint (position, log history, CDB's state), as JSON: its presence tells a
#: loop checkpoint from a Trainer checkpoint. Not ``register_for_checkpointing``: accelerate writes registered
#: objects as pickles and ``load_state`` unpickles them with ``weights_only=False``, so resuming from a
#: checkpoint someone else made could run arbitrary code. JSON carries the same plain values, and nothing else.
LOOP_CHECKPOINT_MARKER = "cdb_hf_loop_state.json"


def train(model_args: ModelArguments, data_args: DataArguments, cdb_args: CDBArguments,
          run_args: RunArguments, training_args: TrainingArguments) -> dict[str, float]:
    """Fine-tune an image classifier with ChannelDropBack in an accelerate loop; return the final metrics.

    Runs unchanged on one device and under ``accelerate launch`` / ``torchrun`` (DDP). Bad arguments
    are reported before any data or model is loaded, and nothing is written to ``output_dir`` before
    the first optimizer step.
    """
    args = training_args
    # ------------------------------------------------------------ 1. refuse bad input before any work
    cdb_config = cli.validate_args(model_args, data_args, cdb_args, run_args, args)
    check_loop_arguments(args)
    resume_checkpoint = resolve_loop_checkpoint(args)
    resume_state = load_loop_state(resume_checkpoint, cdb_config) if resume_checkpoint is not None else None

    # ------------------------------------------------------------ 2. the Accelerator
    accelerator = Accelerator(
        cpu=args.use_cpu,
        # --bf16/--fp16 win; without them `accelerate launch --mixed_precision` (or its config) decides.
        mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else None,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=args.gradient_accumulation_steps),
        log_with=trackers_for(args.report_to) or None,
        project_dir=os.path.join(args.output_dir, "runs"),
        # Epoch e is shuffled by a generator seeded with (data seed + e) on every rank: the Trainer's order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=data_seed(args)),
        # The schedule counts optimizer steps, like the Trainer's; the loop steps it once per real step.
        step_scheduler_with_optimizer=False,
    )
    refuse_unsupported_distribution(accelerator)
    setup_logging(accelerator, args)
    logger.info(accelerator.state)
    set_seed(args.seed)  # a new classification head is drawn from the global RNG

    # ------------------------------------------------------------ 3. data and model
    check_image_size(model_args)  # reads only the config: fail before a large dataset loads
    with accelerator.main_process_first():  # the main process fills the datasets cache first
        raw_datasets = load_image_datasets(data_args, seed=args.seed, cache_dir=model_args.cache_dir,
                                           token=model_args.token)
    labels = raw_datasets["train"].features["label"].names
    model, image_processor = load_model_and_processor(model_args, labels)
    if cdb_config is not None:
        cli.check_cdb_against_model(model, cdb_config)  # include/exclude must match layers of this model
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    apply_memory_format(model, run_args.channels_last)  # before the optimizer, so its state shares the layout
    processed = apply_transforms(raw_datasets, image_processor)
    train_dataset = PerExampleSeeded(processed["train"], seed=data_seed(args))
    train_dataloader = DataLoader(
        train_dataset,
        shuffle=args.train_sampling_strategy != "sequential",
        collate_fn=collate_fn,
        batch_size=args.per_device_train_batch_size,
        num_workers=args.dataloader_num_workers,
        drop_last=args.dataloader_drop_last,
        # A private generator keeps the loader's seed draws off the global RNG, which dropout uses.
        generator=torch.Generator().manual_seed(data_seed(args)),
    )
    eval_dataloader = DataLoader(processed["validation"], collate_fn=collate_fn,
                                 batch_size=args.per_device_eval_batch_size,
                                 num_workers=args.dataloader_num_workers)

    # ------------------------------------------------------------ 4. optimizer, accelerate's wrappers, schedule
    optimizer = build_optimizer(model, args)
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader)
    steps_per_epoch = max(math.ceil(len(train_dataloader) / args.gradient_accumulation_steps), 1)
    max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    lr_scheduler = accelerator.prepare(get_scheduler(
        args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.get_warmup_steps(max_steps),
        num_training_steps=max_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs or {}))

    # ------------------------------------------------------------ 5. ChannelDropBack: build it, attach it
    progress = LoopProgress()
    cdb, cdb_handle = None, None
    if cdb_config is not None:
        cdb_config = cdb_config.for_run(max_steps, steps_per_epoch)
        cdb = ChannelDropBack(accelerator.unwrap_model(model), cdb_config)
        cdb_handle = cdb.attach(optimizer)  # its step hooks mask the selected rows inside optimizer.step()

    # ------------------------------------------------------------ 6. resume
    if resume_checkpoint is not None:
        logger.info(f"Resuming from {resume_checkpoint}")
        accelerator.load_state(resume_checkpoint)  # tensors only (safetensors / weights_only), no custom objects
        progress.load_state_dict(resume_state)
        if cdb is not None:
            cdb.load_state_dict(resume_state["cdb"])
    completed_steps = progress.completed_steps
    starting_epoch, resume_step = divmod(completed_steps, steps_per_epoch)
    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"***** {len(processed['train'])} training examples, {max_steps} optimizer steps over {num_epochs} "
                f"epoch(s), total batch {total_batch} on {accelerator.num_processes} process(es); CDB "
                f"{f'on {len(cdb.layers)} layers' if cdb else 'off'} *****")

    # ------------------------------------------------------------ 7. train
    # Only now may output_dir change: every check has passed and the data and model are loaded.
    cli.clear_output_dir_for_overwrite(args, run_args, is_main_process=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if accelerator.log_with:
        accelerator.init_trackers(getattr(args, "project", None) or "cdb_hf",
                                  config=_hyperparameters(model_args, data_args, cdb_config, args),
                                  init_kwargs={"wandb": {"name": args.run_name}} if args.run_name else None)
    cli.mark_training_started()
    first_step = completed_steps
    log_history = progress.log_history  # continued from the checkpoint when resuming
    window = LogWindow()
    run_loss, run_batches, start_time = torch.zeros((), device=accelerator.device), 0, time.time()
    progress_bar = tqdm(range(max_steps), initial=completed_steps, desc="train",
                        disable=not accelerator.is_local_main_process or args.disable_tqdm)
    model.train()
    for epoch in range(starting_epoch, num_epochs):
        train_dataset.set_epoch(epoch)
        train_dataloader.set_epoch(epoch)
        active_dataloader = train_dataloader
        if epoch == starting_epoch and resume_step:
            # Epoch orders are fixed, so skipping the consumed batches lands where the saved run was.
            active_dataloader = accelerator.skip_first_batches(
                train_dataloader, resume_step * args.gradient_accumulation_steps)
        for batch in active_dataloader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                window.add_loss(loss.detach())
                run_loss, run_batches = run_loss + loss.detach(), run_batches + 1
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if args.max_grad_norm and args.max_grad_norm > 0:
                        window.grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    if cdb is not None:
                        cdb.step = completed_steps  # the selection is a pure function of (seed, this step)
                optimizer.step()
                if accelerator.sync_gradients:
                    window.learning_rate = lr_scheduler.get_last_lr()[0]  # the rate this step used
                    if not accelerator.optimizer_step_was_skipped:
                        lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue

            # ---- one optimizer step is done
            completed_steps += 1
            progress.completed_steps = completed_steps
            progress_bar.update(1)
            if cdb is not None and _cdb_ran(cdb, completed_steps, accelerator):
                window.add_cdb(cdb.last_stats)
            end_of_epoch = completed_steps % steps_per_epoch == 0 or completed_steps >= max_steps
            epoch_position = completed_steps / steps_per_epoch
            if _due(args.logging_strategy, args.logging_steps, completed_steps, max_steps, end_of_epoch) or (
                    args.logging_first_step and completed_steps == 1):
                log_event(accelerator, window.flush(accelerator), completed_steps, epoch_position, log_history)
                progress_bar.set_postfix(loss=f"{log_history[-1]['loss']:.4f}")
            if _due(args.eval_strategy, args.eval_steps, completed_steps, max_steps, end_of_epoch):
                eval_metrics = evaluate(model, eval_dataloader, accelerator, len(labels))
                log_event(accelerator, eval_metrics, completed_steps, epoch_position, log_history)
            if _due(args.save_strategy, args.save_steps, completed_steps, max_steps, end_of_epoch):
                save_checkpoint(accelerator, args, completed_steps, progress, cdb)
            if completed_steps >= max_steps:
                break
    progress_bar.close()

    # ------------------------------------------------------------ 8. final metrics and outputs
    runtime = time.time() - start_time
    steps_run = completed_steps - first_step
    metrics: dict[str, float] = {
        "train_runtime": round(runtime, 4),
        "train_samples_per_second": round(steps_run * total_batch / runtime, 3) if runtime else 0.0,
        "train_steps_per_second": round(steps_run / runtime, 3) if runtime else 0.0,
        "train_loss": (accelerator.reduce(run_loss / max(run_batches, 1), reduction="mean").item()
                       if run_batches else float("nan")),
        "epoch": completed_steps / steps_per_epoch,
    }
    log_history.append({**metrics, "step": completed_steps})
    eval_metrics = evaluate(model, eval_dataloader, accelerator, len(labels))
    log_event(accelerator, eval_metrics, completed_steps, completed_steps / steps_per_epoch, log_history)
    metrics.update(eval_metrics)
    if cdb_handle is not None:
        cdb_handle.remove()  # the model may outlive this run: leave its optimizer plain
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not end_training(): the process group must outlive this call
        tracker.finish()                  # (A/B runs and callers train several times in one process)
    if accelerator.is_main_process:
        final_model = accelerator.unwrap_model(model)
        state = {"global_step": completed_steps, "max_steps": max_steps, "epoch": completed_steps / steps_per_epoch,
                 "log_history": log_history}
        save_outputs(args.output_dir, final_model, image_processor, cdb_config, metrics, trainer_state=state)
        write_model_card(args.output_dir, model_args, data_args, cdb_config, metrics, training_args=args,
                         log_history=log_history, model=final_model)
        if args.push_to_hub:
            push_outputs(args.output_dir, args)
    accelerator.wait_for_everyone()
    return metrics


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: torch.nn.Module, eval_dataloader: DataLoader, accelerator: Accelerator,
             num_labels: int) -> dict[str, float]:
    """``eval_loss``, ``eval_accuracy`` (and ``eval_top5_accuracy``) over the whole validation set.

    ``gather_for_metrics`` collects every process's predictions and drops the samples duplicated to even
    out the last batch, so each example counts exactly once, whatever the number of processes.
    """
    was_training = model.training
    model.eval()
    metrics = cdb_metrics.load_metrics(num_labels)
    # Summed on the device and read once at the end: a host sync per batch would stall the accelerator.
    sum_dtype = torch.float32 if accelerator.device.type == "mps" else torch.float64  # MPS has no float64
    loss_sum, count = torch.zeros((), dtype=sum_dtype, device=accelerator.device), 0
    for batch in eval_dataloader:
        outputs = model(**batch)
        labels = batch["labels"]
        logits, labels, losses = accelerator.gather_for_metrics(
            (outputs.logits, labels, outputs.loss.detach().float().repeat(labels.shape[0])))
        cdb_metrics.add_batch(metrics, logits, labels)
        loss_sum, count = loss_sum + losses.sum().to(sum_dtype), count + losses.numel()
    model.train(was_training)
    results = {"eval_loss": loss_sum.item() / count if count else float("nan")}
    results.update({f"eval_{name}": value for name, value in cdb_metrics.compute(metrics).items()})
    return results


# ---------------------------------------------------------------------------- checkpoints
class LoopProgress:
    """The loop's position (completed optimizer steps) and log history, saved in every checkpoint's
    :data:`LOOP_CHECKPOINT_MARKER` so that a resumed run continues both (the model card lists the whole run)."""

    def __init__(self) -> None:
        self.completed_steps = 0
        self.log_history: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"completed_steps": self.completed_steps, "log_history": list(self.log_history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.completed_steps = int(state_dict["completed_steps"])
        self.log_history[:] = state_dict.get("log_history", [])


def resolve_loop_checkpoint(training_args: TrainingArguments) -> str | None:
    """The checkpoint ``resume_from_checkpoint`` names (a path, or ``true``/``latest`` for the newest in
    ``output_dir``), checked to be a loop checkpoint; None when not resuming.

    Raises FileNotFoundError when there is nothing to resume from, ValueError for a Trainer checkpoint.
    """
    checkpoint = cli.resolve_resume_checkpoint(training_args)
    if checkpoint is not None and not os.path.isfile(os.path.join(checkpoint, LOOP_CHECKPOINT_MARKER)):
        raise ValueError(f"resume_from_checkpoint: {checkpoint!r} is not a checkpoint of the accelerate loop (it has "
                         f"no {LOOP_CHECKPOINT_MARKER}); a Trainer checkpoint resumes with --trainer hf")
    return checkpoint


def load_loop_state(checkpoint: str, cdb_config: ChannelDropBackConfig | None) -> dict[str, Any]:
    """Read and check a loop checkpoint's :data:`LOOP_CHECKPOINT_MARKER` before any work starts.

    Raises ValueError for a malformed file, and for a CDB run resumed from a baseline checkpoint (or the
    reverse): the saved run and this one would not be the same run.
    """
    path = os.path.join(checkpoint, LOOP_CHECKPOINT_MARKER)
    try:
        with open(path, encoding="utf-8") as file:
            state = json.load(file)
        steps_ok = isinstance(state["completed_steps"], int) and state["completed_steps"] >= 0
        if not (steps_ok and isinstance(state.get("log_history", []), list)):
            raise ValueError("bad completed_steps or log_history")
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"resume_from_checkpoint: {path!r} is not a valid accelerate-loop state file ({error}); "
                         "resume from a checkpoint-N folder this loop wrote") from error
    saved_cdb = state.get("cdb")
    if (saved_cdb is None) != (cdb_config is None):
        raise ValueError(f"resume_from_checkpoint: {checkpoint!r} was saved by a run with CDB "
                         f"{'off' if saved_cdb is None else 'on'}, but this run has CDB "
                         f"{'off' if cdb_config is None else 'on'}; resume with the same --cdb setting")
    return state


def save_checkpoint(accelerator: Accelerator, args: TrainingArguments, completed_steps: int,
                    progress: LoopProgress, cdb: ChannelDropBack | None) -> str:
    """``save_state`` into ``checkpoint-<step>`` (model, optimizer, scheduler, RNG) plus the loop's JSON state
    (position, log history, CDB), then delete the oldest checkpoints beyond ``save_total_limit``."""
    folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{completed_steps}")
    accelerator.save_state(folder)
    if accelerator.is_main_process:
        state = {**progress.state_dict(), "cdb": cdb.state_dict() if cdb is not None else None}
        # Written last, through a temporary file: the marker exists only in a complete checkpoint.
        temporary = os.path.join(folder, LOOP_CHECKPOINT_MARKER + ".tmp")
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(state, file, indent=1)
        os.replace(temporary, os.path.join(folder, LOOP_CHECKPOINT_MARKER))
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


def setup_logging(accelerator: Accelerator, args: TrainingArguments) -> None:
    """The logging of transformers' ``*_no_trainer.py`` examples: info on the main process, and the
    libraries at ``log_level`` (main process) / ``log_level_replica`` (the others)."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    level = args.get_process_log_level()
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


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


# ---------------------------------------------------------------------------- checks and small helpers
def check_loop_arguments(args: TrainingArguments) -> None:
    """Refuse, by name and before any work, the TrainingArguments values the loop cannot honour."""
    optim = str(getattr(args.optim, "value", args.optim))
    if optim not in SUPPORTED_OPTIMIZERS:
        raise ValueError(f"optim={optim!r} is not supported by the accelerate loop; choose one of "
                         f"{', '.join(SUPPORTED_OPTIMIZERS)} (or use --trainer hf)")
    if str(getattr(args.save_strategy, "value", args.save_strategy)) == "best" or args.load_best_model_at_end:
        raise ValueError("save_strategy='best' and load_best_model_at_end are not supported by the accelerate loop; "
                         "use save_strategy 'steps', 'epoch' or 'no' (or --trainer hf)")
    unsupported = {"label_smoothing_factor": args.label_smoothing_factor != 0, "torch_compile": args.torch_compile,
                   "auto_find_batch_size": args.auto_find_batch_size,
                   "train_sampling_strategy": args.train_sampling_strategy not in ("random", "sequential")}
    for name, is_set in unsupported.items():
        if is_set:
            raise ValueError(f"{name}={getattr(args, name)!r} is not supported by the accelerate loop (use --trainer hf, "
                             "or drop the flag; train_sampling_strategy may be 'random' or 'sequential')")
    trackers_for(args.report_to)
    launcher_accumulation = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if launcher_accumulation and int(launcher_accumulation) != args.gradient_accumulation_steps:
        raise ValueError(f"the accelerate launcher sets gradient_accumulation_steps={launcher_accumulation} but the run "
                         f"has --gradient_accumulation_steps {args.gradient_accumulation_steps}; set it once, with "
                         "--gradient_accumulation_steps (the value both training paths read)")


def trackers_for(report_to: list[str] | str | None) -> list[str]:
    """``report_to`` as accelerate's ``log_with``; unknown names raise ValueError."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [name for name in names if name != "none"]
    if "all" in names:
        return ["all"]
    unknown = [name for name in names if name not in SUPPORTED_TRACKERS]
    if unknown:
        raise ValueError(f"report_to={unknown} is not supported by the accelerate loop; choose from "
                         f"{', '.join(SUPPORTED_TRACKERS)}, 'all' or 'none'")
    return names


def refuse_unsupported_distribution(accelerator: Accelerator) -> None:
    """Refuse FSDP and DeepSpeed launches (e.g. from an accelerate config file) before any data is loaded.

    DeepSpeed steps its optimizer inside ``backward()`` with ``param.grad`` usually ``None`` (ZeRO), so CDB's
    optimizer hooks would see nothing to mask. FSDP shards parameters and gradients along dim 0 (FSDP2
    DTensors; FSDP1 flat parameters hide the layers altogether), while CDB's core masks whole tensors.
    """
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise ValueError("ChannelDropBack does not support DeepSpeed (its optimizer steps inside backward(), before "
                         "CDB can mask the gradients); launch plain DDP instead: accelerate launch --multi_gpu or "
                         "torchrun")
    if kind == DistributedType.FSDP:
        raise ValueError("ChannelDropBack does not support FSDP (it shards the gradient rows CDB selects); launch "
                         "plain DDP instead: accelerate launch --multi_gpu or torchrun")
    if kind == DistributedType.MEGATRON_LM:
        raise ValueError("ChannelDropBack does not support Megatron-LM; launch plain DDP instead")


def build_optimizer(model: torch.nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """The Trainer's optimizer: the same class and kwargs, no weight decay on biases and norms."""
    # The same exclusions as Trainer.get_decay_parameter_names.
    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], forbidden))
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay and p.requires_grad],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n not in decay and p.requires_grad],
         "weight_decay": 0.0},
    ]
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return optimizer_cls([group for group in groups if group["params"]], **optimizer_kwargs)


def _cdb_ran(cdb: ChannelDropBack, completed_steps: int, accelerator: Accelerator) -> bool:
    """Whether CDB's hooks ran in this optimizer step (they advance its step); an AMP overflow skip is the
    only legitimate reason for them not to, anything else would mean CDB silently did nothing."""
    if cdb.step == completed_steps:
        return True
    if not accelerator.optimizer_step_was_skipped:
        raise RuntimeError("ChannelDropBack's optimizer hooks did not run during this optimizer step (the optimizer "
                           "was replaced, or stepped outside torch.optim); refusing to continue without CDB")
    return False



def _interval(value: float, max_steps: int) -> int:
    """TrainingArguments' convention: a value below 1 is a fraction of the run."""
    return max(math.ceil(value * max_steps), 1) if value < 1 else int(value)


def _due(strategy: Any, steps: float | None, completed_steps: int, max_steps: int, end_of_epoch: bool) -> bool:
    """Whether a ``steps``/``epoch``/``no`` strategy (logging, eval, save) fires after this optimizer step."""
    strategy = str(getattr(strategy, "value", strategy))
    if strategy == "steps":
        return bool(steps) and completed_steps % _interval(steps, max_steps) == 0
    return strategy == "epoch" and end_of_epoch


def _hyperparameters(model_args: ModelArguments, data_args: DataArguments,
                     cdb_config: ChannelDropBackConfig | None, args: TrainingArguments) -> dict[str, Any]:
    """A flat, tracker-safe copy of the run's settings, without any token."""
    values: dict[str, Any] = dict(args.to_sanitized_dict())
    values.update({f"model_{k}": v for k, v in vars(model_args).items() if k != "token"})
    values.update({f"data_{k}": v for k, v in vars(data_args).items()})
    values.update({f"cdb_{k}": v for k, v in (cdb_config.to_dict() if cdb_config else {"enabled": False}).items()})
    values.pop("hub_token", None)
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in values.items()}
