"""What a run does to ``--output_dir``: fresh, resume or replace, decided before anything is written.

:func:`plan_output_dir` (called by :func:`cdb_hf.preflight.plan_run`) refuses every folder where writing could
lose data: a live run's, one the run reads from, the home directory, a git work tree, files cdb_hf did not
write; it resolves the checkpoint to resume from (:mod:`cdb_hf.resume`) and fills the plan's
``output_mode``, ``resume_checkpoint``, ``resume_record`` and notes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import builtin
from .errors import UsageError
from .resume import _check_resume_checkpoint, resolve_resume_checkpoint
from .run_dir import find_checkpoints, foreign_entries, read_run_marker, set_aside_runs

__all__ = ["plan_output_dir"]


def _input_paths(plan: Any) -> dict[str, Path]:
    """The local paths the run reads, by flag: an output_dir must be none of them, in none, contain none."""
    candidates = {
        "train_dir": plan.data.train_dir, "validation_dir": plan.data.validation_dir,
        "dataset_name": plan.data.dataset_name, "model_name_or_path": plan.model.model_name_or_path,
        "config_name": plan.model.config_name, "image_processor_name": plan.model.image_processor_name,
        "cache_dir": plan.model.cache_dir, "predict_dir": getattr(plan.data, "predict_dir", None),
    }
    paths = {}
    for flag, value in candidates.items():
        if isinstance(value, str) and value and not builtin.is_builtin(value):
            path = Path(os.path.expanduser(value))
            if path.exists():
                paths[flag] = path.resolve()
    return paths


def plan_output_dir(plan: Any) -> None:
    """Decide fresh / resume / replace for ``--output_dir``, refusing anything that could lose data."""
    args, run_args = plan.training, plan.run
    output_dir = Path(os.path.expanduser(args.output_dir))
    resolved = output_dir.resolve()
    _check_not_locked(args.output_dir, plan.notes)
    if output_dir.is_symlink():  # every later rename, deletion and check acts on the folder itself, not the link
        plan.notes.append(f"--output_dir {args.output_dir!r} is a symlink; the run writes into {str(resolved)!r}")
        args.output_dir = str(resolved)
        output_dir = resolved
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {args.output_dir!r} exists and is not a directory")
    home = Path(os.path.expanduser("~")).resolve()
    if resolved == Path(resolved.anchor) or resolved == home:
        what = "your home directory" if resolved == home else "the filesystem root"
        raise UsageError(f"--output_dir {args.output_dir!r} is {what}; give a folder of its own, e.g. outputs/my-run")
    if (resolved / ".git").exists():
        raise UsageError(f"--output_dir {args.output_dir!r} is the root of a git work tree; give a folder of its own, "
                         "e.g. outputs/my-run")
    for flag, path in _input_paths(plan).items():
        if resolved == path or path.is_relative_to(resolved) or resolved.is_relative_to(path):
            relation = ("is" if resolved == path else "contains" if path.is_relative_to(resolved)
                        else "lies inside")
            raise UsageError(f"--output_dir {args.output_dir!r} {relation} --{flag} {str(path)!r}: a run must not "
                             "write into, or replace, what it reads; give another --output_dir")

    overwrite = bool(getattr(run_args, "overwrite_output_dir", False))
    resume = resolve_resume_checkpoint(args, plan.notes, plan.incomplete_checkpoints)
    if resume is not None:
        plan.resume_checkpoint = resume
        plan.resume_record = _check_resume_checkpoint(resume, plan)
        if Path(resume).resolve().is_relative_to(resolved):
            if overwrite:
                raise UsageError(f"--overwrite_output_dir would set aside the run that --resume_from_checkpoint "
                                 f"{resume!r} continues; drop one of the two")
            plan.output_mode = "resume"
            return
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        plan.output_mode = "fresh"
        aside = set_aside_runs(output_dir)
        if aside:
            plan.notes.append(f"an earlier run of {args.output_dir!r} was set aside by an interrupted replacement "
                              f"and is kept in {str(aside[0])!r}")
        return
    marker = read_run_marker(output_dir)
    if overwrite:
        if marker is None:
            raise UsageError(f"--overwrite_output_dir refuses {args.output_dir!r}: it holds files that are not a "
                             f"cdb_hf run (no cdb_hf_run.json), which would be lost; choose another --output_dir")
        foreign = foreign_entries(output_dir)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise UsageError(f"--overwrite_output_dir would delete what cdb_hf did not write in {args.output_dir!r}: "
                             f"{shown}; move it out of the folder first, or choose another --output_dir")
        plan.output_mode = "replace"
        replaced = marker.get("replaces")
        if isinstance(replaced, str) and "/" not in replaced and (output_dir.parent / replaced).is_dir():
            plan.notes.append(f"the {marker.get('status', 'unfinished')} run in {args.output_dir!r} was itself "
                              f"replacing an earlier run, kept in {str(output_dir.parent / replaced)!r}; both are "
                              "deleted when this run completes (and kept if it does not)")
        return
    if plan.kind == "eval":
        raise UsageError(f"output_dir {args.output_dir!r} is not empty; --do_train false writes into a new folder (or "
                         "over an earlier evaluation with --overwrite_output_dir): choose another --output_dir")
    if marker is not None and marker.get("status") in ("running", "failed", "interrupted") and find_checkpoints(output_dir):
        raise UsageError(f"output_dir {args.output_dir!r} holds an unfinished run; pass --resume_from_checkpoint "
                         "true to continue it, --overwrite_output_dir to replace it, or choose another --output_dir")
    if marker is not None and marker.get("status") != "complete":
        raise UsageError(f"output_dir {args.output_dir!r} holds a {marker.get('status', 'unfinished')} run with no "
                         "checkpoint to continue from; pass --overwrite_output_dir to replace it, or choose another "
                         "--output_dir")
    raise UsageError(f"output_dir {args.output_dir!r} already holds a different run; pass --overwrite_output_dir "
                     "to write over it, --resume_from_checkpoint true to continue it, or choose another "
                     "--output_dir")


def _check_not_locked(output_dir: str, notes: list[str]) -> None:
    """Refuse an output folder whose run is alive (another process holds its lock); note a stale lock."""
    from .run_lock import read_lock

    holder = read_lock(output_dir)
    if holder is None or holder.is_ours():
        return
    stale = holder.stale_reason()
    if stale is None:
        raise UsageError(f"--output_dir {output_dir!r} is in use by a live run ({holder.describe()}); wait for it to "
                         "end or choose another --output_dir (nothing was changed)")
    notes.append(f"the lock of --output_dir {output_dir!r} was left by a run that is gone ({holder.describe()}; "
                 f"{stale}); it is taken over")
