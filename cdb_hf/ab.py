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
import csv
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
from .errors import UsageError
from .plan import RunPlan
from .run import failed_run, open_run_dir

__all__ = ["ARMS", "EXTRA_ARM", "ArmRun", "arms_of", "METRICS", "arm_plan", "final_train_loss", "format_number", "load_eval_curve", "paired_difference", "plot_ab",
           "render_report", "run_ab", "summarize", "write_results"]

logger = logging.get_logger(__name__)

ARMS = ("baseline", "cdb")
#: The optional third arm: the baseline with ``--ab_extra_arm``'s values.
EXTRA_ARM = "extra"
#: The metrics compared, in report order; ``eval_accuracy`` is the primary one.
METRICS = ("eval_accuracy", "eval_loss", "final_train_loss", "train_runtime")
_HIGHER_IS_BETTER = {"eval_accuracy": True, "eval_loss": False, "final_train_loss": False, "train_runtime": False}
_ERROR_TAIL_LINES = 6

TrainFn = Callable[[RunPlan], dict[str, float]]


@dataclasses.dataclass
class ArmRun:
    """One training run of one arm for one seed: its final metrics, validation curve, or its error."""

    seed: int
    arm: str
    output_dir: str
    status: str = "ok"  # "ok" | "failed"
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    curve: list[dict[str, float]] = dataclasses.field(default_factory=list)
    error: str | None = None
    wall_time_s: float = 0.0


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
        pairs = [s for s in complete if all(_finite(by_seed[s][arm].metrics.get(metric)) for arm in arms)]
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


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
                    run.metrics = {k: float(v) for k, v in (metrics or {}).items() if _finite(v)}
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
                if _finite(entry.get(key)):
                    point[f"eval_{name}"] = float(entry[key])
        if point and _finite(entry.get("step")):
            curve.append({"step": float(entry["step"]), **point})
    # The Trainer path evaluates once more after training, at the same step: keep one point per step.
    unique = {point["step"]: point for point in curve}
    return [unique[step] for step in sorted(unique)]


def final_train_loss(output_dir: str | os.PathLike) -> float | None:
    """The last logged training loss (a window of ``logging_steps``) in a run's ``trainer_state.json``."""
    losses = [float(entry["loss"]) for entry in _log_history(output_dir) if _finite(entry.get("loss"))]
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


# ------------------------------------------------------------------------------------------- reporting


