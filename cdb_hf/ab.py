"""Does ChannelDropBack help *your* problem? A paired, seeded A/B comparison: baseline vs CDB.

CDB's published gains are a few tenths of a point, the same size as seed-to-seed noise, so a single
run proves nothing. For every seed ``s`` this runner trains two arms that share everything the seed
controls (validation split, training subset, new-head initialisation, data order, augmentation):

* ``baseline``: the same arguments with ``cdb = False``;
* ``cdb``: ``cdb = True`` and ``cdb_seed = s``;
* ``extra`` (with ``--ab_extra_arm 'weight_decay=0.05'``): the baseline with those TrainingArguments
  values changed, a standard regularizer to hold CDB against at the same budget.

CDB never touches the global RNG, so the two arms of a pair differ only by CDB. The report gives
per-seed results, mean ± std of each arm, and the mean paired difference (CDB - baseline) with a
t-distribution confidence interval. A run that fails is recorded with its error and reported; the
statistics use complete pairs only and say how many pairs were lost::

    python run_finetune.py recipes/efficientnet-lite0_mnist5k_ab.yaml   # or: python -m cdb_hf.demo --ab_seeds 10

Outputs in ``output_dir``: ``seed{s}/baseline``, ``seed{s}/cdb`` (and ``seed{s}/extra``), each a complete run,
``results.json``, ``results.csv``, ``report.md`` and ``ab_plot.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import PartialState
from transformers.utils import logging

from . import launch
from .ab_report import ARMS, EXTRA_ARM, METRICS, ArmRun, finite, render_report, write_results
from .errors import UsageError
from .plan import RunPlan
from .run import failed_run, open_run_dir

__all__ = ["ARMS", "EXTRA_ARM", "ArmRun", "arms_of", "METRICS", "arm_plan", "final_train_loss", "load_eval_curve",
           "paired_difference", "run_ab", "summarize"]

logger = logging.get_logger(__name__)

_HIGHER_IS_BETTER = {"eval_accuracy": True, "eval_loss": False, "final_train_loss": False, "train_runtime": False}
_ERROR_TAIL_LINES = 6

TrainFn = Callable[[RunPlan], dict[str, float]]


# ------------------------------------------------------------------------------------------- statistics


def paired_difference(baseline: Sequence[float], treatment: Sequence[float],
                      confidence: float = 0.95) -> dict[str, float]:
    """Mean of ``treatment - baseline`` over pairs, with a Student-t confidence interval and p-value.

    Pairing removes the variance both arms share (split, subset, initialisation, data order), which is
    why a paired interval can be much narrower than the two arms' standard deviations suggest. With
    one pair the interval is undefined (NaN); with identical differences it collapses to the mean.
    """
    from scipy import stats

    if len(baseline) != len(treatment):
        raise ValueError(f"paired samples need equal lengths, got {len(baseline)} and {len(treatment)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} must be strictly between 0 and 1")
    diffs = np.asarray(treatment, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    n = int(diffs.size)
    result = {"n": n, "confidence": confidence, "mean": math.nan, "std": math.nan, "sem": math.nan,
              "t_critical": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan}
    if n == 0:
        return result
    result["mean"] = float(diffs.mean())
    if n < 2:
        return result
    std = float(diffs.std(ddof=1))
    sem = std / math.sqrt(n)
    t_critical = float(stats.t.ppf(0.5 + confidence / 2.0, df=n - 1))
    result.update(std=std, sem=sem, t_critical=t_critical,
                  ci_low=result["mean"] - t_critical * sem, ci_high=result["mean"] + t_critical * sem)
    if sem > 0:
        t_value = result["mean"] / sem
        result["p_value"] = float(2.0 * stats.t.sf(abs(t_value), df=n - 1))
    return result


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"n": int(array.size),
            "mean": float(array.mean()) if array.size else math.nan,
            "std": float(array.std(ddof=1)) if array.size > 1 else math.nan}


def summarize(runs: Sequence[ArmRun], metrics: Sequence[str] = METRICS, confidence: float = 0.95,
              arms: Sequence[str] = ARMS) -> dict[str, Any]:
    """Per-arm mean ± std and the paired difference for each metric, over complete pairs only.

    A pair is complete when every arm finished and reported the metric; every other seed is listed
    under ``incomplete_seeds`` so that a lost run can never silently flatter one arm. ``difference`` is
    CDB - baseline; with the extra arm, ``extra_difference`` is extra - baseline on the same seeds.
    """
    by_seed: dict[int, dict[str, ArmRun]] = {}
    for run in runs:
        by_seed.setdefault(run.seed, {})[run.arm] = run
    seeds = sorted(by_seed)
    failed = [{"seed": r.seed, "arm": r.arm, "error": r.error} for r in runs if r.status != "ok"]
    complete = [s for s in seeds if all(by_seed[s].get(arm) is not None and by_seed[s][arm].status == "ok"
                                        for arm in arms)]
    summary: dict[str, Any] = {
        "seeds": seeds, "complete_seeds": complete,
        "incomplete_seeds": [s for s in seeds if s not in complete],
        "failed_runs": failed, "arms": list(arms), "metrics": {},
    }
    for metric in metrics:
        pairs = [s for s in complete if all(finite(by_seed[s][arm].metrics.get(metric)) for arm in arms)]
        values = {arm: [float(by_seed[s][arm].metrics[metric]) for s in pairs] for arm in arms}
        summary["metrics"][metric] = {
            "seeds": pairs,
            **{arm: _mean_std(values[arm]) for arm in arms},
            "difference": paired_difference(values["baseline"], values["cdb"], confidence),
            "higher_is_better": _HIGHER_IS_BETTER.get(metric, True),
        }
        if EXTRA_ARM in arms:
            summary["metrics"][metric]["extra_difference"] = paired_difference(values["baseline"], values[EXTRA_ARM],
                                                                               confidence)
    return summary



# ------------------------------------------------------------------------------------------- running


def arms_of(plan: RunPlan) -> tuple[str, ...]:
    """The arms a comparison trains: baseline and CDB, and the extra arm when ``--ab_extra_arm`` is set."""
    return (*ARMS, EXTRA_ARM) if plan.extra_arm else ARMS


def arm_plan(plan: RunPlan, arm: str, seed: int) -> RunPlan:
    """The plan of one arm: the shared seed, its own (fresh) output folder, CDB on or off."""
    if arm not in arms_of(plan):
        raise ValueError(f"arm={arm!r} is not valid; choose one of {arms_of(plan)}")
    root = Path(plan.training.output_dir)
    cdb_args = dataclasses.replace(plan.cdb, cdb=arm == "cdb", cdb_seed=seed if arm == "cdb" else plan.cdb.cdb_seed)
    training = copy.deepcopy(plan.training)
    if arm == EXTRA_ARM:
        for name, value in plan.extra_arm.items():
            setattr(training, name, value)
    training.seed = seed
    training.output_dir = str(root / f"seed{seed}" / arm)
    training.run_name = f"{plan.training.run_name or root.name}-seed{seed}-{arm}"
    training.push_to_hub = False  # an A/B study pushes nothing; the user pushes the arm they keep
    return dataclasses.replace(plan, cdb=cdb_args, run=dataclasses.replace(plan.run, ab_seeds=0), training=training,
                               cdb_config=cdb_args.to_config(), output_mode="fresh", resume_checkpoint=None,
                               resume_record=None, notes=[])


def run_ab(plan: RunPlan, *, train_fn: TrainFn | None = None, confidence: float = 0.95,
           print_report: bool = True) -> dict[str, Any]:
    """Train baseline and CDB for ``plan.run.ab_seeds`` paired seeds; write and print the report.

    ``output_dir`` is treated like a run's: a fresh folder, or (``--overwrite_output_dir``) an earlier
    cdb_hf run set aside and deleted only once this comparison has written its report. Only the main
    process writes and prints (after every process has finished its runs).

    Seeds are ``training_args.seed, +1, ...``. The CDB arm takes the ``cdb_*`` values as given, even
    when the recipe is a baseline (``cdb: false``). ``train_fn`` (a plan -> metrics function) defaults to
    the face chosen by ``--trainer``. Returns the summary (as written to ``results.json``) plus ``"runs"``
    (one dict per :class:`ArmRun`) and ``"report"`` (the Markdown text).
    """
    n_seeds = plan.run.ab_seeds
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise UsageError(f"ab_seeds={n_seeds!r} is not valid; an A/B comparison needs an integer >= 1")
    if plan.resume_checkpoint is not None:
        raise UsageError("--resume_from_checkpoint does not apply to an A/B comparison (--ab_seeds); resume one "
                         "arm's run instead, with its own --output_dir")
    root = Path(plan.training.output_dir)
    seeds = [plan.training.seed + offset for offset in range(n_seeds)]
    train_fn = train_fn or launch.train
    if n_seeds == 1:
        logger.warning("ab_seeds=1: one pair gives no confidence interval; use 3 or more seeds.")

    opened = [open_run_dir(plan, kind="ab")]
    with failed_run(opened):
        runs: list[ArmRun] = []
        started = time.time()
        for seed in seeds:
            for arm in arms_of(plan):
                arm_run_plan = arm_plan(plan, arm, seed)
                run = ArmRun(seed=seed, arm=arm, output_dir=arm_run_plan.training.output_dir)
                logger.info(f"A/B: seed {seed}, arm {arm} -> {run.output_dir}")
                tic = time.time()
                try:
                    metrics = train_fn(arm_run_plan)
                    run.metrics = {k: float(v) for k, v in (metrics or {}).items() if finite(v)}
                    run.curve = load_eval_curve(run.output_dir)
                    train_loss = final_train_loss(run.output_dir)
                    if train_loss is not None:  # how far the run fitted its training set (a regularizer's room)
                        run.metrics["final_train_loss"] = train_loss
                except UsageError:  # bad input fails every arm alike: stop, as a single run would
                    raise
                except Exception as error:  # a failed run is a result to report, not a reason to lose the others
                    run.status = "failed"
                    tail = traceback.format_exception(type(error), error, error.__traceback__)
                    run.error = f"{type(error).__name__}: {error}"
                    logger.error(f"A/B: seed {seed}, arm {arm} failed: {run.error}\n"
                                 + "".join(tail[-_ERROR_TAIL_LINES:]))
                run.wall_time_s = time.time() - tic
                runs.append(run)

        summary = summarize(runs, confidence=confidence, arms=arms_of(plan))
        summary["setup"] = _setup(plan, seeds, time.time() - started)
        # Under torchrun/accelerate launch every process runs the arms; one of them reports, after all finished.
        state = PartialState()
        state.wait_for_everyone()
        if state.is_main_process:
            report = write_results(root, runs, summary)
            opened[0].complete()  # the comparison is complete (failed arms included: its report says so)
            if print_report:
                print(report)
        else:
            report = render_report(runs, summary)
    return {**summary, "runs": [dataclasses.asdict(run) for run in runs], "report": report}


def load_eval_curve(output_dir: str | os.PathLike) -> list[dict[str, float]]:
    """Validation points ``[{"step", "eval_accuracy", "eval_loss"}]`` from a run's ``trainer_state.json``.

    Reads the Trainer's ``eval_accuracy`` keys and the accelerate loop's ``eval/accuracy`` keys alike;
    an absent or unreadable file gives an empty curve (the final metrics still count).
    """
    curve = []
    for entry in _log_history(output_dir):
        point = {}
        for name in ("accuracy", "loss"):
            for key in (f"eval_{name}", f"eval/{name}"):
                if finite(entry.get(key)):
                    point[f"eval_{name}"] = float(entry[key])
        if point and finite(entry.get("step")):
            curve.append({"step": float(entry["step"]), **point})
    # The Trainer path evaluates once more after training, at the same step: keep one point per step.
    unique = {point["step"]: point for point in curve}
    return [unique[step] for step in sorted(unique)]


def final_train_loss(output_dir: str | os.PathLike) -> float | None:
    """The last logged training loss (a window of ``logging_steps``) in a run's ``trainer_state.json``."""
    losses = [float(entry["loss"]) for entry in _log_history(output_dir) if finite(entry.get("loss"))]
    return losses[-1] if losses else None


