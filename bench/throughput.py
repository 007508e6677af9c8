"""End-to-end training throughput of run_finetune.py vs a plain transformers Trainer script.

Every variant trains the same checkpoint (the built-in EfficientNet-Lite0 at the demo's resolution) on
the same built-in data with the same batch size and number of steps, in a fresh process each:

* ``plain``: bench/plain_trainer_baseline.py, written the way transformers' image-classification
  example writes it (the reference, 1.00x);
* ``hf``, ``hf+cdb``: our CLI on the Trainer path, CDB off / on (the demo's CDB settings);
* ``accelerate``, ``accelerate+cdb``: our CLI on the accelerate loop, CDB off / on.

Our variants run with the CLI's defaults (channels_last on, the Trainer's 0 dataloader workers).
``--ours_args`` / ``--plain_args`` add ablations to the same run: each value is one more set of flags,
giving each of our variants (or ``plain``) once more under the name ``"<variant> <flags>"``.

Images/s counts the training phase (data loading and transforms included, model loading excluded):
``steps x batch / train_runtime``. Variants are interleaved round by round so that machine noise hits
them alike; each cell is the median over the rounds (min and max are printed too), and the ratios are
against ``plain`` (with no extra flags) from the same run::

    python bench/throughput.py                     # about 5 minutes on 2 CPU cores
    python bench/throughput.py --rounds 1 --max_steps 10 --json bench/results/throughput.json
    python bench/throughput.py --ours_args="--channels_last false" --ours_args="--dataloader_num_workers 1" \
        --plain_args="--dataloader_num_workers 1"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cdb_hf.demo import DEMO_ARGS, prepare_base_checkpoint

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "hf", "hf+cdb", "accelerate", "accelerate+cdb")
CDB_FLAGS = [item for key, value in DEMO_ARGS.items() if key.startswith("cdb_")
             for item in (f"--{key}", str(value))]


def command(variant: str, checkpoint: Path, output_dir: Path, args: argparse.Namespace) -> list[str]:
    """The argv that trains ``variant`` (a name of VARIANTS, optionally followed by extra flags)."""
    variant, _, extra = variant.partition(" ")
    common = ["--model_name_or_path", str(checkpoint), "--max_train_samples", str(args.max_train_samples),
              "--per_device_train_batch_size", str(args.batch_size), "--max_steps", str(args.max_steps),
              "--learning_rate", "3e-3", "--seed", "0"]
    if variant == "plain":
        return [sys.executable, str(REPO / "bench" / "plain_trainer_baseline.py"), *common, *extra.split()]
    trainer, _, cdb = variant.partition("+")
    return [sys.executable, str(REPO / "run_finetune.py"), *common, "--dataset_name", "builtin:mnist5k",
            "--output_dir", str(output_dir), "--trainer", trainer, "--do_train", "--eval_strategy", "no",
            "--save_strategy", "no", "--optim", "adamw_torch", "--report_to", "none", "--disable_tqdm", "true",
            "--logging_steps", "10000", "--log_level", "error", "--max_eval_samples", "32",
            "--cdb", "true" if cdb else "false", *(CDB_FLAGS if cdb else []), *extra.split()]


def run_variant(variant: str, checkpoint: Path, args: argparse.Namespace) -> dict[str, float]:
    """Train one variant in a fresh process; return its training time, images/s and process wall time."""
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = Path(scratch) / "run"
        tic = time.perf_counter()
        completed = subprocess.run(command(variant, checkpoint, output_dir, args), cwd=REPO, capture_output=True,
                                   text=True)
        wall = time.perf_counter() - tic
        if completed.returncode != 0:
            raise RuntimeError(f"{variant} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
        if variant.startswith("plain"):
            line = next(line for line in reversed(completed.stdout.splitlines()) if line.startswith("{"))
            metrics = json.loads(line)["metrics"]
        else:
            metrics = json.loads((output_dir / "all_results.json").read_text())
    runtime = float(metrics["train_runtime"])
    return {"train_runtime": runtime, "images_per_s": args.max_steps * args.batch_size / runtime,
            "process_wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_train_samples", type=int, default=1000)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--ours_args", action="append", default=[],
                        help="An ablation: run each of our variants once more with these extra run_finetune.py "
                             "flags (e.g. '--channels_last false'); repeatable.")
    parser.add_argument("--plain_args", action="append", default=[],
                        help="An ablation of the reference: plain once more with these extra flags "
                             "(e.g. '--dataloader_num_workers 1'); repeatable.")
    parser.add_argument("--json", help="Also write the results to this JSON file.")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "plain" not in variants:
        parser.error(f"--variants must include 'plain' and only use {VARIANTS}; got unknown {unknown}")

    variants += [f"{v} {' '.join(extra.split())}" for extra in args.ours_args for v in VARIANTS[1:] if v in variants]
    variants += [f"plain {' '.join(extra.split())}" for extra in args.plain_args]
    checkpoint = prepare_base_checkpoint(args.image_size)
    samples: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for round_index in range(args.rounds):
        for variant in variants:
            result = run_variant(variant, checkpoint, args)
            samples[variant].append(result)
            print(f"round {round_index + 1}/{args.rounds} {variant:48} {result['images_per_s']:7.1f} images/s "
                  f"(train {result['train_runtime']:.1f} s, process {result['process_wall_s']:.1f} s)", flush=True)

    medians = {v: {key: statistics.median(s[key] for s in samples[v]) for key in samples[v][0]} for v in variants}
    reference = medians["plain"]["images_per_s"]
    print(f"\nEfficientNet-Lite0 at {args.image_size} px, batch {args.batch_size}, {args.max_steps} steps, "
          f"median of {args.rounds} round(s); {os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}")
    width = max(len(v) for v in variants) + 2
    print(f"{'variant':{width}}{'images/s':>10}{'min-max':>14}{'vs plain':>10}{'train s':>9}{'process s':>11}")
    for variant in variants:
        m, rates = medians[variant], [s["images_per_s"] for s in samples[variant]]
        spread = f"{min(rates):.0f}-{max(rates):.0f}"
        print(f"{variant:{width}}{m['images_per_s']:10.1f}{spread:>14}{m['images_per_s'] / reference:9.2f}x"
              f"{m['train_runtime']:9.1f}{m['process_wall_s']:11.1f}")
    if args.json:
        payload = {"setup": {**vars(args), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                             "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
                   "samples": samples, "medians": medians,
                   "ratio_vs_plain": {v: medians[v]["images_per_s"] / reference for v in variants}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
