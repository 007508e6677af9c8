"""Run ``run_finetune.py``'s ``main`` and kill the process, like a power cut, at one point of a save.

    python tests/kill_worker.py MODULE:ATTRIBUTE N ARGS...

replaces ``ATTRIBUTE`` of ``MODULE`` (``Class.method`` works) by a wrapper that ends the process with
``os._exit(137)`` (no cleanup, no ``finally``) on its N-th call, before the call runs. Used by
test_safety.py to show that a run killed at any point while saving resumes to the same weights.
"""

from __future__ import annotations

import importlib
import os
import sys


def arm(target: str, nth: int) -> None:
    def power_cut() -> None:
        os._exit(137)

    arm_with(target, nth, power_cut)


def arm_with(target: str, nth: int, action) -> None:
    """Replace ``target`` by a wrapper that calls ``action()`` before its ``nth`` call."""
    module_name, attribute = target.split(":")
    owner = importlib.import_module(module_name)
    *parents, name = attribute.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, name)
    calls = 0

    def killed_on_nth_call(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == nth:
            action()
        return original(*args, **kwargs)

    setattr(owner, name, killed_on_nth_call)


if __name__ == "__main__":
    arm(sys.argv[1], int(sys.argv[2]))
    from cdb_hf import cli

    sys.exit(cli.main(sys.argv[3:]))
