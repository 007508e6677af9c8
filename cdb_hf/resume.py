"""The resume checks: which checkpoint ``--resume_from_checkpoint`` names, and whether this run may continue it.

Pre-flight (:mod:`cdb_hf.output_dir`) resolves the checkpoint and refuses an incomplete one, one of the
other training path, one whose LoRA or CDB settings differ; the faces compare the CDB record again when
they restore (:func:`check_resume_matches`), and the accelerate loop checks its saved loop state
(:func:`loop_state_error`). Every refusal is a :class:`~cdb_hf.errors.UsageError`.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from transformers import TrainingArguments
from transformers.utils import logging

from .errors import _FALSE_STRINGS, UsageError
from .run_dir import (
    _read_json_dict,
    checkpoint_step,
    find_checkpoints,
    is_finite_number,
    read_checkpoint_record,
    read_run_marker,
)

__all__ = ["RUN_SIZED_FIELDS", "check_resume_matches", "checkpoint_load_error", "loop_state_error",
           "resolve_resume_checkpoint", "saved_cdb_settings"]

logger = logging.get_logger(__name__)


def resolve_resume_checkpoint(training_args: TrainingArguments, notes: list[str] | None = None,
                              skipped_paths: list[str] | None = None) -> str | None:
    """The checkpoint to resume from: ``--resume_from_checkpoint PATH``, or ``true`` for the newest *complete*
    ``checkpoint-N`` in ``--output_dir`` (incomplete ones are skipped, named in ``notes`` and listed in
    ``skipped_paths``); None when not resuming."""
    value = training_args.resume_from_checkpoint
    if value is None or (isinstance(value, bool) and not value) or str(value).strip().lower() in _FALSE_STRINGS:
        return None
    if value is True or str(value).strip().lower() in ("true", "yes", "1", "last", "latest"):
        skipped = []
        for checkpoint in find_checkpoints(training_args.output_dir):
            record, why = read_checkpoint_record(checkpoint)
            if record is not None:
                for path, reason in skipped:
                    message = f"skipped incomplete checkpoint {path}: {reason}"
                    if notes is not None:  # said once, with the run's other notes, when it starts
                        notes.append(message)
                    else:
                        logger.warning(message)
                    if skipped_paths is not None:
                        skipped_paths.append(path)
                return str(checkpoint)
            skipped.append((str(checkpoint), why))
        detail = f"; skipped: {'; '.join(f'{p} ({w})' for p, w in skipped)}" if skipped else ""
        raise UsageError(f"--resume_from_checkpoint {value}: no complete checkpoint-N folder in output_dir "
                         f"{training_args.output_dir!r} to resume from{detail}")
    if not os.path.isdir(value):
        raise UsageError(f"--resume_from_checkpoint {value!r} is not a checkpoint folder")
    if read_run_marker(value) is not None and checkpoint_step(value) is None:  # a run folder: its newest checkpoint
        for checkpoint in find_checkpoints(value):
            if read_checkpoint_record(checkpoint)[0] is not None:
                if notes is not None:
                    notes.append(f"--resume_from_checkpoint {value!r} is a run folder: resuming from its newest "
                                 f"complete checkpoint, {checkpoint}")
                return str(checkpoint)
        raise UsageError(f"--resume_from_checkpoint {value!r} is a run folder with no complete checkpoint-N to "
                         f"resume from; to fine-tune its final model further, pass --model_name_or_path {value!r}")
    return str(value)


def _check_resume_checkpoint(checkpoint: str, plan: Any) -> dict[str, Any] | None:
    """Refuse an incomplete checkpoint, one of the other training path, or one whose CDB settings differ."""
    record, why = read_checkpoint_record(checkpoint)
    trainer = plan.run.trainer
    if record is None:
        legacy_trainer = (Path(checkpoint) / "trainer_state.json").is_file() and trainer == "hf"
        if not legacy_trainer:
            raise UsageError(f"--resume_from_checkpoint {checkpoint!r} is not a complete cdb_hf checkpoint: {why}")
        # A checkpoint of a plain transformers Trainer: resumable, but nothing records its CDB settings.
        _check_trainer_state(checkpoint)
        plan.notes.append(f"{checkpoint} was not written by cdb_hf: its CDB settings cannot be checked")
        missing = [name for name in ("optimizer.pt", "scheduler.pt") if not (Path(checkpoint) / name).is_file()]
        if missing:
            plan.notes.append(f"{checkpoint} has no {' or '.join(missing)}: the resumed run starts "
                              f"{'the optimizer (its momentum)' if 'optimizer.pt' in missing else ''}"
                              f"{' and ' if len(missing) == 2 else ''}"
                              f"{'the learning-rate schedule' if 'scheduler.pt' in missing else ''} afresh, so it "
                              "does not continue the interrupted run exactly")
        return None
    if record["trainer"] != trainer:
        other = {"hf": "the Trainer (--trainer hf)", "accelerate": "the accelerate loop (--trainer accelerate)"}
        raise UsageError(f"--resume_from_checkpoint {checkpoint!r} was written by {other[record['trainer']]}; resume "
                         f"it with --trainer {record['trainer']}")
    if trainer == "hf":
        _check_trainer_state(checkpoint)
    _check_resume_lora(checkpoint, plan.model)
    check_resume_matches(record, plan.cdb_config.to_dict() if plan.cdb_config else None, plan.run, checkpoint,
                         sized=False)
    return record


def _check_resume_lora(checkpoint: str, model_args) -> None:
    """A LoRA checkpoint resumes only as LoRA with the same rank and alpha, and a full one only without LoRA."""
    folder = Path(checkpoint)
    adapter_config = folder / "adapter_config.json"
    if adapter_config.is_file():  # the Trainer's checkpoint of a peft model
        saved = _read_json_object(adapter_config)
    elif (folder / "model.safetensors").is_file():  # accelerate's save_state: peft's keys tell
        from safetensors import safe_open

        try:
            with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
                saved = {} if any(".lora_A." in key for key in weights.keys()) else None
        except Exception:  # a damaged file is reported when it is loaded
            return
    else:
        return
    rank = getattr(model_args, "lora_r", 0)
    if (saved is None) != (rank == 0):
        what = "a LoRA adapter" if saved is not None else "a full fine-tuning (no LoRA)"
        raise UsageError(f"--resume_from_checkpoint {checkpoint!r} holds {what}; resume it "
                         f"{'with the same --lora_r' if saved is not None else 'without --lora_r'}")
    alpha = model_args.lora_alpha if model_args.lora_alpha is not None else rank
    for name, now in (("r", rank), ("lora_alpha", alpha)):
        if saved and name in saved and saved[name] != now:
            raise UsageError(f"--resume_from_checkpoint {checkpoint!r} was saved with LoRA {name}={saved[name]!r}, "
                             f"this run has {now!r}; resume with the same --lora_{name.removeprefix('lora_')}")


def _read_json_object(path: Path) -> dict[str, Any]:
    return _read_json_dict(path) or {}


def _check_trainer_state(checkpoint: str) -> None:
    state = _read_json_dict(Path(checkpoint) / "trainer_state.json")
    step = state.get("global_step") if state is not None else None
    if state is None or isinstance(step, bool) or not isinstance(step, int) or step < 0 \
            or not isinstance(state.get("log_history", []), list):
        raise UsageError(f"--resume_from_checkpoint {checkpoint!r}: trainer_state.json is missing or malformed (it "
                         "needs an integer global_step >= 0 and a log_history list)")


#: CDB settings that the run's length fills in (``ChannelDropBackConfig.for_run``): unknown before the data is
#: loaded, so pre-flight leaves them to the check the faces make once the run is sized.
RUN_SIZED_FIELDS = ("schedule_total_steps", "schedule_steps_per_epoch")


def saved_cdb_settings(record: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's CDB settings, sized for its run (``cdb``; checkpoints of cdb_hf 0.1 kept the sized ones
    under ``cdb_run``, beside the unsized ``cdb``)."""
    return record["cdb_run"] if "cdb_run" in record else record.get("cdb")