def write_results(root: str | os.PathLike, runs: Sequence[ArmRun], summary: dict[str, Any]) -> str:
    """Write ``results.json``, ``results.csv``, ``report.md`` and ``ab_plot.png`` into ``root``; return the report."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    payload = {"summary": summary, "runs": [dataclasses.asdict(run) for run in runs]}
    (root / "results.json").write_text(json.dumps(_json_safe(payload), indent=2) + "\n")
    with open(root / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seed", "arm", "status", *METRICS, "wall_time_s", "output_dir", "error"])
        for run in runs:
            writer.writerow([run.seed, run.arm, run.status, *(_csv(run.metrics.get(m)) for m in METRICS),
                             f"{run.wall_time_s:.1f}", run.output_dir, run.error or ""])
    report = render_report(runs, summary)
    (root / "report.md").write_text(report + "\n")
    try:
        plot_ab(runs, summary, root / "ab_plot.png")
    except ImportError as error:  # matplotlib is an optional (demo) dependency
        logger.warning(f"No plot: {error}. pip install matplotlib (or cdb_hf[demo]).")
    return report


def _csv(value: Any) -> str:
    return "" if value is None else f"{value:.6g}"


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def format_number(value: float | None, digits: int, scale: float = 1.0, signed: bool = False) -> str:
    """``scale * value`` with ``digits`` decimals (a sign when ``signed``), or ``n/a`` when not finite."""
    if not _finite(value):
        return "n/a"
    return f"{scale * value:{'+' if signed else ''}.{digits}f}"


def _fmt(value: float, metric: str, signed: bool = False) -> str:
    scale, digits = (100.0, 2) if metric == "eval_accuracy" else (1.0, 1) if metric == "train_runtime" else (1.0, 4)
    return format_number(value, digits, scale, signed)


_LABELS = {"eval_accuracy": "accuracy (%)", "eval_loss": "eval loss", "final_train_loss": "final train loss",
           "train_runtime": "train time (s)"}
_ARM_NAMES = {"baseline": "baseline", "cdb": "CDB", EXTRA_ARM: "extra"}
#: Each arm compared with the baseline, and the summary key of its paired difference.
_DIFFERENCES = (("cdb", "difference"), (EXTRA_ARM, "extra_difference"))


def _arm_names(summary: dict[str, Any]) -> dict[str, str]:
    """Display names; the extra arm is named by what it changes (e.g. ``weight_decay=0.05``)."""
    extra = summary.get("setup", {}).get("extra_arm")
    return {**_ARM_NAMES, **({EXTRA_ARM: extra} if extra else {})}


def render_report(runs: Sequence[ArmRun], summary: dict[str, Any]) -> str:
    """A Markdown report: per-seed table, mean ± std per arm, paired differences with their CI."""
    arms = tuple(summary.get("arms", ARMS))
    names = _arm_names(summary)
    by_key = {(r.seed, r.arm): r for r in runs}
    title = "baseline vs ChannelDropBack" + (f" vs {names[EXTRA_ARM]}" if EXTRA_ARM in arms else "")
    compared = [arm for arm in arms if arm != "baseline"]
    lines = [f"## A/B: {title} (paired seeds)", "",
             "| seed | " + " | ".join(f"{_LABELS[m]} {names[arm]}" for m in METRICS for arm in arms)
             + " | " + " | ".join(f"Δ accuracy {names[arm]} (pt)" for arm in compared) + " |",
             "|---:|" + "---:|" * (len(arms) * len(METRICS) + len(compared))]
    for seed in summary["seeds"]:
        cells = []
        for metric in METRICS:
            for arm in arms:
                run = by_key.get((seed, arm))
                cells.append("FAILED" if run is None or run.status != "ok" else _fmt(run.metrics.get(metric), metric))
        base = by_key.get((seed, "baseline"))
        for arm in compared:
            other = by_key.get((seed, arm))
            delta = (other.metrics.get("eval_accuracy", math.nan) - base.metrics.get("eval_accuracy", math.nan)
                     if base and other and base.status == other.status == "ok" else math.nan)
            cells.append(_fmt(delta, "eval_accuracy", signed=True))
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")

    confidence = None
    lines += ["", "| metric | " + " | ".join(f"{names[arm]} mean ± std" for arm in arms) + " | comparison | "
              "difference (mean) | CI | p | pairs |", "|---|" + "---:|" * len(arms) + "---|---:|---:|---:|---:|"]
    for metric, stats in summary["metrics"].items():
        arm_cells = [f"{_fmt(stats[arm]['mean'], metric)} ± {_fmt(stats[arm]['std'], metric)}" for arm in arms]
        for arm, key in _DIFFERENCES:
            if key not in stats:
                continue
            diff = stats[key]
            confidence = diff["confidence"]
            interval = (f"[{_fmt(diff['ci_low'], metric, True)}, {_fmt(diff['ci_high'], metric, True)}]"
                        if _finite(diff["ci_low"]) else "n/a")
            p_value = f"{diff['p_value']:.3f}" if _finite(diff["p_value"]) else "n/a"
            lines.append(f"| {_LABELS.get(metric, metric)} | " + " | ".join(arm_cells) + f" | {names[arm]} - baseline"
                         f" | {_fmt(diff['mean'], metric, True)} | {interval} | {p_value} | {diff['n']} |")
            arm_cells = [""] * len(arms)  # the arms' columns once per metric
    if confidence is not None:
        lines += ["", f"CI: {100 * confidence:.0f}% Student-t interval of the mean paired difference "
                      "(accuracy differences in percentage points)."]

    accuracy = summary["metrics"].get("eval_accuracy", {})
    verdicts = []
    for arm, key in _DIFFERENCES:
        diff = accuracy.get(key, {})
        if not _finite(diff.get("ci_low")):
            continue
        if diff["ci_low"] > 0:
            verdicts.append(f"{names[arm]}'s accuracy is higher than the baseline's, and the interval excludes zero.")
        elif diff["ci_high"] < 0:
            verdicts.append(f"{names[arm]}'s accuracy is lower than the baseline's, and the interval excludes zero.")
        else:
            verdicts.append(f"{names[arm]} vs baseline: the interval includes zero: no detectable accuracy "
                            "difference at this number of seeds.")
    if verdicts:
        lines += ["", "Verdict: " + " ".join(verdicts)]
    lost = summary["incomplete_seeds"]
    if summary["failed_runs"]:
        lines += ["", f"{len(summary['failed_runs'])} run(s) FAILED; {len(lost)} seed(s) left out of the "
                      f"statistics (seeds {lost}):"]
        lines += [f"- seed {f['seed']}, {f['arm']}: {f['error']}" for f in summary["failed_runs"]]
    return "\n".join(lines)


def plot_ab(runs: Sequence[ArmRun], summary: dict[str, Any], path: str | os.PathLike) -> None:
    """Two panels: final accuracy per seed (pairs joined), and every run's validation accuracy curve."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    arms = tuple(summary.get("arms", ARMS))
    colours = {"baseline": "tab:blue", "cdb": "tab:orange", EXTRA_ARM: "tab:green"}
    names = _arm_names(summary)
    by_key = {(r.seed, r.arm): r for r in runs if r.status == "ok"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))

    for seed in summary["seeds"]:
        pair = [by_key.get((seed, arm)) for arm in arms]
        values = [100 * r.metrics["eval_accuracy"] if r and "eval_accuracy" in r.metrics else None for r in pair]
        if all(v is not None for v in values):
            left.plot(range(len(arms)), values, color="0.7", linewidth=1, zorder=1)
        for x, (arm, value) in enumerate(zip(arms, values)):
            if value is not None:
                left.scatter([x], [value], color=colours[arm], zorder=2)
    stats = summary["metrics"].get("eval_accuracy", {})
    for x, arm in enumerate(arms):
        mean = stats.get(arm, {}).get("mean", math.nan)
        if _finite(mean):
            left.hlines(100 * mean, x - 0.15, x + 0.15, color=colours[arm], linewidth=3)
    title = "final validation accuracy per seed"
    for arm, key in _DIFFERENCES:
        diff = stats.get(key, {})
        if _finite(diff.get("ci_low")):
            title += (f"\n{names[arm]} - baseline = {100 * diff['mean']:+.2f} pt, {100 * diff['confidence']:.0f}% CI "
                      f"[{100 * diff['ci_low']:+.2f}, {100 * diff['ci_high']:+.2f}]")
    left.set_title(title, fontsize=10)
    left.set_xticks(range(len(arms)), [names[arm] for arm in arms])
    left.set_xlim(-0.5, len(arms) - 0.5)
    left.set_ylabel("accuracy (%)")

    drawn = set()
    for run in runs:
        points = [p for p in run.curve if "eval_accuracy" in p]
        if run.status != "ok" or not points:
            continue
        label = names[run.arm] if run.arm not in drawn else None
        drawn.add(run.arm)
        right.plot([p["step"] for p in points], [100 * p["eval_accuracy"] for p in points],
                   color=colours[run.arm], alpha=0.7, linewidth=1.2, marker=".", label=label)
    if drawn:
        right.legend()
    else:
        right.text(0.5, 0.5, "no validation curves recorded", ha="center", va="center", transform=right.transAxes)
    right.set_title("validation accuracy during training (one line per run)", fontsize=10)
    right.set_xlabel("optimizer step")
    right.set_ylabel("accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
