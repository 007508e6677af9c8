"""The output directory's lifecycle: what marks a run of this tool, safe replacement, complete checkpoints.

cdb_hf only ever deletes what it created itself, and a failed run never costs the previous one:

* Every run directory holds :data:`RUN_MARKER` (``cdb_hf_run.json``), written before anything else goes
  in. Only a directory with that marker may be replaced by ``--overwrite_output_dir``.
* Replacing is a transaction (:class:`RunDirectory`): the previous run is renamed to a hidden sibling
  (``.<name>.previous-<id>``) before the new run writes anything, deleted only once the new run has
  completed, and renamed back if the new run fails (the failed attempt is kept beside it as
  ``.<name>.failed-<id>``, with its checkpoints). A kill leaves the previous run in its sibling, named in
  the new run's marker, so nothing is lost either way.
* Every checkpoint gets :data:`CHECKPOINT_RECORD` (``cdb_hf_checkpoint.json``) written last, atomically,
  listing the files it completes and the run's CDB configuration: a checkpoint without a valid record
  was cut short, and resuming checks the configuration against the new run's.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from .version import __version__

__all__ = ["CHECKPOINT_RECORD", "RUN_MARKER", "TOOL_OUTPUTS", "RunDirectory", "foreign_entries", "set_aside_runs", "checkpoint_step", "find_checkpoints",
           "read_checkpoint_record", "read_run_marker", "write_checkpoint_record", "write_json_atomic", "write_results_json",
           "write_run_marker"]

RUN_MARKER = "cdb_hf_run.json"
CHECKPOINT_RECORD = "cdb_hf_checkpoint.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


# ------------------------------------------------------------------------------------------ plain files
def write_json_atomic(path: str | os.PathLike, values: Any) -> None:
    """Write strict JSON (NaN/inf refused) through a temporary file and a rename: never half a file."""
    path = Path(path)
    text = json.dumps(values, indent=2, sort_keys=True, allow_nan=False) + "\n"
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_results_json(path: str | os.PathLike, values: Any) -> None:
    """:func:`write_json_atomic` for results: a non-finite number (a diverged loss) becomes ``null``, so the
    file stays strict JSON instead of being refused."""
    write_json_atomic(path, _finite_or_null(values))


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def _read_json_dict(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing, unreadable or not an object."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) else None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# ------------------------------------------------------------------------------------------ run marker
def write_run_marker(output_dir: str | os.PathLike, *, status: str, kind: str = "run",
                     replaces: str | None = None, notes: list[str] | None = None) -> None:
    """Mark ``output_dir`` as a run of this tool (``status``: running, complete, failed, interrupted)."""
    marker = Path(output_dir) / RUN_MARKER
    previous = _read_json_dict(marker) or {}
    write_json_atomic(marker, {
        "tool": "cdb_hf", "version": __version__, "kind": kind, "status": status,
        "started": previous.get("started", time.strftime("%Y-%m-%dT%H:%M:%S")),
        "replaces": replaces if replaces is not None else previous.get("replaces"),
        "notes": notes if notes is not None else previous.get("notes", []),
    })


def read_run_marker(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of a cdb_hf run directory, or None when ``output_dir`` is not one."""
    marker = _read_json_dict(Path(output_dir) / RUN_MARKER)
    return marker if marker is not None and marker.get("tool") == "cdb_hf" else None