def check_resume_matches(record: dict[str, Any] | None, current: dict[str, Any] | None, run_args,
                         checkpoint: str, *, sized: bool = True) -> None:
    """Refuse to resume with CDB settings other than the checkpoint's record, naming the field.

    Pre-flight compares before the run is sized (``sized=False``: :data:`RUN_SIZED_FIELDS` left out), the
    faces compare the same record again once it is. ``--resume_allow_cdb_changes`` turns the refusal into a
    loud warning: the selections then differ from the interrupted run's from the resumed step on.
    """
    if record is None:
        return
    saved = saved_cdb_settings(record)
    if saved is None and current is None:
        return
    if (saved is None) != (current is None):
        differences = [f"cdb: {'false' if saved is None else 'true'} in the checkpoint, "
                       f"{'false' if current is None else 'true'} now"]
    else:
        names = sorted((set(saved) | set(current)) - (set() if sized else set(RUN_SIZED_FIELDS)))
        differences = [f"{name}: {saved.get(name)!r} in the checkpoint, {current.get(name)!r} now"
                       for name in names if saved.get(name) != current.get(name)]
    if not differences:
        return
    message = (f"--resume_from_checkpoint {checkpoint!r} was saved with other ChannelDropBack settings ("
               f"{'; '.join(differences)}), so the resumed run would not continue the same run")
    if getattr(run_args, "resume_allow_cdb_changes", False):
        logger.warning(f"{message}; resuming anyway because of --resume_allow_cdb_changes")
        return
    raise UsageError(f"{message}; resume with the same settings, or pass --resume_allow_cdb_changes true")


def loop_state_error(path: str, state: Any, max_steps: int | None = None) -> str | None:
    """Why an accelerate-loop state (``cdb_hf_checkpoint.json``'s ``loop`` entry) is unusable, or None."""
    if not isinstance(state, dict):
        return "it is not an object"
    steps = state.get("completed_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        return f"completed_steps={steps!r} is not an integer >= 0"
    if max_steps is not None and steps > max_steps:
        return f"completed_steps={steps} is beyond this run's {max_steps} optimizer steps"
    history = state.get("log_history")
    if not isinstance(history, list):
        return "log_history is not a list"
    for entry in history:
        if not isinstance(entry, dict) or not all(isinstance(k, str) for k in entry):
            return "log_history holds an entry that is not an object"
        if not all(isinstance(v, (str, type(None))) or is_finite_number(v) for v in entry.values()):
            return "log_history holds a value that is neither a finite number nor a string"
    return None


def checkpoint_load_error(checkpoint, what: str, error: BaseException) -> UsageError:
    """One line for a checkpoint that cannot be loaded, without torch's advice to unpickle it unsafely."""
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
        reason = "it holds objects that a safe load (torch.load with weights_only=True) refuses to unpickle"
    else:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        reason = f"{type(error).__name__}: {first_line[:200]}"
    return UsageError(f"checkpoint {str(checkpoint)!r} cannot be resumed: {what} cannot be loaded ({reason}); it "
                      "is damaged or was not written by this run's model")