def _log_history(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of a run's ``trainer_state.json`` log history; none when the file is absent or unreadable."""
    try:
        history = json.loads((Path(output_dir) / "trainer_state.json").read_text()).get("log_history", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [entry for entry in history if isinstance(entry, dict)] if isinstance(history, list) else []


def _setup(plan: RunPlan, seeds, wall_time_s) -> dict[str, Any]:
    import torch

    model_args, data_args, training_args = plan.model, plan.data, plan.training
    cdb_config = dataclasses.replace(plan.cdb, cdb=True).to_config().to_dict()
    return {
        "model_name_or_path": model_args.model_name_or_path,
        "dataset_name": data_args.dataset_name or data_args.train_dir,
        "max_train_samples": data_args.max_train_samples,
        "max_eval_samples": data_args.max_eval_samples,
        "eval_split_name": data_args.eval_split_name,
        "image_size": model_args.image_size,
        "train_augmentation": data_args.train_augmentation,
        "trainer": plan.run.trainer,
        "seeds": seeds,
        "extra_arm": ",".join(f"{k}={v}" for k, v in plan.extra_arm.items()) or None,
        "cdb_config": cdb_config,
        "training": {key: _plain(getattr(training_args, key)) for key in (
            "optim", "optim_args", "learning_rate", "weight_decay", "lr_scheduler_type", "num_train_epochs",
            "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "eval_strategy")},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "wall_time_s": round(wall_time_s, 1),
    }


def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(getattr(value, "value", value))
