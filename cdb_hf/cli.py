"""``run_finetune.py``: parse (recipe file + flags), validate everything that can be checked early, dispatch.

Conventions follow transformers' ``run_image_classification.py``: ``HfArgumentParser`` over the
argument dataclasses plus ``TrainingArguments``. A YAML or JSON recipe may come first; every flag
after it overrides the recipe::

    python run_finetune.py recipes/vit_cifar10.yaml --learning_rate 1e-4 --cdb_channel_rate 0.5

Bad input ends with one line on stderr (``run_finetune.py: error: ...``) and exit code 2, before any
training starts and before anything is written to ``--output_dir``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .arguments import CDBArguments, DataArguments, ModelArguments, RunArguments
from .callback import check_supported_setup
from .core import ChannelDropBack, ChannelDropBackConfig
from .hub import check_can_push

__all__ = ["PROG", "build_parser", "check_cdb_against_model", "check_dataloader_arguments", "check_output_dir",
           "clear_output_dir_for_overwrite", "load_recipe", "main", "mark_training_started", "parse_args",
           "resolve_resume_checkpoint", "validate_args"]

logger = logging.get_logger(__name__)

PROG = "run_finetune.py"
RECIPE_SUFFIXES = (".yaml", ".yml", ".json")
_FALSE_STRINGS = ("", "false", "no", "0", "none")

# Set once training has begun: from then on an exception is a failure to debug (full traceback), not
# bad input to report in one line.
_state = {"training_started": False}


def build_parser() -> HfArgumentParser:
    """The parser over the five argument dataclasses, in the order :func:`parse_args` returns them.

    A malformed flag raises ValueError (instead of argparse's usage dump), so that :func:`main` reports it
    in one line like every other bad input.
    """
    parser = HfArgumentParser((ModelArguments, DataArguments, CDBArguments, RunArguments, TrainingArguments))
    parser.prog = PROG

    def error(message: str):
        raise ValueError(message)

    parser.error = error
    return parser


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a flat YAML or JSON recipe (``{flag name: value}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as error:  # both parsers' errors are reported the same way
        raise ValueError(f"recipe {str(path)!r} is not valid {path.suffix[1:].upper()}: {error}") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe {str(path)!r} must be a mapping of flag names to values, got "
                         f"{type(values).__name__}")
    return values


def parse_args(argv: list[str] | None = None) -> tuple[Any, Any, Any, Any, TrainingArguments]:
    """Parse ``[recipe.yaml|recipe.json] [--flag value ...]`` into the five argument dataclasses.

    Returns ``(model_args, data_args, cdb_args, run_args, training_args)``. Flags override the recipe.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe: dict[str, Any] = {}
    recipe_name = None
    if argv and not argv[0].startswith("-") and argv[0].lower().endswith(RECIPE_SUFFIXES):
        recipe_name = argv.pop(0)
        recipe = load_recipe(recipe_name)
    _refuse_deepspeed_early(recipe, argv)
    parser = build_parser()
    if recipe:
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(recipe) - known)
        if unknown:
            raise ValueError(f"recipe {recipe_name!r} has unknown key(s) {unknown}; keys are the flag names "
                             "without '--' (e.g. learning_rate, cdb_channel_rate)")
        # Recipe values become the parser's defaults, so any flag on the command line wins.
        parser.set_defaults(**recipe)
    model_args, data_args, cdb_args, run_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, cdb_args, run_args, training_args


def validate_args(model_args, data_args, cdb_args, run_args,
                  training_args: TrainingArguments) -> ChannelDropBackConfig | None:
    """Check everything that needs neither data nor model; return the CDB config (None for a baseline).

    Raises ValueError / FileNotFoundError naming the bad value. Shared by the Trainer path and the
    accelerate loop; the include/exclude patterns are checked later, against the loaded model.
    """
    check_supported_setup(training_args)
    if run_args.trainer not in ("hf", "accelerate"):
        raise ValueError(f"trainer={run_args.trainer!r} is not valid; choose 'hf' or 'accelerate'")
    if not isinstance(run_args.ab_seeds, int) or run_args.ab_seeds < 0:
        raise ValueError(f"ab_seeds={run_args.ab_seeds!r} is not valid; it must be an integer >= 0")
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required (a Hub model id, a local save_pretrained directory, "
                         "or builtin:efficientnet_lite0)")
    if not (data_args.dataset_name or data_args.train_dir):
        raise ValueError("no training data: pass --dataset_name (Hub id, local dataset folder or builtin:...) "
                         "or --train_dir (an image folder)")
    cdb_config = cdb_args.to_config()  # the core validates every rate and mode
    if getattr(training_args, "batch_eval_metrics", False):
        raise ValueError("--batch_eval_metrics true is not supported: cdb_hf computes its metrics over the whole "
                         "evaluation set at once; drop the flag")
    check_dataloader_arguments(training_args)
    check_can_push(training_args)
    check_output_dir(training_args, run_args)
    return cdb_config