class RunDirectory:
    """Open, complete or fail the run in ``output_dir``, whose previous content never gets lost.

    ``mode`` is what pre-flight decided: ``"fresh"`` (missing or empty), ``"resume"`` (continue the run
    there) or ``"replace"`` (``--overwrite_output_dir`` over an earlier cdb_hf run, a transaction: see the
    module docstring). Only the main process calls these methods; the others wait at a barrier.
    """

    def __init__(self, output_dir: str | os.PathLike, mode: str, kind: str = "run") -> None:
        if mode not in ("fresh", "resume", "replace"):
            raise ValueError(f"mode={mode!r} is not valid; choose 'fresh', 'resume' or 'replace'")
        self.output_dir, self.mode, self.kind = Path(output_dir), mode, kind
        self.backup: Path | None = None
        self.restored = False  # fail() put the previous run back: output_dir is no longer this run's

    def open(self, notes: list[str] | None = None) -> None:
        """Make the directory this run's; in replace mode, set the previous run aside first. ``notes`` (what
        pre-flight told the user) are recorded in the marker."""
        if self.mode == "replace" and self.output_dir.exists():
            self.backup = self._sibling("previous")
            os.rename(self.output_dir, self.backup)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_run_marker(self.output_dir, status="running", kind=self.kind,
                         replaces=self.backup.name if self.backup is not None else None, notes=list(notes or []))

    def complete(self) -> None:
        """The run completed: mark it so, then delete the run(s) it replaced (a chain, if a replacement
        was itself interrupted and resumed)."""
        write_run_marker(self.output_dir, status="complete", kind=self.kind)
        replaced = (read_run_marker(self.output_dir) or {}).get("replaces")
        while _is_backup_name(replaced, self.output_dir):
            backup = self.output_dir.parent / replaced
            marker = read_run_marker(backup)
            if marker is None:
                break  # not a run of ours (any more): leave it alone
            shutil.rmtree(backup)
            replaced = marker.get("replaces")
        marker = read_run_marker(self.output_dir) or {}
        files = sorted(p.name for p in self.output_dir.iterdir() if p.name != RUN_MARKER)
        write_json_atomic(self.output_dir / RUN_MARKER, {**marker, "replaces": None, "files": files})
        self.backup = None

    def interrupt(self) -> Path | None:
        """The run stopped at a preemption signal after a complete checkpoint: mark it ``interrupted`` and keep
        everything where it is, so that ``--resume_from_checkpoint true`` continues it. Returns the earlier run
        it is replacing (kept aside until the continued run completes), if any."""
        write_run_marker(self.output_dir, status="interrupted", kind=self.kind)
        replaced = (read_run_marker(self.output_dir) or {}).get("replaces")
        self.backup = None
        if _is_backup_name(replaced, self.output_dir) and (self.output_dir.parent / replaced).is_dir():
            return self.output_dir.parent / replaced
        return None

    def fail(self) -> Path | None:
        """The run failed: mark it so; in replace mode restore the previous run, keeping the failed attempt
        beside it when it holds checkpoints (returned), deleting it when it holds nothing of value. Once the
        previous run is back, a second call leaves it alone."""
        if self.restored:
            return None
        if self.output_dir.is_dir():
            write_run_marker(self.output_dir, status="failed", kind=self.kind)
        if self.backup is None:
            return None
        kept = None
        if self.output_dir.exists():
            if any(self.output_dir.glob("checkpoint-*")):
                kept = self._sibling("failed")
                os.rename(self.output_dir, kept)
            else:
                shutil.rmtree(self.output_dir)
        os.rename(self.backup, self.output_dir)
        self.backup, self.restored = None, True
        return kept

    def _sibling(self, what: str) -> Path:
        return self.output_dir.parent / (f".{self.output_dir.name}.{what}-{time.strftime('%Y%m%d-%H%M%S')}-"
                                         f"{uuid.uuid4().hex[:6]}")


#: What a run of this tool writes at the top of its folder (for a marker without its own ``files`` list: an
#: older or unfinished run).
TOOL_OUTPUTS = ("README.md", "all_results.json", "train_results.json", "eval_results.json", "cdb_config.json",
                "config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
                "preprocessor_config.json", "trainer_state.json", "training_args.bin", "eval_per_class.csv",
                "eval_confusion_matrix.csv", "eval_confusion_matrix.png", "predictions.csv", "merged",
                "adapter_config.json", "adapter_model.safetensors", "ab_plot.png", "report.md", "results.csv",
                "results.json", "seed[0-9]*", "checkpoint-[0-9]*", "runs", RUN_MARKER, ".*.tmp-*")


