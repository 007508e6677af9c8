"""The seeded training set: each example augmented by a pure function of (seed, epoch, index).

Training examples (:class:`TrainImages`) are decoded once into uint8 tensors when they fit in memory and
cropped on uint8 tensors from a random stream of their own (:func:`example_rng`): cheaper than decoding
and cropping PIL images at every fetch, and independent of prefetching, workers and resumption.
:class:`PerExampleSeeded` gives the same guarantee to any dataset whose augmentation draws from the
global RNGs (a user's own loop).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image as PILImage

from .transforms import TrainTransform, to_uint8_chw

__all__ = ["PerExampleSeeded", "TrainImages", "data_seed", "example_rng"]


def example_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random stream of one example's augmentation: a pure function of (seed, epoch, index).

    A string seed goes through SHA-512 in :class:`random.Random`, so neighbouring indices get unrelated streams.
    """
    return random.Random(f"{seed}:{epoch}:{index}")


def data_seed(training_args) -> int:
    """The seed of data order and augmentation: ``--data_seed`` if given, else ``--seed`` (the Trainer's rule)."""
    return training_args.data_seed if training_args.data_seed is not None else training_args.seed


class PerExampleSeeded(torch.utils.data.Dataset):
    """Runs each example's random augmentation under its own seed, a pure function of (seed, epoch, index).

    Augmentations draw from the global RNGs when an example is fetched, and which fetch sees which RNG
    state depends on the dataloader's prefetching, its workers and the batches a resumed run skips: a
    resumed run would crop differently from the uninterrupted one. Seeding each example removes all
    three dependencies; the global RNG states are left as they were.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        seed = int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])
        python_state, numpy_state = random.getstate(), np.random.get_state()
        # fork_rng(devices=[]) restores only the CPU generator; torch.manual_seed would also reseed every
        # CUDA generator (the one dropout draws from), so seed the CPU generator alone.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)


# ---------------------------------------------------------------------------------------------- training set


class TrainImages(torch.utils.data.Dataset):
    """The training split as ``{"pixel_values", "labels"}`` examples, each augmented by (seed, epoch, index).

    Images are decoded once into RGB ``uint8`` tensors when they fit in ``cache_bytes`` (decoding and
    Arrow row access were most of the time it took to prepare a batch); otherwise each fetch decodes its
    image from the split, with the same result. A :class:`TrainTransform` draws from
    :func:`example_rng`, so an example's crop depends only on (seed, epoch, index): prefetching, workers
    and the batches a resumed run skips cannot change it, and the global RNG states are not touched.
    Any other transform (``--train_augmentation none``: the processor's own preprocessing) gets the
    decoded RGB image and draws nothing.
    """

    def __init__(self, split: datasets.Dataset, transform: Callable[..., torch.Tensor], seed: int,
                 cache_bytes: int = 0) -> None:
        self.split, self.transform, self.seed, self.epoch = split, transform, seed, 0
        # One Arrow read (indices mapping included): reading the column row by row took 2.3 s per 200k images.
        self.labels = [int(label) for label in split.with_format("arrow")["label"].to_pylist()]
        self.images = _decode_into_memory(split, cache_bytes)

    @property
    def cached(self) -> bool:
        return self.images is not None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if self.images is not None:
            image = self.images[index]
        else:
            image = to_uint8_chw(self.split[index]["image"])
        if isinstance(self.transform, TrainTransform):
            pixel_values = self.transform(image, example_rng(self.seed, self.epoch, index))
        else:
            pixel_values = self.transform(PILImage.fromarray(image.permute(1, 2, 0).numpy()))
        return {"pixel_values": pixel_values, "labels": self.labels[index]}


def _decode_into_memory(split: datasets.Dataset, cache_bytes: int) -> list[torch.Tensor] | None:
    """Every image of ``split`` as a uint8 CHW tensor, or None when they would take more than ``cache_bytes``."""
    if cache_bytes <= 0 or len(split) == 0:
        return None
    images: list[torch.Tensor] = []
    total = 0
    for batch in split.select_columns(["image"]).iter(batch_size=_CACHE_SAMPLE):
        for image in batch["image"]:
            pixels = to_uint8_chw(image)
            total += pixels.numel()
            if total > cache_bytes or (len(images) == 0 and pixels.numel() * len(split) > 2 * cache_bytes):
                return None  # decoding the rest just to drop it would waste the start-up time
            images.append(pixels)
        if len(images) == _CACHE_SAMPLE and total * len(split) > cache_bytes * len(images):
            # The first images' mean size says the split will not fit: stop now, not after filling the cap
            # (100k 64-px images and the 1 GiB default: 87k decoded, 20 s and 1 GiB, then dropped).
            return None
    return images


# The first this many images give the mean size that decides whether the split fits the decode cache.
_CACHE_SAMPLE = 256