def check_dataloader_arguments(training_args: TrainingArguments) -> None:
    """Refuse persistent dataloader workers, which would silently repeat epoch 0's augmentation.

    Each worker holds its own copy of :class:`~cdb_hf.data.PerExampleSeeded`; the epoch that seeds the crops is set on
    the main process's copy before each epoch, which fresh workers pick up and persistent ones never see.
    """
    if training_args.dataloader_persistent_workers and training_args.dataloader_num_workers > 0:
        raise ValueError("--dataloader_persistent_workers true is not supported: persistent workers keep the "
                         "first epoch's augmentation seeds, so every epoch would crop and flip alike; drop the flag "
                         f"(--dataloader_num_workers {training_args.dataloader_num_workers} alone starts fresh "
                         "workers each epoch)")


def resolve_resume_checkpoint(training_args: TrainingArguments) -> str | None:
    """The checkpoint to resume from: ``--resume_from_checkpoint PATH``, or ``true`` for the latest one
    (``checkpoint-N``) in ``--output_dir``; None when not resuming."""
    value = training_args.resume_from_checkpoint
    if value is None or (isinstance(value, bool) and not value) or str(value).strip().lower() in _FALSE_STRINGS:
        return None
    if value is True or str(value).strip().lower() in ("true", "yes", "1", "last", "latest"):
        latest = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if latest is None:
            raise FileNotFoundError(f"--resume_from_checkpoint {value}: no checkpoint-N folder in output_dir "
                                    f"{training_args.output_dir!r} to resume from")
        return latest
    if not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint {value!r} is not a checkpoint folder")
    return str(value)


def check_output_dir(training_args: TrainingArguments, run_args) -> None:
    """Refuse an output_dir that already holds a different run, so that nothing of it is lost.

    A non-empty directory is accepted only when resuming from a checkpoint inside it or with
    ``--overwrite_output_dir``.
    """
    output_dir = Path(training_args.output_dir)
    resume = resolve_resume_checkpoint(training_args)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {str(output_dir)!r} exists and is not a directory")
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if getattr(run_args, "overwrite_output_dir", False):
        return
    if resume is not None and Path(resume).resolve().is_relative_to(output_dir.resolve()):
        return
    raise ValueError(f"output_dir {str(output_dir)!r} already holds a different run; pass --overwrite_output_dir "
                     "to write over it, --resume_from_checkpoint true to continue it, or choose another "
                     "--output_dir")


def check_cdb_against_model(model, cdb_config: ChannelDropBackConfig) -> None:
    """Raise the core's ValueError now if include/exclude/skip_first leave no layer of this model.

    Both training paths call it right after loading the model, before anything is written to output_dir.
    """
    # The schedule length is only known once the run is sized; any value checks the layers.
    ChannelDropBack(model, cdb_config.for_run(total_steps=1, steps_per_epoch=1))


def clear_output_dir_for_overwrite(training_args: TrainingArguments, run_args, is_main_process: bool) -> bool:
    """Empty output_dir when ``--overwrite_output_dir`` writes a new run over an old one; return whether it did.

    Leftovers of the old run would be read as this run's: a stale cdb_config.json would label a baseline as a
    CDB run, and stale checkpoint-N folders would be picked by ``--resume_from_checkpoint true`` and by
    checkpoint rotation. Call it on every process right before training starts (after every check, data and
    model load, so bad input never costs the old run); only the main process deletes, and the caller
    synchronises the processes afterwards. A resumed run keeps its directory.
    """
    if not getattr(run_args, "overwrite_output_dir", False) or resolve_resume_checkpoint(training_args) is not None:
        return False
    output_dir = Path(training_args.output_dir)
    if not is_main_process or not output_dir.is_dir():
        return False
    for entry in output_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    logger.info(f"--overwrite_output_dir: emptied {str(output_dir)!r} before training")
    return True


def mark_training_started() -> None:
    """Called by the training paths right before the first step: later errors keep their traceback."""
    _state["training_started"] = True


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``run_finetune.py``; returns the process exit code."""
    _state["training_started"] = False
    try:
        args = parse_args(argv)
        validate_args(*args)
        run_args = args[3]
        if run_args.ab_seeds > 0:
            from .ab import run_ab

            failed = run_ab(*args)["failed_runs"]
            if failed:  # the report lists them; a script driving the A/B run must see it too
                print(f"{PROG}: {len(failed)} A/B run(s) failed; see the report", file=sys.stderr)
                return 1
        elif run_args.trainer == "accelerate":
            from .accelerate_loop import train

            train(*args)
        else:
            from .trainer_path import train

            train(*args)
    except (ValueError, OSError, ImportError) as error:
        if _state["training_started"]:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    return 0


def _refuse_deepspeed_early(recipe: dict[str, Any], argv: list[str]) -> None:
    """TrainingArguments imports DeepSpeed as soon as --deepspeed is set, so refuse before parsing."""
    in_argv = any(arg == "--deepspeed" or arg.startswith("--deepspeed=") for arg in argv)
    if in_argv or recipe.get("deepspeed"):
        check_supported_setup(SimpleNamespace(deepspeed=True, fsdp=None))
