"""The A/B comparison's vocabulary (arms, metrics, :class:`ArmRun`) and its reporting: ``results.json``,
``results.csv``, ``report.md`` (:func:`render_report`) and ``ab_plot.png`` (:func:`plot_ab`).

The statistics and the runner are :mod:`cdb_hf.ab`'s; this module only formats what they produced.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers.utils import logging

__all__ = ["ARMS", "EXTRA_ARM", "METRICS", "ArmRun", "finite", "format_number", "plot_ab", "render_report",
           "write_results"]

logger = logging.get_logger(__name__)

ARMS = ("baseline", "cdb")
#: The optional third arm: the baseline with ``--ab_extra_arm``'s values.
EXTRA_ARM = "extra"
#: The metrics compared, in report order; ``eval_accuracy`` is the primary one.
METRICS = ("eval_accuracy", "eval_loss", "final_train_loss", "train_runtime")


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


def finite(value: Any) -> bool:
    """A real, finite number (not a bool, not NaN/inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    if not finite(value):
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
                        if finite(diff["ci_low"]) else "n/a")
            p_value = f"{diff['p_value']:.3f}" if finite(diff["p_value"]) else "n/a"
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
        if not finite(diff.get("ci_low")):
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
        if finite(mean):
            left.hlines(100 * mean, x - 0.15, x + 0.15, color=colours[arm], linewidth=3)
    title = "final validation accuracy per seed"
    for arm, key in _DIFFERENCES:
        diff = stats.get(key, {})
        if finite(diff.get("ci_low")):
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
