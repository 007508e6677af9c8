"""The A/B runner's own flag, parsed at pre-flight: ``--ab_extra_arm`` (a third arm's TrainingArguments values).

Below pre-flight (which calls :func:`parse_extra_arm` so a bad value fails before the first arm trains) and
so below :mod:`cdb_hf.ab`, which runs the arms.
"""

from __future__ import annotations

import copy
from typing import Any

from .checks import check_finite_everywhere, check_loop_arguments, check_training_arguments
from .errors import _TRUE_STRINGS, UsageError

__all__ = ["parse_extra_arm"]


#: TrainingArguments an extra arm may not change: they define the pairing or where results go.
_EXTRA_ARM_FIXED = ("seed", "data_seed", "output_dir", "run_name", "logging_dir", "push_to_hub", "hub_model_id",
                    "hub_token", "resume_from_checkpoint", "do_train", "do_eval", "report_to")


def parse_extra_arm(run_args, training_args: Any) -> dict[str, Any]:
    """``--ab_extra_arm 'name=value,...'`` as typed TrainingArguments values, checked like the run's own.

    Only scalar (bool/int/float/str) TrainingArguments values that do not define the pairing may change;
    the arm's arguments go through the same checks as the run's, so a bad value fails now, not mid-study.
    """
    spec = run_args.ab_extra_arm
    if spec is None or spec == "":
        return {}
    if not run_args.ab_seeds:
        raise UsageError(f"--ab_extra_arm {spec!r} needs --ab_seeds N (it adds an arm to an A/B comparison)")
    overrides: dict[str, Any] = {}
    for item in str(spec).split(","):
        name, equals, raw = (part.strip() for part in item.partition("="))
        if not equals or not name:
            raise UsageError(f"--ab_extra_arm {spec!r} is not valid: expected name=value pairs separated by commas, "
                             "e.g. 'weight_decay=0.05'")
        current = getattr(training_args, name, None) if hasattr(training_args, name) else None
        if not hasattr(training_args, name) or name in _EXTRA_ARM_FIXED or name.startswith("cdb"):
            raise UsageError(f"--ab_extra_arm: {name!r} is not a TrainingArguments value an extra arm may change "
                             f"(not allowed: unknown names, cdb_* flags, {', '.join(_EXTRA_ARM_FIXED)})")
        kind = type(getattr(current, "value", current))
        try:
            if kind is bool:
                if raw.lower() not in (*_TRUE_STRINGS, "false", "no", "0"):
                    raise ValueError(raw)
                value: Any = raw.lower() in _TRUE_STRINGS
            elif kind in (int, float, str):
                value = kind(raw)
            else:
                raise TypeError(name)
        except (TypeError, ValueError):
            raise UsageError(f"--ab_extra_arm: {name}={raw!r} is not valid; {name} takes a "
                             f"{kind.__name__ if kind in (bool, int, float, str) else 'non-scalar'} value "
                             f"(now {current!r})") from None
        overrides[name] = value
    arm_args = copy.deepcopy(training_args)
    for name, value in overrides.items():
        setattr(arm_args, name, value)
    try:
        check_finite_everywhere(arm_args)
        check_training_arguments(arm_args)
        if run_args.trainer == "accelerate":
            check_loop_arguments(arm_args)
    except UsageError as error:  # the run's own value is fine: say that the arm's is not
        raise UsageError(f"--ab_extra_arm {spec!r}: {error}") from None
    return overrides
