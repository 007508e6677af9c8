"""How start-up, speed and memory grow with the dataset: map-style vs ``--streaming``, on both faces.

For each N (``--sizes``), an image folder of N small JPEGs (64x64, 10 classes; written once under
``--data_root`` and reused by later runs) and a 100-image validation folder. For each data path
(``map``: the default, with its image check and decode cache; ``stream``: ``--streaming``) and each face
(``hf``, ``accelerate``), ``run_finetune.py`` is run in a fresh process with a tiny ViT (32 px) twice:

once with ``--max_steps 1+S``; an optimizer post-step hook in the child records the wall clock of every
step, which gives the time from launch to the end of the first optimizer step and the steady-state images/s
(S x batch over the time of the last S steps), and the process's peak RSS (``VmHWM``) at its exit. End-to-end
numbers on a shared machine carry its noise; ``data_path`` isolates the data cost in this process, one
thread: ms per training example through the map-style ``TrainImages`` (uint8 cache on and off) and through
the stream (read, decode, augment), and the time to its first example. Before each map-style timing, a first
launch with an empty image-check cache decodes every image once (its time and RSS are kept as ``first_launch_*``),
so the timed run pays what every later launch pays; ``--cold`` times a run whose check finds the cache as it is.
``--lock FILE`` holds a flock around each measurement, so benchmarks that share the machine take turns. Writes JSON to
``--json`` and a plot of cost against N next to it. ::

    nice -n 15 python bench/scale.py --sizes 2000 20000 --json bench/results/scale_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this very tree, not whatever cdb_hf is installed (the children get PYTHONPATH)
CLASSES = 10


def write_folder(root: Path, count: int, seed: int, size: int = 64) -> Path:
    """``root/<class>/<i>.jpg``, ``count`` images (``size`` px) over CLASSES classes; kept if already complete."""
    from PIL import Image

    done = root / ".complete"
    if done.is_file() and done.read_text() == str(count):
        return root
    rng = np.random.default_rng(seed)
    for index in range(count):
        label = index % CLASSES
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([(label * 25) % 256, (label * 70) % 256, (label * 140) % 256], dtype=np.float64)
        pixels = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:07d}.jpg", quality=90)
    done.write_text(str(count))
    return root


def write_parquet(folder: Path, validation: Path, root: Path, rows_per_shard: int = 12_500,
                  rows_per_group: int = 1_000) -> Path:
    """The same images as parquet shards (JPEG bytes + a ClassLabel), ``root/data/{train,validation}-*.parquet``,
    as a Hub dataset stores them: shards and row groups of a fixed size (a reader holds a row group in memory,
    so a row group that grew with N would make memory grow with N); kept if already complete."""
    import datasets

    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{rows_per_shard}:{rows_per_group}":
        return root
    names = [f"class{i}" for i in range(CLASSES)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    (root / "data").mkdir(parents=True, exist_ok=True)
    for old in (root / "data").glob("*.parquet"):
        old.unlink()  # written by this function with other sizes
    for split, source in (("train", folder), ("validation", validation)):
        files = sorted(source.rglob("*.jpg"))
        count = max(1, round(len(files) / rows_per_shard))
        order = np.random.default_rng(0).permutation(len(files))  # shards of mixed classes, as on the Hub
        table = datasets.Dataset.from_dict(
            {"image": [{"bytes": files[i].read_bytes(), "path": files[i].name} for i in order],
             "label": [names.index(files[i].parent.name) for i in order]}, features=features)
        for shard in range(count):
            table.shard(count, shard, contiguous=True).to_parquet(
                str(root / "data" / f"{split}-{shard:05d}-of-{count:05d}.parquet"), batch_size=rows_per_group)
    done.write_text(f"{rows_per_shard}:{rows_per_group}")
    return root


def tiny_model(path: Path) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    if not (path / "config.json").is_file():
        labels = [f"class{i}" for i in range(CLASSES)]
        config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                           image_size=32, patch_size=8, id2label=dict(enumerate(labels)),
                           label2id={label: i for i, label in enumerate(labels)})
        ViTForImageClassification(config).save_pretrained(path)
        ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                          image_std=[0.5] * 3).save_pretrained(path)
    return path


# The child: the CLI, with every optimizer step's wall-clock time appended to $SCALE_STEP_TIMES, and at exit its
# peak RSS (VmHWM: of this program alone; a fork's ru_maxrss would count the parent's pages from before exec).
_CHILD = """
import atexit, os, sys, time, torch.optim.optimizer as o
times = open(os.environ["SCALE_STEP_TIMES"], "a")
o.register_optimizer_step_post_hook(lambda *_: (times.write(f"{time.time()}\\n"), times.flush()))
def peak():
    kib = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))
    times.write(f"peak_kib {kib}\\n")
    times.flush()
