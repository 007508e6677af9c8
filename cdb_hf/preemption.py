"""Preemption as a first-class event: SIGTERM and SIGUSR1 stop a run at the end of its current step.

Schedulers (SLURM, Kubernetes) send SIGTERM some seconds before they kill a job, and SLURM can send
SIGUSR1 ahead of the time limit (``--signal=USR1@120``). :class:`Preemption` notes the signal; each
training face asks :meth:`Preemption.due` after every optimizer step and, once it says so, finishes
that step, writes a complete checkpoint, marks the run ``interrupted`` and raises :class:`Preempted`;
the CLI prints one line saying how to continue and exits with ``128 + signal``.

Several processes must stop at the same step: each rank's flag is all-reduced (maximum) without
waiting, and the result is read one step later, when the reduction has long finished, so all ranks
stop together one step after the signal reached any of them, with no blocking collective per step.
The flag is a CPU tensor reduced over gloo (the default group when it is gloo, else a gloo group made
once, by every rank at the same first step): reading it never waits for the accelerator's queue, as
reading a flag reduced over NCCL would.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any

import torch

__all__ = ["PREEMPTION", "Preempted", "Preemption", "Terminated"]

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(BaseException):
    """The run stopped at a preemption signal after writing a complete checkpoint (not an error of the run).

    A ``BaseException`` like ``KeyboardInterrupt``: code that reports failed runs and goes on (the A/B
    runner) must not swallow it.
    """

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Terminated(BaseException):
    """A preemption signal outside the training loop (setup, final evaluation): there is no step to finish, so
    the run stops at once, like Ctrl-C (a replaced run is put back)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} outside training, before a checkpoint could "
                         "be written; nothing to continue from: run the command again")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Preemption:
    """The process's preemption state: the signal received (if any), and the ranks' agreement on it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        #: True while a face runs its training steps (a signal is then noted and honoured after the step).
        self.training = False
        self._previous: dict[int, Any] = {}
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._flag_group: Any = None  # the gloo group the flags are reduced over (None: the default group)
        self._flag_group_ready = False

    def install(self) -> None:
        """Catch SIGTERM and SIGUSR1 (main thread only; elsewhere a no-op) until :meth:`uninstall`."""
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        self.signum, self._pending = None, None
        self._flag_group, self._flag_group_ready = None, False  # a new run may have a new process group
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._note)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _note(self, signum: int, frame: Any) -> None:
        if not self.training:
            raise Terminated(signum)
        if self.signum is None:
            self.signum = signum

    @contextlib.contextmanager
    def training_steps(self):
        """The span in which a signal waits for the end of the current step (the faces' training loops)."""
        self.training = True
        try:
            yield
        finally:
            self.training = False

    def due(self, num_processes: int = 1) -> bool:
        """Whether the run stops after this optimizer step (every rank answers alike at every step)."""
        if num_processes <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return self.signum is not None
        if not self._flag_group_ready:  # collective: every rank reaches its first due() at the same step
            if torch.distributed.get_backend() != "gloo":
                self._flag_group = torch.distributed.new_group(backend="gloo")
            self._flag_group_ready = True
        agreed = 0
        if self._pending is not None:  # the reduction started one step ago: finished by now
            work, flags = self._pending
            work.wait()
            agreed = int(flags.item())  # a CPU tensor: no wait on the accelerator
        flags = torch.tensor([self.signum or 0], dtype=torch.int64)
        self._pending = (torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, async_op=True,
                                                      group=self._flag_group), flags)
        if agreed:
            self.signum = agreed
        return bool(agreed)


#: The one preemption state of this process (signals are per process).
PREEMPTION = Preemption()
