"""What the pre-training image check costs: per image, and extrapolated to 100k images.

Generates JPEGs the size of an average ImageNet photo (500x375, quality 90, smooth content with noise:
about 60-100 kB each) and times, each the median of ``--rounds`` rounds:

* ``verify``: the old check, ``Image.open`` + ``verify()`` (one thread; it does not decode JPEG data, so
  it misses truncated files);
* ``decode_1_thread`` / ``decode_threads``: :func:`cdb_hf.image_check.check_files` without the cache, on
  one thread and on the default thread count (the CPUs available), i.e. a first run;
* ``first_run_with_cache``: the same with an empty cache, writing the verdicts (what a first run costs);
* ``cached``: the second run over the same unchanged files (stat calls and one sqlite query per 500).

Whether the threads run in parallel is read against a control, timed the same way: sha256 of 8 MiB
buffers, which holds no GIL, on one thread and on the default count. Its speedup is what the machine
gives this process at that moment (other jobs take their share; nice does not help across sessions
where the kernel groups tasks by session); the decode's speedup can reach it only if the decode holds
no GIL either.

The files are freshly written, so they are in the page cache: a first run from a cold disk adds the
read time of the folder. ::

    python bench/image_check.py                       # about 1 minute on 2 CPU cores
    python bench/image_check.py --images 1000 --json bench/results/image_check.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from cdb_hf import image_check


def write_photos(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """``count`` JPEGs of ``size`` (w, h): smooth colour fields with sensor-like noise, like photos compress."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for index in range(count):
        fx, fy, phase = rng.uniform(0.005, 0.05, 3)
        base = np.stack([127 + 100 * np.sin(fx * x + fy * y + phase * k + index) for k in range(3)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"photo_{index:05d}.jpg"
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def verify_all(paths: list[Path]) -> None:
    for path in paths:
        with Image.open(path) as image:
            image.verify()


def sha256_buffers(threads: int, count: int = 16) -> None:
    """The GIL-free control: hash ``count`` 8 MiB buffers on ``threads`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    buffer = bytes(8 << 20)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda _: hashlib.sha256(buffer).digest(), range(count)))


def timed(function, rounds: int) -> float:
    """Median seconds of ``rounds`` calls of ``function()`` (which may prepare its own state first)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "cpus_available": image_check.default_threads(),
            "python": sys.version.split()[0], "pillow": PIL.__version__,
            # Other jobs on the machine slow every row alike and hide the threads' gain: say how busy it was.
            "load_average_1min": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="Also write the numbers here.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cdb_hf_image_check_bench_") as scratch:
        scratch = Path(scratch)
        (scratch / "images").mkdir()
        paths = write_photos(scratch / "images", args.images, tuple(args.size))
        mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        os.environ[image_check.CACHE_ENV] = str(scratch / "cache")
        cache_file = image_check.cache_path()
        threads = image_check.default_threads()

        def first_run() -> None:
            cache_file.unlink(missing_ok=True)
            image_check.check_files(paths)

        seconds = {
            "verify": timed(lambda: verify_all(paths), args.rounds),
            "decode_1_thread": timed(lambda: image_check.check_files(paths, threads=1, use_cache=False), args.rounds),
            "decode_threads": timed(lambda: image_check.check_files(paths, use_cache=False), args.rounds),
            "first_run_with_cache": timed(first_run, args.rounds),
            "cached": timed(lambda: image_check.check_files(paths), args.rounds),
        }
        assert image_check.check_files(paths) == {}, "the generated images must all decode"
        control = {"control_1_thread": timed(lambda: sha256_buffers(1), args.rounds),
                   "control_threads": timed(lambda: sha256_buffers(threads), args.rounds)}

    per_image_ms = {name: 1000 * value / args.images for name, value in seconds.items()}
    per_100k_s = {name: value * 100_000 / 1000 for name, value in per_image_ms.items()}
    print(f"{args.images} JPEGs of {args.size[0]}x{args.size[1]} px, {mean_kb:.0f} kB on average; "
          f"{threads} thread(s) by default; median of {args.rounds} round(s)")
    print(f"{'':22s} {'ms/image':>9s} {'per 100k images':>16s}")
    for name in seconds:
        print(f"{name:22s} {per_image_ms[name]:9.3f} {per_100k_s[name]:14.1f} s")
    speedup = {"decode": seconds["decode_1_thread"] / seconds["decode_threads"],
               "control_no_gil": control["control_1_thread"] / control["control_threads"]}
    print(f"speedup of {threads} threads over 1: decode {speedup['decode']:.2f}x, GIL-free control "
          f"{speedup['control_no_gil']:.2f}x (what the machine gave; load average {os.getloadavg()[0]:.1f})")
    if args.json:
        payload = {"setup": {**vars(args), "mean_kb": round(mean_kb, 1), "default_threads": threads},
                   "machine": machine(), "ms_per_image": per_image_ms, "seconds_per_100k_images": per_100k_s,
                   "control_seconds": control, "speedup_of_default_threads": speedup}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
