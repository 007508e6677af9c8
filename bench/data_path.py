"""How long it takes to prepare one training batch, before and after the uint8 data path.

Times fetching and collating a batch of built-in MNIST images (the throughput benchmark's data) at a
given input size through three paths, in one process, interleaved, median over batches:

* ``pil``: the path run_finetune.py used before: each fetch reads the Arrow row and decodes the PNG,
  then RandomResizedCrop and flip on the PIL image, then float conversion and normalization, under
  per-example seeding of the global RNGs (:class:`cdb_hf.train_set.PerExampleSeeded`);
* ``uint8``: :class:`cdb_hf.train_set.TrainImages` without its cache (``--train_image_cache_mb 0``):
  decode at each fetch, crop and flip on uint8 tensors from the example's own random stream;
* ``uint8+cache``: the same on images decoded once (the default).

    python bench/data_path.py --image_size 32 --image_size 224 --json bench/results/data_path.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torchvision.transforms import v2
from transformers import AutoImageProcessor

from cdb_hf import train_set, transforms
from cdb_hf.builtin import load_builtin_dataset
from cdb_hf.demo import prepare_base_checkpoint


def datasets_for(image_size: int, num_examples: int) -> dict[str, torch.utils.data.Dataset]:
    """The three training sets over the same examples, for the built-in Lite0's preprocessing at ``image_size``."""
    processor = AutoImageProcessor.from_pretrained(str(prepare_base_checkpoint(image_size)))
    split = load_builtin_dataset("builtin:mnist5k")["train"].select(range(num_examples))
    train, _ = transforms.build_transforms(processor)
    pil = v2.Compose([transforms.ToRGB(), v2.RandomResizedCrop(train.size, interpolation=train.interpolation),
                      v2.RandomHorizontalFlip(), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                      v2.Normalize(mean=list(processor.data_config["mean"]), std=list(processor.data_config["std"]))])
    tic = time.perf_counter()
    cached = train_set.TrainImages(split, train, seed=0, cache_bytes=2**30)
    decode_once_s = time.perf_counter() - tic
    return {"pil": train_set.PerExampleSeeded(split.with_transform(transforms._ExampleTransform(pil)), seed=0),
            "uint8": train_set.TrainImages(split, train, seed=0, cache_bytes=0),
            "uint8+cache": cached}, decode_once_s


def batch_ms(dataset, start: int, batch_size: int) -> float:
    tic = time.perf_counter()
    transforms.collate_fn([dataset[i] for i in range(start, start + batch_size)])
    return (time.perf_counter() - tic) * 1e3


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image_size", type=int, action="append", help="Repeatable; default 32 and 224.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--note", default="")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results = {}
    for size in args.image_size or [32, 224]:
        paths, decode_once_s = datasets_for(size, args.batch_size * args.batches)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for batch in range(args.batches):  # interleaved, so that machine noise hits every path alike
            for name, dataset in paths.items():
                times[name].append(batch_ms(dataset, batch * args.batch_size, args.batch_size))
        results[size] = {"median_ms_per_batch": {n: statistics.median(t) for n, t in times.items()},
                         "samples_ms": times, "decode_once_s_for_examples": decode_once_s,
                         "examples": args.batch_size * args.batches}
        print(f"{size} px, batch {args.batch_size}: " + ", ".join(
            f"{n} {m:.1f} ms" for n, m in results[size]["median_ms_per_batch"].items())
            + f" (decoding {args.batch_size * args.batches} images once: {decode_once_s:.2f} s)", flush=True)
    payload = {"setup": {"batch_size": args.batch_size, "batches": args.batches, "cpu_count": os.cpu_count(),
                         "platform": platform.platform(), "gpu": "none", "torch_threads": torch.get_num_threads(),
                         "note": args.note}, "results": results}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return payload


if __name__ == "__main__":
    main()