atexit.register(peak)
from cdb_hf.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_once(argv: list[str], env: dict[str, str], times_file: Path) -> tuple[list[float], float]:
    """(seconds from launch to the end of each optimizer step, peak RSS in MiB) of one CLI process."""
    times_file.unlink(missing_ok=True)
    start = time.time()
    process = subprocess.Popen([sys.executable, "-c", _CHILD, *argv], cwd=REPO,
                               env={**env, "SCALE_STEP_TIMES": str(times_file), "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    if process.wait() != 0:
        raise RuntimeError(f"run_finetune.py {' '.join(argv)} failed:\n{stderr.decode()[-3000:]}")
    lines = times_file.read_text().splitlines()
    steps = [float(line) - start for line in lines if not line.startswith("peak_kib")]
    peak = next(int(line.split()[1]) for line in lines if line.startswith("peak_kib"))
    return steps, peak / 1024


@contextlib.contextmanager
def held(lock: Path | None):
    """``lock`` held (flock) while timing, so that benchmarks sharing a machine run one at a time."""
    if lock is None:
        yield
        return
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def data_path(train: Path, validation: Path, examples: int = 1000) -> dict[str, float]:
    """ms per training example of each data path, in this process on one thread (no model)."""
    import itertools

    import torch

    from cdb_hf import sources, streaming, train_set, transforms
    from cdb_hf.arguments import DataArguments

    torch.set_num_threads(1)
    transform = transforms.TrainTransform((32, 32), transforms.v2.InterpolationMode.BILINEAR, [0.5] * 3, [0.5] * 3, 1 / 255)
    split = sources._load_image_folders(str(train), None)["train"]
    result = {}
    for name, cache in (("map_uncached", 0), ("map_cached", 1 << 30)):
        tic = time.perf_counter()
        dataset = train_set.TrainImages(split, transform, 0, cache_bytes=cache)
        result[f"{name}_build_s"] = round(time.perf_counter() - tic, 3)
        tic = time.perf_counter()
        for index in range(min(examples, len(dataset))):
            dataset[index]
        result[f"{name}_ms_per_example"] = round((time.perf_counter() - tic) * 1000 / min(examples, len(dataset)), 3)
    tic = time.perf_counter()
    streams = streaming.open_streams(DataArguments(train_dir=str(train), validation_dir=str(validation),
                                                   streaming=True), seed=0)
    stream = streaming.StreamTrainImages(streams.train, transform, 0, buffer_size=10_000, rank=0, world_size=1,
                                         corrupt_images="error", source=str(train))
    iterator = iter(stream)
    next(iterator)
    result["stream_open_to_first_example_s"] = round(time.perf_counter() - tic, 3)
    tic = time.perf_counter()
    for _ in itertools.islice(iterator, examples):
        pass
    result["stream_ms_per_example"] = round((time.perf_counter() - tic) * 1000 / examples, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--data_root", type=Path, default=REPO / "bench" / "scale_data")
    parser.add_argument("--steady_steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--paths", nargs="+", default=["map", "stream"], choices=["map", "stream"])
    parser.add_argument("--faces", nargs="+", default=["hf", "accelerate"], choices=["hf", "accelerate"])
    parser.add_argument("--cold", action="store_true", help="Do not warm the image-check cache first.")
    parser.add_argument("--source", choices=["folder", "parquet"], default="folder",
                        help="folder: --train_dir/--validation_dir; parquet: the same images as parquet shards of "
                             "12,500 rows in row groups of 1,000 (--dataset_name).")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Runs per setting; the row gives their medians (and every run's seconds to first step).")
    parser.add_argument("--train_image_cache_mb", type=int, default=None,
                        help="Passed to the map-style runs (default: the CLI's); 0 turns the decode cache off.")
    parser.add_argument("--lock", type=Path, default=None,
                        help="A file to flock around each measurement (other benchmarks on the machine wait).")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "scale_cpu.json")
    args = parser.parse_args(argv)

    model = tiny_model(args.data_root / "tiny_vit")
    validation = write_folder(args.data_root / "validation", 100, seed=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CDB_HF_CACHE": str(args.data_root / "cache"), "HF_HOME": str(args.data_root / "hf_home")}
    rows = []
    for size in args.sizes:
        t0 = time.perf_counter()
        train = write_folder(args.data_root / f"train_{size}", size, seed=0)
        print(f"N={size}: folder ready in {time.perf_counter() - t0:.1f} s", flush=True)
        if args.source == "folder":
            with held(args.lock):
                costs = {"images": size, "path": "data_path", **data_path(train, validation),
                         "load_average_1min": round(os.getloadavg()[0], 2)}
            rows.append(costs)
            print(json.dumps(costs), flush=True)
        else:
            write_parquet(train, validation, args.data_root / f"parquet_{size}")
        for path in args.paths:
            for face in args.faces:
                def argv_for(steps: int, out: str, train: Path = train, face: str = face, path: str = path,
                             size: int = size) -> list[str]:
                    data = (["--train_dir", str(train), "--validation_dir", str(validation)] if args.source == "folder"
                            else ["--dataset_name", str(args.data_root / f"parquet_{size}")])
                    flags = ["--model_name_or_path", str(model), *data, "--output_dir", out, "--max_steps", str(steps),
                             "--per_device_train_batch_size", str(args.batch), "--per_device_eval_batch_size", "100",
                             "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
                             "--disable_tqdm", "true", "--trainer", face, "--logging_steps", "1000"]
                    if path == "stream":
                        return flags + ["--streaming", "true"]
                    cache = args.train_image_cache_mb
                    return flags + ([] if cache is None else ["--train_image_cache_mb", str(cache)])

                row = {}
                with tempfile.TemporaryDirectory() as scratch, held(args.lock):
                    times = Path(scratch) / "steps.txt"
                    run_env = env
                    if path == "map" and not args.cold:
                        # A fresh image-check cache: this first launch decodes every image once (timed too).
                        run_env = {**env, "CDB_HF_CACHE": f"{scratch}/check_cache"}
                        first, first_rss = run_once(argv_for(1, f"{scratch}/warm"), run_env, times)
                        row = {"first_launch_seconds_to_first_step": round(first[0], 2),
                               "first_launch_peak_rss_mib": round(first_rss, 1)}
                    load = os.getloadavg()[0]
                    runs = [run_once(argv_for(1 + args.steady_steps, f"{scratch}/run{i}"), run_env, times)
                            for i in range(args.repeats)]
                firsts = [steps[0] for steps, _ in runs]
                row = {"images": size, "path": path, "face": face, "source": args.source,
                       "seconds_to_first_step": round(float(np.median(firsts)), 2),
                       "steady_images_per_second": round(float(np.median(
                           [args.steady_steps * args.batch / (steps[-1] - steps[0]) for steps, _ in runs])), 1),
                       "peak_rss_mib": round(float(np.median([rss for _, rss in runs])), 1), **row,
                       "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}
                if args.repeats > 1:
                    row["seconds_to_first_step_runs"] = [round(first, 2) for first in firsts]
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_average_at_end": os.getloadavg()},
              "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    plot(rows, args.json.with_suffix(".png"))
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, axis in zip(("seconds_to_first_step", "steady_images_per_second", "peak_rss_mib"), axes):
        for kind in sorted({r["path"] for r in rows if "face" in r}):
            for face in sorted({r["face"] for r in rows if "face" in r}):
                points = sorted((r["images"], r[key]) for r in rows if r["path"] == kind and r.get("face") == face)
                if points:
                    axis.plot(*zip(*points), marker="o", label=f"{kind}/{face}")
        axis.set_xscale("log")
        axis.set_xlabel("training images")
        axis.set_title(key.replace("_", " "))
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
