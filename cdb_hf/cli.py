"""``run_finetune.py``: parse (recipe file + flags), run pre-flight, dispatch to a training face or the A/B runner.

Conventions follow transformers' ``run_image_classification.py``: ``HfArgumentParser`` over the
argument dataclasses plus ``TrainingArguments``. A YAML or JSON recipe may come first; every flag
after it overrides the recipe::

    python run_finetune.py recipes/vit-b16_cifar10.yaml --learning_rate 1e-4 --cdb_channel_rate 0.5

Bad input ends with one line on stderr (``run_finetune.py: error: ...``) and exit code 2, before any
training starts and before ``--output_dir`` changes (:class:`~cdb_hf.errors.UsageError`).
"""

from __future__ import annotations

import os
import sys

from . import launch
from .errors import UsageError
from .parsing import PROG, build_parser, load_recipe, parse_args
from .preemption import PREEMPTION, Preempted, Terminated
from .preflight import plan_run
from .run import TrainingDiverged
from .run_lock import RunLock

__all__ = ["PROG", "build_parser", "load_recipe", "main", "parse_args"]

def main(argv: list[str] | None = None) -> int:
    """Entry point of ``run_finetune.py``; returns the process exit code.

    2: bad input (one line on stderr, nothing changed); 1: the run failed after it started (a diverged run:
    one line; anything else: its traceback), or an A/B run failed; 0: done.
    """
    lock = None
    try:
        plan = plan_run(*parse_args(argv))
        lock = _lock_output_dir(plan)
        PREEMPTION.install()
        if plan.run.ab_seeds > 0:
            from .ab import run_ab

            failed = run_ab(plan)["failed_runs"]
            if failed:  # the report lists them; a script driving the A/B run must see it too
                print(f"{PROG}: {len(failed)} A/B run(s) failed; see the report", file=sys.stderr)
                return 1
        else:
            launch.train(plan)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    except Terminated as error:
        if _is_main_rank():
            print(f"{PROG}: {error}", file=sys.stderr)
        return error.exit_code
    except Preempted as error:
        if _is_main_rank():
            if plan.run.ab_seeds > 0:  # an A/B comparison is not resumable: say what is kept instead
                error = Preempted(error.signum, f"{str(error).split(':')[0]} during the A/B comparison in "
                                                f"{plan.training.output_dir!r}: the finished arms and the interrupted "
                                                "one (marked interrupted) are kept; an A/B comparison does not "
                                                "resume: run it again into a new --output_dir")
            print(f"{PROG}: {error}", file=sys.stderr)
        return error.exit_code
    finally:
        PREEMPTION.uninstall()
        if lock is not None:
            lock.release()
    return 0


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def _lock_output_dir(plan) -> RunLock | None:
    """Take ``--output_dir``'s lock for this run (the launch's main process; the other ranks recognise it)."""
    if not _is_main_rank():
        return None
    lock = RunLock(plan.training.output_dir)
    try:
        lock.acquire()
    except RuntimeError as error:
        raise UsageError(f"--output_dir {plan.training.output_dir!r} is in use by a live run ({error}); wait for it "
                         "to end or choose another --output_dir (nothing was changed)") from None
    return lock
