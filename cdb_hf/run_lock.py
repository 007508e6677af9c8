"""One live run per output folder: a lock beside it, with its owner's host, pid and start time.

The lock is ``.<name>.cdb_hf.lock`` in the output folder's parent (beside the folder, so that a replacement
that renames the folder aside keeps it). It is created atomically (a complete file hard-linked into place,
which fails if one exists), refreshed by a heartbeat thread (its modification time), and removed when the
run ends. A lock is *live* while its owner could still be writing; it is *stale*, and is taken over with a
warning, when its process is gone (same host) or its heartbeat stopped for longer than
:data:`STALE_AFTER_ENV` seconds (default 300: another host on a shared filesystem, or a reused pid).

Under ``accelerate launch`` / ``torchrun`` the main process (``RANK`` 0) takes the lock for the whole
launch; every rank recognises it as its own by the launch's id, so all ranks agree.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["HEARTBEAT_ENV", "LockHolder", "RunLock", "STALE_AFTER_ENV", "launch_id", "lock_path", "read_lock"]

#: Seconds without a heartbeat after which a lock is stale (default 300).
STALE_AFTER_ENV = "CDB_HF_LOCK_STALE_SECONDS"
#: Seconds between heartbeats (default: a tenth of the stale limit, at most 30).
HEARTBEAT_ENV = "CDB_HF_LOCK_HEARTBEAT_SECONDS"


def lock_path(output_dir: str | os.PathLike) -> Path:
    """The lock file of ``output_dir`` (resolved through symlinks: two names of one folder share one lock)."""
    resolved = Path(os.path.expanduser(output_dir)).resolve()
    return resolved.parent / f".{resolved.name}.cdb_hf.lock"


def launch_id() -> str | None:
    """An id every process of one ``torchrun``/``accelerate launch`` shares (None for a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    return ":".join(os.environ.get(name, "") for name in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"))


def _stale_after() -> float:
    return float(os.environ.get(STALE_AFTER_ENV, "300"))


@dataclass
class LockHolder:
    """Who holds a lock, and whether it is still alive."""

    host: str
    pid: int
    started: str
    launch: str | None
    token: str
    heartbeat_age: float

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"

    def stale_reason(self) -> str | None:
        """Why this lock no longer protects a run (None: it is live)."""
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return "its process is gone"
        if self.heartbeat_age > _stale_after():
            return f"its heartbeat stopped {self.heartbeat_age:.0f} s ago"
        return None

    def is_ours(self) -> bool:
        """Held by this process, or by this launch's main process."""
        ours = launch_id()
        return (self.host == socket.gethostname() and self.pid == os.getpid()) or (
            ours is not None and self.launch == ours)


def read_lock(output_dir: str | os.PathLike) -> LockHolder | None:
    """The holder of ``output_dir``'s lock, or None when there is none (an unreadable lock reads as stale)."""
    return _read_lock_file(lock_path(output_dir))


def _read_lock_file(path: Path) -> LockHolder | None:
    try:
        values: Any = json.loads(path.read_text(encoding="utf-8"))
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        values, age = {}, float("inf")
    if not isinstance(values, dict):
        values, age = {}, float("inf")
    pid = values.get("pid")
    return LockHolder(host=str(values.get("host", "?")), pid=pid if isinstance(pid, int) else -1,
                      started=str(values.get("started", "?")), launch=values.get("launch"),
                      token=str(values.get("token", "")), heartbeat_age=age)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """The lock of one run's output folder: :meth:`acquire` (or raise naming the live run), :meth:`release`."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = lock_path(output_dir)
        self.token = uuid.uuid4().hex
        self.taken_over: LockHolder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock; a stale one is taken over (:attr:`taken_over`); a live one raises ``RuntimeError``
        naming its holder. Starts the heartbeat."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f"{self.path.name}.tmp-{self.token[:8]}")
        temporary.write_text(json.dumps({
            "tool": "cdb_hf", "host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "launch": launch_id(), "token": self.token,
        }) + "\n", encoding="utf-8")
        try:
            try:
                os.link(temporary, self.path)
            except FileExistsError:
                holder = _read_lock_file(self.path)
                if holder is not None and holder.stale_reason() is None:
                    raise RuntimeError(holder.describe()) from None
                os.replace(temporary, self.path)  # take the stale lock over
                self.taken_over = holder
            mine = _read_lock_file(self.path)
            if mine is None or mine.token != self.token:  # another run took the stale lock at the same moment
                raise RuntimeError(mine.describe() if mine else "a run that just ended")
        finally:
            temporary.unlink(missing_ok=True)
        period = float(os.environ.get(HEARTBEAT_ENV, min(30.0, _stale_after() / 10)))
        self._thread = threading.Thread(target=self._beat, args=(period,), name="cdb_hf-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = _read_lock_file(self.path)
        if holder is not None and holder.token == self.token:
            self.path.unlink(missing_ok=True)
