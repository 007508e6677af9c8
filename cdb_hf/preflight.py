"""Pre-flight: every check a run needs, run once, before anything is loaded or written.

:func:`plan_run` takes the five argument dataclasses and returns a :class:`~cdb_hf.plan.RunPlan` that both
training faces consume: the validated CDB configuration, what happens to ``--output_dir`` (a fresh run, a
resumed one, or a transactional replacement of an earlier cdb_hf run: :mod:`cdb_hf.output_dir`), and the
checkpoint to resume from (:mod:`cdb_hf.resume`). Bad input raises :class:`~cdb_hf.errors.UsageError`,
which ``run_finetune.py`` prints as one line with exit code 2. The checks the faces also run later, once
the model is loaded or inside a user's own Trainer, live in :mod:`cdb_hf.checks`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from . import builtin, image_check, transforms
from .ab_args import parse_extra_arm
from .checks import (
    check_finite_everywhere,
    check_loop_arguments,
    check_lr_schedule,
    check_supported_setup,
    check_training_arguments,
)
from .errors import _FALSE_STRINGS, UsageError, preview, usage_errors
from .hub_auth import check_can_push
from .output_dir import plan_output_dir
from .plan import RunPlan
from .run_dir import is_finite_number, read_run_marker

__all__ = ["check_evaluate_only", "check_lora_arguments", "check_predict_arguments", "plan_run"]


def plan_run(model_args, data_args, cdb_args, run_args, training_args: TrainingArguments) -> RunPlan:
    """Check everything that needs neither data nor model; raise :class:`UsageError` naming the bad value."""
    with usage_errors():
        check_supported_setup(training_args)
        _check_run_arguments(run_args)
        _check_path_values(model_args, data_args, training_args)
        if not model_args.model_name_or_path:
            raise UsageError("--model_name_or_path is required (a Hub model id, a local save_pretrained directory, "
                             f"or one of {', '.join(builtin.list_builtin_sources('model'))})")
        kind = "train" if training_args.do_train else "eval"
        check_predict_arguments(data_args, training_args)
        if kind == "eval":
            check_evaluate_only(model_args, data_args, run_args, training_args)
        elif not (data_args.dataset_name or data_args.train_dir):
            raise UsageError("no training data: pass --dataset_name (Hub id, local dataset folder or builtin:...) "
                             "or --train_dir (an image folder)")
        check_finite_everywhere(model_args, data_args, cdb_args, run_args, training_args)
        _check_ranges(model_args, run_args, training_args)
        if data_args.train_augmentation not in transforms.TRAIN_AUGMENTATIONS:  # a recipe bypasses argparse's choices
            raise UsageError(f"--train_augmentation {data_args.train_augmentation!r} is not valid; choose one of "
                             f"{', '.join(transforms.TRAIN_AUGMENTATIONS)}")
        if data_args.corrupt_images not in image_check.CORRUPT_IMAGE_MODES:
            raise UsageError(f"--corrupt_images {data_args.corrupt_images!r} is not valid; choose one of "
                             f"{', '.join(image_check.CORRUPT_IMAGE_MODES)}")
        cache_mb = data_args.train_image_cache_mb
        if isinstance(cache_mb, bool) or not isinstance(cache_mb, int) or cache_mb < 0:
            raise UsageError(f"--train_image_cache_mb must be a whole number of MiB >= 0 (0 turns the cache off), "
                             f"got {cache_mb!r}")
        check_lora_arguments(model_args)
        from .streaming import check_streaming_arguments

        check_streaming_arguments(data_args, run_args, training_args, cdb_args)
        check_training_arguments(training_args)
        check_lr_schedule(run_args, training_args)
        if run_args.trainer == "accelerate":
            check_loop_arguments(training_args)
        notes: list[str] = []
        _resolve_epoch_milestones(cdb_args, run_args, training_args, notes)
        cdb_config = cdb_args.to_config()  # the core validates every rate and mode
        if run_args.ab_seeds and cdb_config is None:  # the A/B runner's CDB arm must be valid too
            dataclasses.replace(cdb_args, cdb=True).to_config()
        check_can_push(training_args)
        extra_arm = parse_extra_arm(run_args, training_args)
        plan = RunPlan(model_args, data_args, cdb_args, run_args, training_args, cdb_config, extra_arm=extra_arm,
                       kind=kind, notes=notes)
        plan_output_dir(plan)
        if kind == "eval" and plan.output_mode == "replace":
            marker = read_run_marker(training_args.output_dir) or {}
            if marker.get("kind") != "eval":  # a training run's files are never an evaluation's to replace
                raise UsageError(f"--do_train false would replace the training run in --output_dir "
                                 f"{training_args.output_dir!r}; an evaluation never touches a training run: give "
                                 "another --output_dir")
    return plan


#: The most paired seeds ``--ab_seeds`` takes (each is two full training runs).
MAX_AB_SEEDS = 1000
#: The most epochs a run may have (a larger --num_train_epochs is a typo, not a plan).
MAX_EPOCHS = 100_000
_MAX_SEED = 2**32 - 1


#: Flags that name a local path (or a Hub id): never an empty string, always a string.
_PATH_FLAGS = {"model": ("model_name_or_path", "config_name", "image_processor_name", "cache_dir"),
               "data": ("dataset_name", "train_dir", "validation_dir", "predict_dir"),
               "training": ("output_dir", "logging_dir")}


def _check_path_values(model_args, data_args, training_args: TrainingArguments) -> None:
    """Every path value is a real path: a string, not empty (an empty one would mean the current directory);
    the validation folder is not the training folder."""
    for group, arguments in (("model", model_args), ("data", data_args), ("training", training_args)):
        for name in _PATH_FLAGS[group]:
            value = getattr(arguments, name, None)
            if value is None:
                continue
            if not isinstance(value, (str, os.PathLike)):
                raise UsageError(f"--{name} {preview(value)} is not valid: it must be a path or name (a string), "
                                 f"got a {type(value).__name__}")
            if not str(value).strip():
                raise UsageError(f"--{name} {str(value)!r} is empty: give a path (an empty one would silently mean "
                                 "the current directory), or leave the flag out")
    train_dir, validation_dir = data_args.train_dir, data_args.validation_dir
    if train_dir and validation_dir and os.path.exists(os.path.expanduser(train_dir)) and \
            Path(os.path.expanduser(train_dir)).resolve() == Path(os.path.expanduser(validation_dir)).resolve():
        raise UsageError(f"--validation_dir {validation_dir!r} is --train_dir: the run would be evaluated on its own "
                         "training images; give a separate folder, or leave --validation_dir out to carve a "
                         "validation split (--train_val_split)")


def _check_ranges(model_args, run_args, training_args: TrainingArguments) -> None:
    """Values whose range only shows late (after a first A/B arm trained) or as a MemoryError."""
    seed = training_args.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        raise UsageError(f"--seed {preview(seed)} is not valid; it must be an integer in [0, 2**32 - 1]")
    n_seeds = run_args.ab_seeds
    if isinstance(n_seeds, int) and not isinstance(n_seeds, bool) and n_seeds > 0:
        if n_seeds > MAX_AB_SEEDS:
            raise UsageError(f"--ab_seeds {n_seeds} is not valid; it must be at most {MAX_AB_SEEDS} (each seed is "
                             "two full training runs)")
        if seed + n_seeds - 1 > _MAX_SEED:
            raise UsageError(f"--ab_seeds {n_seeds} with --seed {seed} would use seeds up to {seed + n_seeds - 1}, "
                             f"beyond 2**32 - 1; lower --seed to at most {_MAX_SEED - n_seeds + 1}")
    max_steps = training_args.max_steps
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or (max_steps != -1 and max_steps < 1):
        raise UsageError(f"--max_steps {preview(max_steps)} is not valid; it must be a positive integer, or unset "
                         "(-1: the run's length is --num_train_epochs)")
    epochs = training_args.num_train_epochs
    if max_steps == -1 and isinstance(epochs, (int, float)) and not isinstance(epochs, bool) and epochs > MAX_EPOCHS:
        raise UsageError(f"--num_train_epochs {epochs!r} is not valid; it must be at most {MAX_EPOCHS}")
    size = getattr(model_args, "image_size", None)
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        batch = max(int(training_args.per_device_train_batch_size or 1), 1)
        needed = batch * 3 * size * size * 4  # one float32 batch of pixels, before any activation
        available = _physical_memory()
        if available and needed > available // 4:
            largest = int(math.sqrt(available // 4 / (batch * 12)))
            raise UsageError(f"--image_size {size} is not valid: one batch of {batch} such images takes "
                             f"{needed / 2**30:.1f} GiB as float32, over a quarter of this machine's "
                             f"{available / 2**30:.0f} GiB; give at most {largest} px (typical: 224 or 384)")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------------ eval / predict
#: Flags that only mean something when training: refused with ``--do_train false`` (by the name a user typed).
_TRAINING_ONLY = ("resume_from_checkpoint", "ab_seeds", "ab_extra_arm", "push_to_hub", "lora_r", "lora_alpha",
                  "lora_dropout", "lora_target_modules", "lora_merge")


def check_evaluate_only(model_args, data_args, run_args, training_args: TrainingArguments) -> None:
    """``--do_train false``: refuse the flags that need training, and require something to evaluate or predict."""
    defaults = {"resume_from_checkpoint": None, "ab_seeds": 0, "ab_extra_arm": None, "push_to_hub": False,
                "lora_r": 0, "lora_alpha": None, "lora_dropout": 0.0, "lora_target_modules": None, "lora_merge": False}
    for name in _TRAINING_ONLY:
        source = next(obj for obj in (training_args, run_args, model_args) if hasattr(obj, name))
        value = getattr(source, name)
        if value not in (defaults[name], None, "") and not (name == "resume_from_checkpoint"
                                                            and str(value).lower() in _FALSE_STRINGS):
            raise UsageError(f"--{name} needs training, but --do_train is false (evaluate/predict only); drop "
                             f"--{name}, or train with --do_train true")
    model = model_args.model_name_or_path
    marker = read_run_marker(os.path.expanduser(model)) if isinstance(model, str) and model else None
    if marker is not None and marker.get("kind", "run") == "run" and marker.get("status") != "complete":
        raise UsageError(f"--model_name_or_path {model!r} is a cdb_hf run that did not complete (status "
                         f"{marker.get('status')!r}): its final model was never written, or is from another run; "
                         "evaluate one of its checkpoint-N folders, or finish it with --resume_from_checkpoint true")
    has_eval_data = bool(data_args.dataset_name or data_args.train_dir or data_args.validation_dir)
    if not has_eval_data and not training_args.do_predict:
        raise UsageError("--do_train false has nothing to do: pass data to evaluate on (--dataset_name, "
                         "--validation_dir or --train_dir) and/or --do_predict with --predict_dir or "
                         "--predict_split_name")


def check_predict_arguments(data_args, training_args: TrainingArguments) -> None:
    """``--do_predict`` takes exactly one of ``--predict_dir`` / ``--predict_split_name``, and they need it."""
    predict_dir, split = data_args.predict_dir, data_args.predict_split_name
    given = [flag for flag, value in (("predict_dir", predict_dir), ("predict_split_name", split)) if value]
    if not training_args.do_predict:
        if given:
            raise UsageError(f"--{given[0]} needs --do_predict (it names what to predict); add --do_predict or drop "
                             f"--{given[0]}")
        return
    if len(given) != 1:
        what = "both" if given else "neither"
        raise UsageError(f"--do_predict needs exactly one of --predict_dir (an image folder) or --predict_split_name "
                         f"(a split of --dataset_name, e.g. test); {what} given")
    if predict_dir:
        path = Path(os.path.expanduser(predict_dir))
        if not path.is_dir():
            raise UsageError(f"--predict_dir {predict_dir!r} is not a directory; give a folder of images (flat or "
                             "with sub-folders)")
    elif not data_args.dataset_name:
        raise UsageError(f"--predict_split_name {split!r} names a split of --dataset_name, which is not given; use "
                         "--predict_dir for an image folder")


# ------------------------------------------------------------------------------------------------ values
def _check_run_arguments(run_args) -> None:
    if run_args.trainer not in ("hf", "accelerate"):
        raise UsageError(f"--trainer {run_args.trainer!r} is not valid; choose 'hf' or 'accelerate'")
    if isinstance(run_args.ab_seeds, bool) or not isinstance(run_args.ab_seeds, int) or run_args.ab_seeds < 0:
        raise UsageError(f"--ab_seeds {run_args.ab_seeds!r} is not valid; it must be an integer >= 0")
    for name in ("overwrite_output_dir", "channels_last", "resume_allow_cdb_changes", "weight_decay_all"):
        value = getattr(run_args, name, False)
        if not isinstance(value, bool):
            raise UsageError(f"--{name} {value!r} is not valid; it must be true or false")


def official_cdb_phase_starts(epochs: float) -> list[int]:
    """The official StepLR_Dropback's phase starts for a run of ``epochs``: round(0.3E)+2 and round(0.6E)+2 (its
    epoch counter is compared before it is incremented, so each phase starts two epochs after round(fE))."""
    return [round(0.3 * epochs) + 2, round(0.6 * epochs) + 2]


def _resolve_epoch_milestones(cdb_args, run_args, args: TrainingArguments, notes: list[str]) -> None:
    """Epoch milestones follow the run's own length: unset ones are the official rule for its E (the learning
    rate's in :mod:`cdb_hf.optimization`, CDB's filled in here); given ones must fall inside the run."""
    from .optimization import lr_milestone_epochs

    by_epochs = args.max_steps is None or args.max_steps <= 0
    epochs = args.num_train_epochs
    piecewise = cdb_args.cdb_schedule == "piecewise" and cdb_args.cdb_schedule_unit == "epochs"  # A/B: either arm
    multistep = getattr(run_args, "lr_schedule", "trainer") == "multistep"
    # CDB's epochs are known on a --max_steps run (a stream) when the user gives their length in steps.
    cdb_by_epochs, cdb_epochs = by_epochs, epochs
    if not by_epochs and cdb_args.cdb_schedule_steps_per_epoch:
        cdb_by_epochs, cdb_epochs = True, math.ceil(args.max_steps / cdb_args.cdb_schedule_steps_per_epoch)
    if piecewise and cdb_args.cdb_schedule_milestones is None:
        if not cdb_by_epochs:
            raise UsageError("--cdb_schedule piecewise in epochs without --cdb_schedule_milestones takes the official "
                             "rule from the run's epochs, but --max_steps sets the run's length in steps; give "
                             "--num_train_epochs instead, --cdb_schedule_steps_per_epoch, or the milestones (epochs)")
        starts = official_cdb_phase_starts(cdb_epochs)
        if starts[0] >= starts[1] or cdb_args.cdb_schedule_rates is None or len(cdb_args.cdb_schedule_rates) != 3:
            raise UsageError(f"--cdb_schedule piecewise without --cdb_schedule_milestones needs three "
                             f"--cdb_schedule_rates and a run long enough for the official phases (round(0.3E)+2 < "
                             f"round(0.6E)+2; E = {cdb_epochs:g} gives {starts}); give the milestones explicitly")
        cdb_args.cdb_schedule_milestones = starts
        notes.append(f"CDB layer rate by the official rule for {cdb_epochs:g} epochs: "
                     f"{', '.join(f'{r:g} from epoch {e}' for r, e in zip(cdb_args.cdb_schedule_rates, [0, *starts]))}")
    elif piecewise and cdb_by_epochs:
        _refuse_outside_run("cdb_schedule_milestones", cdb_args.cdb_schedule_milestones, cdb_epochs,
                            "round(0.3E)+2, round(0.6E)+2")
    elif piecewise:
        notes.append(f"--cdb_schedule_milestones {preview(cdb_args.cdb_schedule_milestones)} count epochs of a run "
                     "whose length is --max_steps: check that they fall inside it")
    if multistep and by_epochs:
        if run_args.lr_milestones is None:
            notes.append(f"learning rate x{run_args.lr_gamma:g} by the official rule for {epochs:g} epochs: from "
                         f"epochs {', '.join(str(m) for m in lr_milestone_epochs(None, math.ceil(epochs)))}")
        else:
            _refuse_outside_run("lr_milestones", run_args.lr_milestones, epochs, "round(0.3E), round(0.6E), "
                                "round(0.85E)")
    elif multistep and run_args.lr_milestones is not None:
        notes.append(f"--lr_milestones {preview(run_args.lr_milestones)} count epochs of a run whose length is "
                     "--max_steps: check that they fall inside it")


def _refuse_outside_run(flag: str, milestones: Any, epochs: float, rule: str) -> None:
    if isinstance(milestones, (list, tuple)) and any(is_finite_number(m) and m >= epochs for m in milestones):
        raise UsageError(f"--{flag} {preview(milestones)} do not fit a run of {epochs:g} epochs (a milestone at or "
                         f"past the last epoch never takes effect); give milestones below {epochs:g}, or leave them "
                         f"unset for the official rule for the run's length ({rule})")


def check_lora_arguments(model_args) -> None:
    """The ``--lora_*`` values (:class:`~cdb_hf.arguments.ModelArguments`), and peft being installed.

    A LoRA flag without ``--lora_r`` would silently do nothing, so it is refused too. Whether the target
    modules exist needs the checkpoint's config: :func:`cdb_hf.models.check_lora_targets`.
    """
    rank = getattr(model_args, "lora_r", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise UsageError(f"--lora_r {rank!r} is not valid; it must be an integer >= 0 (0 = no LoRA, e.g. 8 or 16)")
    alpha, dropout = model_args.lora_alpha, model_args.lora_dropout
    targets, merge = model_args.lora_target_modules, model_args.lora_merge
    if rank == 0:
        given = [flag for flag, is_set in (("lora_alpha", alpha is not None), ("lora_dropout", dropout != 0),
                                           ("lora_target_modules", targets is not None), ("lora_merge", merge))
                 if is_set]
        if given:
            raise UsageError(f"--{given[0]} only applies to LoRA fine-tuning; pass --lora_r (e.g. 8) or drop "
                             f"{', '.join('--' + flag for flag in given)}")
        return
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, int) or alpha <= 0):
        raise UsageError(f"--lora_alpha {alpha!r} is not valid; it must be an integer > 0 (or unset: lora_r)")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UsageError(f"--lora_dropout {dropout!r} is not valid; it must be a number in [0, 1)")
    if targets is not None and (isinstance(targets, str) or not targets
                                or not all(isinstance(t, str) and t.strip() for t in targets)):
        raise UsageError(f"--lora_target_modules {targets!r} is not valid; give one or more layer names or dotted "
                         "name suffixes (e.g. q_proj v_proj), or leave it unset for the architecture's default")
    if not isinstance(merge, bool):
        raise UsageError(f"--lora_merge {merge!r} is not valid; it must be true or false")
    try:
        import peft  # noqa: F401
    except ImportError as error:
        raise UsageError("--lora_r needs the peft library, which is not installed: pip install 'cdb_hf[peft]'") \
            from error