def foreign_entries(output_dir: str | os.PathLike) -> list[str]:
    """The top-level entries of a run folder that this tool did not write (a user's notes, an analysis folder),
    judged by the list its marker records at completion, else by :data:`TOOL_OUTPUTS`."""
    import fnmatch

    output_dir = Path(output_dir)
    recorded = (read_run_marker(output_dir) or {}).get("files")
    if isinstance(recorded, list) and all(isinstance(name, str) for name in recorded):
        return sorted(p.name + ("/" if p.is_dir() else "") for p in output_dir.iterdir()
                      if p.name not in recorded and p.name != RUN_MARKER)
    return sorted(p.name + ("/" if p.is_dir() else "") for p in output_dir.iterdir()
                  if not any(fnmatch.fnmatchcase(p.name, pattern) for pattern in TOOL_OUTPUTS))


def set_aside_runs(output_dir: str | os.PathLike) -> list[Path]:
    """Earlier runs of ``output_dir`` that an interrupted replacement left set aside, newest first."""
    output_dir = Path(output_dir)
    if not output_dir.parent.is_dir():
        return []
    found = [p for p in output_dir.parent.iterdir()
             if _is_backup_name(p.name, output_dir) and read_run_marker(p) is not None]
    return sorted(found, key=lambda p: p.name, reverse=True)


def _is_backup_name(name: Any, output_dir: Path) -> bool:
    return isinstance(name, str) and name.startswith(f".{output_dir.name}.previous-") and "/" not in name


# ------------------------------------------------------------------------------------------ checkpoints
def checkpoint_step(path: str | os.PathLike) -> int | None:
    """N of a folder named ``checkpoint-N``, else None."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def write_checkpoint_record(checkpoint_dir: str | os.PathLike, *, trainer: str, step: int,
                            cdb: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> None:
    """Write the checkpoint's record last: the files it completes (with sizes) and the run's CDB settings, sized
    for the run (``ChannelDropBackConfig.for_run``): the one record a resume is compared with."""
    checkpoint_dir = Path(checkpoint_dir)
    files = {str(p.relative_to(checkpoint_dir)): p.stat().st_size for p in sorted(checkpoint_dir.rglob("*"))
             if p.is_file() and p.name != CHECKPOINT_RECORD and not p.name.startswith(".")}
    write_json_atomic(checkpoint_dir / CHECKPOINT_RECORD, {
        "trainer": trainer, "step": int(step), "cdb": cdb, "files": files,
        **(extra or {}),
    })


def read_checkpoint_record(checkpoint_dir: str | os.PathLike) -> tuple[dict[str, Any] | None, str | None]:
    """``(record, None)`` for a complete checkpoint, ``(None, why)`` for one that is not."""
    checkpoint_dir = Path(checkpoint_dir)
    record = _read_json_dict(checkpoint_dir / CHECKPOINT_RECORD)
    if record is None:
        why = "unreadable" if (checkpoint_dir / CHECKPOINT_RECORD).exists() else "missing"
        return None, f"its {CHECKPOINT_RECORD} is {why} (the save was cut short)"
    step = record.get("step")
    if not _is_count(step) or record.get("trainer") not in ("hf", "accelerate"):
        return None, f"its {CHECKPOINT_RECORD} has no valid 'step'/'trainer'"
    name_step = checkpoint_step(checkpoint_dir)
    if name_step is not None and name_step != step:
        return None, f"its {CHECKPOINT_RECORD} says step {step}, its name step {name_step}"
    for key in ("cdb", "cdb_run"):
        if record.get(key) is not None and not isinstance(record[key], dict):
            return None, f"its {CHECKPOINT_RECORD} has a malformed {key!r}"
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return None, f"its {CHECKPOINT_RECORD} lists no files"
    for name, size in files.items():
        path = checkpoint_dir / name
        if not path.is_file():
            return None, f"{name} is missing"
        if not _is_count(size) or path.stat().st_size != size:
            return None, f"{name} has {path.stat().st_size} bytes where {size} were written"
    return record, None


def find_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` folders of ``output_dir``, newest (highest N) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p), reverse=True)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_finite_number(value: Any) -> bool:
    """A real int or float (not a bool) that is finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
