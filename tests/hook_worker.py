"""Run ``run_finetune.py``'s ``main`` with a hook at one point of the run, as a user's process would meet it.

    python tests/hook_worker.py MODULE:ATTRIBUTE N ACTION ARGS...

Before the N-th call of ``ATTRIBUTE`` of ``MODULE`` (``Class.method`` works), ACTION happens:

* ``SIGTERM`` / ``SIGUSR1``: the process sends itself that signal (a scheduler's preemption), then the
  call runs;
* ``wait:PATH``: the process writes ``PATH.ready`` and waits (up to 120 s) until ``PATH`` exists: a run
  held alive at a known point while a test starts another one.

Under ``accelerate launch``, ``HOOK_RANK=1`` arms the hook on that rank only (a signal one rank gets first).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from kill_worker import arm_with


def act(action: str) -> None:
    if action.startswith("wait:"):
        path = Path(action.removeprefix("wait:"))
        Path(f"{path}.ready").write_text(str(os.getpid()))
        deadline = time.time() + 120
        while not path.exists() and time.time() < deadline:
            time.sleep(0.05)
    else:
        os.kill(os.getpid(), getattr(signal, action))


if __name__ == "__main__":
    action = sys.argv[3]
    if os.environ.get("HOOK_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0"):
        arm_with(sys.argv[1], int(sys.argv[2]), lambda: act(action))
    from cdb_hf import cli

    sys.exit(cli.main(sys.argv[4:]))
