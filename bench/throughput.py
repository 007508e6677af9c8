"""End-to-end training throughput of run_finetune.py against the compute-bound limit and a plain Trainer script.

Every variant trains the same checkpoint (the built-in EfficientNet-Lite0, or ``--model vit``: a small
randomly initialised ViT) at ``--image_size`` on the same built-in data with the same batch size and
number of steps, in a fresh process each:

* ``limit``: bench/model_limit.py, the model alone on one in-memory batch (AdamW, channels_last, the
  same threads): what this machine can do at best, the reference (1.00);
* ``plain``: bench/plain_trainer_baseline.py, written the way transformers' image-classification
  example writes it;
* ``hf``, ``hf+cdb``, ``hf+cdb_demo``: our CLI on the Trainer path with CDB off, on with the paper's
  defaults (one layer a step, ``--cdb true`` and nothing else), and on with the demo recipe's setting
  (recipes/efficientnet-lite0_mnist5k_ab.yaml's ``cdb_*`` values: every layer with probability 0.5, exact mode);
* ``accelerate``, ``accelerate+cdb``, ``accelerate+cdb_demo``: the same on the accelerate loop.

Our variants run with the CLI's defaults (channels_last on, the training-image cache on, the Trainer's
0 dataloader workers). ``--ours_args`` / ``--plain_args`` add ablations to the same run: each value is
one more set of flags, giving each of our variants (or ``plain``) once more as ``"<variant> <flags>"``.
CDB's own cost, hooks alone, is bench/overhead.py's to measure.

Images/s counts the training phase (data loading and transforms included; model loading and the
one-off decoding into the image cache excluded, they are in the process time): ``steps x batch /
train_runtime``. Variants are interleaved round by round so that machine noise hits them alike; each
cell is the median over the rounds (min and max are printed too), and every variant is shown as a
fraction of ``limit`` from the same run::

    python bench/throughput.py                     # 32 px, about 5 minutes on 2 CPU cores
    python bench/throughput.py --image_size 224 --max_steps 5 --rounds 2 --variants limit,hf,hf+cdb,hf+cdb_demo
    python bench/throughput.py --model vit --image_size 224 --max_steps 5 --rounds 2 --variants limit,hf,hf+cdb
    python bench/throughput.py --ours_args="--dataloader_num_workers 1" --plain_args="--dataloader_num_workers 1"
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

import yaml

from cdb_hf.builtin import builtin_cache_dir, export_once
from cdb_hf.demo import prepare_base_checkpoint, recipe_path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("limit", "plain", "hf", "hf+cdb", "hf+cdb_demo", "accelerate", "accelerate+cdb", "accelerate+cdb_demo")
MODELS = ("lite0", "vit", "vit-b16")


def cdb_settings() -> dict[str, list[str]]:
    """``{suffix: flags}``: ``cdb`` the paper's defaults, ``cdb_demo`` the demo recipe's ``cdb_*`` values."""
    recipe = yaml.safe_load(recipe_path().read_text())
    demo = [item for key, value in recipe.items() if key.startswith("cdb_")
            for item in (f"--{key}", str(value).lower() if isinstance(value, bool) else str(value))]
    return {"cdb": [], "cdb_demo": demo}


def prepare_checkpoint(model: str, image_size: int) -> Path:
    """The checkpoint every variant loads: built-in Lite0 at ``image_size``, or a small random ViT."""
    if model == "lite0":
        return prepare_base_checkpoint(image_size)
    if model == "vit-b16":  # ViT-B/16's shape (768 wide, 12 layers, 12 heads): the paper's model, random weights
        return prepare_small_vit(image_size, hidden=768, heads=12, mlp=3072, name="vit-b16-random")
    return prepare_small_vit(image_size)


def prepare_small_vit(image_size: int, patch_size: int = 16, hidden: int = 192, heads: int = 3, mlp: int = 768,
                      name: str = "vit-tiny-random") -> Path:
    """A ViT-Tiny-shaped ViTForImageClassification (192 wide, 12 layers, 3 heads), seeded random weights.

    Throughput does not depend on the weights, and no pretrained ViT ships offline; exported once.
    """
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    def write(folder: Path) -> None:
        torch.manual_seed(0)
        config = ViTConfig(hidden_size=hidden, num_hidden_layers=12, num_attention_heads=heads, intermediate_size=mlp,
                           image_size=image_size, patch_size=patch_size, num_labels=10)
        ViTForImageClassification(config).save_pretrained(folder)
        ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                          image_std=[0.5] * 3).save_pretrained(folder)

    return export_once(builtin_cache_dir() / f"{name}-{image_size}px", write)


def command(variant: str, checkpoint: Path, output_dir: Path, args: argparse.Namespace) -> list[str]:
    """The argv that trains ``variant`` (a name of VARIANTS, optionally followed by extra flags)."""
    variant, _, extra = variant.partition(" ")
    common = ["--model_name_or_path", str(checkpoint), "--max_train_samples", str(args.max_train_samples),
              "--per_device_train_batch_size", str(args.batch_size), "--max_steps", str(args.max_steps),
              "--learning_rate", "3e-3", "--seed", "0", "--optim", args.optim]
    if variant == "limit":
        return [sys.executable, str(REPO / "bench" / "model_limit.py"), *common, *extra.split()]
    if variant == "plain":
        return [sys.executable, str(REPO / "bench" / "plain_trainer_baseline.py"), *common, *extra.split()]
    trainer, _, cdb = variant.partition("+")
    data = ["--dataset_name", "builtin:mnist5k"]
    if args.train_dir:  # image folders: the data a --streaming variant can read (it needs a validation split)
        data = ["--train_dir", args.train_dir, "--validation_dir", args.validation_dir]
    if "--streaming" in extra.split():  # a stream is bounded by --max_steps alone
        at = common.index("--max_train_samples")
        common = common[:at] + common[at + 2:]
    return [sys.executable, str(REPO / "run_finetune.py"), *common, *data,
            "--output_dir", str(output_dir), "--trainer", trainer, "--do_train", "--eval_strategy", "no",
            "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
            "--logging_steps", "10000", "--log_level", "error", "--max_eval_samples", "32",
            "--cdb", "true" if cdb else "false", *(cdb_settings()[cdb] if cdb else []), *extra.split()]


def run_variant(variant: str, checkpoint: Path, args: argparse.Namespace) -> dict[str, float]:
    """Train one variant in a fresh process; return its training time, images/s and process wall time."""
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = Path(scratch) / "run"
        tic = time.perf_counter()
        # Children import this very tree (not whatever cdb_hf is installed), like this script does.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        completed = subprocess.run(command(variant, checkpoint, output_dir, args), cwd=REPO, capture_output=True,
                                   text=True, env=env)
        wall = time.perf_counter() - tic
        if completed.returncode != 0:
            raise RuntimeError(f"{variant} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
        if variant.startswith(("plain", "limit")):
            line = next(line for line in reversed(completed.stdout.splitlines()) if line.startswith("{"))
            metrics = json.loads(line)["metrics"]
        else:
            metrics = json.loads((output_dir / "all_results.json").read_text())
    runtime = float(metrics["train_runtime"])
    return {"train_runtime": runtime, "images_per_s": args.max_steps * args.batch_size / runtime,
            "process_wall_s": wall}


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="lite0",
                        help="lite0: the built-in EfficientNet-Lite0; vit: a small random ViT (ViT-Tiny's shape).")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_train_samples", type=int, default=1000)
    parser.add_argument("--train_dir", help="Train on this image folder instead of builtin:mnist5k (with "
                                            "--validation_dir; needed by '--ours_args \"--streaming true\"').")
    parser.add_argument("--validation_dir")
    parser.add_argument("--optim", choices=("adamw_torch", "adamw_torch_fused"), default="adamw_torch",
                        help="The AdamW of every variant, the limit included: adamw_torch (torch's own choice of "
                             "implementation, on the CPU the per-parameter loop) or adamw_torch_fused (the CLI's "
                             "default).")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated, from {VARIANTS}.")
    parser.add_argument("--ours_args", action="append", default=[],
                        help="An ablation: run each of our variants once more with these extra run_finetune.py "
                             "flags (e.g. '--dataloader_num_workers 1'); repeatable.")
    parser.add_argument("--plain_args", action="append", default=[],
                        help="An ablation of the reference script: plain once more with these extra flags; "
                             "repeatable.")
    parser.add_argument("--note", default="", help="Free text stored in the JSON (e.g. 'machine shared with 3 jobs').")
    parser.add_argument("--json", help="Also write the results to this JSON file.")
    args = parser.parse_args(argv)
    args.variant_list = args.variants.split(",")
    unknown = sorted(set(args.variant_list) - set(VARIANTS))
    if unknown or "limit" not in args.variant_list:
        parser.error(f"--variants must include 'limit' and only use {VARIANTS}; got unknown {unknown}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    variants = list(args.variant_list)
    ours = [v for v in VARIANTS if v not in ("limit", "plain") and v in variants]
    variants += [f"{v} {' '.join(extra.split())}" for extra in args.ours_args for v in ours]
    variants += [f"plain {' '.join(extra.split())}" for extra in args.plain_args]
    checkpoint = prepare_checkpoint(args.model, args.image_size)
    samples: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for round_index in range(args.rounds):
        for variant in variants:
            result = run_variant(variant, checkpoint, args)
            samples[variant].append(result)
            print(f"round {round_index + 1}/{args.rounds} {variant:48} {result['images_per_s']:7.1f} images/s "
                  f"(train {result['train_runtime']:.1f} s, process {result['process_wall_s']:.1f} s)", flush=True)

    medians = {v: {key: statistics.median(s[key] for s in samples[v]) for key in samples[v][0]} for v in variants}
    limit = medians["limit"]["images_per_s"]
    plain = medians["plain"]["images_per_s"] if "plain" in medians else None
    name = {"lite0": "EfficientNet-Lite0", "vit": "ViT-Tiny-shaped ViT (random weights)",
            "vit-b16": "ViT-B/16-shaped ViT (random weights)"}[args.model]
    print(f"\n{name} at {args.image_size} px, batch {args.batch_size}, {args.max_steps} steps, median of "
          f"{args.rounds} round(s); {os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}")
    width = max(len(v) for v in variants) + 2
    print(f"{'variant':{width}}{'images/s':>10}{'min-max':>14}{'of limit':>10}{'vs plain':>10}{'train s':>9}"
          f"{'process s':>11}")
    for variant in variants:
        m, rates = medians[variant], [s["images_per_s"] for s in samples[variant]]
        spread = f"{min(rates):.0f}-{max(rates):.0f}"
        versus_plain = f"{m['images_per_s'] / plain:9.2f}x" if plain else f"{'-':>10}"
        print(f"{variant:{width}}{m['images_per_s']:10.1f}{spread:>14}{m['images_per_s'] / limit:10.2f}{versus_plain}"
              f"{m['train_runtime']:9.1f}{m['process_wall_s']:11.1f}")
    payload = {"setup": {k: v for k, v in vars(args).items() if k != "variant_list"} | {
                   "cpu_count": os.cpu_count(), "platform": platform.platform(), "gpu": _gpu_name(),
                   "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cdb_settings": cdb_settings()},
               "samples": samples, "medians": medians,
               "fraction_of_limit": {v: medians[v]["images_per_s"] / limit for v in variants},
               "ratio_vs_plain": {v: medians[v]["images_per_s"] / plain for v in variants} if plain else None}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return payload


if __name__ == "__main__":
    main()
