"""Image transforms: the checkpoint's own evaluation preprocessing, and a seeded uint8 crop/flip for training.

Follows transformers' ``examples/pytorch/image-classification/run_image_classification.py``:
RandomResizedCrop/flip for training vs the checkpoint's own resize/crop for evaluation, both ending in the
checkpoint's normalization (sizes, interpolation, mean and std read from its image processor, never
hard-coded). The training crop works on ``uint8`` tensors and draws from a :class:`random.Random` it is
given (see :mod:`cdb_hf.train_set`), not from the global RNGs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image as PILImage
from torchvision.transforms import v2

__all__ = ["TRAIN_AUGMENTATIONS", "ToRGB", "TrainTransform", "apply_eval_transform", "apply_transforms",
           "build_transforms", "collate_fn", "collate_pixels", "to_uint8_chw"]


class ToRGB:
    """PIL image (any mode) or HWC/HW array -> RGB PIL image; palette transparency goes through RGBA.

    16-bit and float grayscale are rescaled to 8 bits first: PIL's own conversion would clip them to white.
    """

    def __call__(self, image: Any) -> PILImage.Image:
        if not isinstance(image, PILImage.Image):
            image = PILImage.fromarray(np.asarray(image))
        if image.mode == "RGB":
            return image
        if image.mode.startswith("I") or image.mode == "F":
            image = PILImage.fromarray(_to_uint8(np.asarray(image), image.mode))
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        return image.convert("RGB")


def _to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    pixels = pixels.astype(np.float64)
    if mode == "F" and pixels.max(initial=0.0) <= 1.0:  # float images are usually in [0, 1]
        pixels = pixels * 255.0
    elif mode.startswith("I;16") or pixels.max(initial=0.0) > 255:  # 16-bit range
        pixels = pixels / 257.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


class _ProcessorEval:
    """The checkpoint's own image processor on one RGB image: its resize, crop and normalization exactly."""

    def __init__(self, image_processor):
        self.image_processor = image_processor
        self.to_rgb = ToRGB()

    def __call__(self, image: Any) -> torch.Tensor:
        pixel_values = self.image_processor(images=self.to_rgb(image), return_tensors="pt")["pixel_values"]
        return pixel_values[0]


def _get(container: Any, key: str) -> Any:
    # transformers 5 stores sizes as SizeDict objects, older processors (and the PIL backend) as plain dicts.
    if container is None:
        return None
    if isinstance(container, dict):
        return container.get(key)
    return getattr(container, key, None)


def _hw(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    height, width = _get(size, "height"), _get(size, "width")
    if height and width:
        return (int(height), int(width))
    shortest = _get(size, "shortest_edge")
    if shortest:
        return (int(shortest), int(shortest))
    return None


def _three(values: Any) -> list[float]:
    if isinstance(values, (int, float)):
        return [float(values)] * 3
    return [float(v) for v in values]


def _training_geometry(image_processor) -> dict[str, Any]:
    """Crop size, interpolation, mean, std and value scale the checkpoint expects, from its processor."""
    data_config = getattr(image_processor, "data_config", None)
    if isinstance(data_config, dict):  # TimmWrapperImageProcessor: timm's resolved data config
        from timm.data.transforms import str_to_interp_mode

        interpolation = data_config.get("interpolation", "bilinear")
        return {
            "size": tuple(int(v) for v in data_config["input_size"][-2:]),
            "interpolation": str_to_interp_mode("bilinear" if interpolation == "random" else interpolation),
            "mean": _three(data_config["mean"]), "std": _three(data_config["std"]), "scale": 1.0 / 255.0,
        }

    from transformers.image_utils import PILImageResampling, pil_torch_interpolation_mapping

    size = None
    if getattr(image_processor, "do_center_crop", False):
        size = _hw(getattr(image_processor, "crop_size", None))
    size = size or _hw(getattr(image_processor, "size", None))
    if size is None:
        raise ValueError(f"Cannot tell the input size from {type(image_processor).__name__}: it has neither "
                         "crop_size nor size with height/width or shortest_edge.")
    resample = getattr(image_processor, "resample", None)
    if isinstance(resample, v2.InterpolationMode):
        interpolation = resample
    elif resample is None:
        interpolation = v2.InterpolationMode.BILINEAR
    else:
        interpolation = pil_torch_interpolation_mapping[PILImageResampling(int(resample))]
    normalize = getattr(image_processor, "do_normalize", True) is not False
    mean = getattr(image_processor, "image_mean", None)
    std = getattr(image_processor, "image_std", None)
    do_rescale = getattr(image_processor, "do_rescale", True) is not False
    return {
        "size": size, "interpolation": interpolation,
        "mean": _three(mean) if normalize and mean is not None else [0.0] * 3,
        "std": _three(std) if normalize and std is not None else [1.0] * 3,
        "scale": float(getattr(image_processor, "rescale_factor", 1.0 / 255.0)) if do_rescale else 1.0,
    }


#: ``--train_augmentation`` values: what the training transform does before the checkpoint's normalization.
TRAIN_AUGMENTATIONS = ("crop_flip", "crop", "none")


# Interpolations torch resizes uint8 tensors with; any other (box, hamming, lanczos) goes through PIL.
_TENSOR_INTERPOLATIONS = (v2.InterpolationMode.NEAREST, v2.InterpolationMode.NEAREST_EXACT,
                          v2.InterpolationMode.BILINEAR, v2.InterpolationMode.BICUBIC)
# torchvision's RandomResizedCrop defaults (and transformers' image-classification example's).
_CROP_SCALE, _CROP_LOG_RATIO = (0.08, 1.0), (math.log(3 / 4), math.log(4 / 3))


def to_uint8_chw(image: Any) -> torch.Tensor:
    """One image (any PIL mode, or an HWC/HW array) -> RGB ``uint8`` CHW tensor, through :class:`ToRGB`."""
    return torch.from_numpy(np.array(ToRGB()(image))).permute(2, 0, 1)  # a copy: PIL's buffer is read-only


class TrainTransform:
    """RandomResizedCrop (and a horizontal flip) on ``uint8`` tensors, then the checkpoint's normalization.

    Draws from an explicit :class:`random.Random` (see :func:`cdb_hf.train_set.example_rng`) rather than the
    global RNGs, so an example's crop depends on nothing but its seed; called without one it draws a seed from
    torch's global generator (``torch.manual_seed`` makes it repeatable). Works on uint8 tensors because
    cropping and resizing 8-bit pixels is several times cheaper than on PIL images or floats.
    """

    def __init__(self, size: tuple[int, int], interpolation: v2.InterpolationMode, mean: Sequence[float],
                 std: Sequence[float], scale: float, flip: bool = True) -> None:
        self.size, self.interpolation, self.flip = tuple(size), interpolation, flip
        # (x * scale - mean) / std == x * (scale / std) - mean / std: one multiply-add on the crop.
        self.multiplier = torch.tensor([scale / s for s in std]).view(3, 1, 1)
        self.offset = torch.tensor([-m / s for m, s in zip(mean, std)]).view(3, 1, 1)

    def __call__(self, image: Any, rng: random.Random | None = None) -> torch.Tensor:
        if rng is None:
            rng = random.Random(int(torch.randint(0, 2**62, ())))
        if not isinstance(image, torch.Tensor):
            image = to_uint8_chw(image)
        return self.normalize(self.augment(image, rng))

    def augment(self, image: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """uint8 CHW image -> uint8 CHW crop of ``size``: RandomResizedCrop, then a flip with probability 1/2."""
        top, left, height, width = self.crop_box(image.shape[-2], image.shape[-1], rng)
        if self.interpolation in _TENSOR_INTERPOLATIONS:
            crop = v2.functional.resized_crop(image, top, left, height, width, list(self.size),
                                              interpolation=self.interpolation, antialias=True)
        else:
            pil = PILImage.fromarray(image.permute(1, 2, 0).numpy())
            crop = v2.functional.pil_to_tensor(v2.functional.resized_crop(
                pil, top, left, height, width, list(self.size), interpolation=self.interpolation))
        if self.flip and rng.random() < 0.5:
            crop = crop.flip(-1)
        return crop

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> float32 in the checkpoint's normalization."""
        return torch.addcmul(self.offset, pixels.float(), self.multiplier)

    @staticmethod
    def crop_box(height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(top, left, height, width) as torchvision's RandomResizedCrop picks it, from ``rng``."""
        area = height * width
        for _ in range(10):
            target_area = area * rng.uniform(*_CROP_SCALE)
            aspect = math.exp(rng.uniform(*_CROP_LOG_RATIO))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        ratio = width / height  # fallback: the largest centred crop with an aspect ratio in range
        if ratio < 3 / 4:
            w, h = width, int(round(width / (3 / 4)))
        elif ratio > 4 / 3:
            h, w = height, int(round(height * (4 / 3)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


def build_transforms(image_processor, augmentation: str = "crop_flip"
                     ) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
    """``(train_transform, eval_transform)``: each maps one image (any PIL mode) to a float CHW tensor.

    Train (``augmentation``): ``crop_flip``, RandomResizedCrop to the checkpoint's input size (its
    interpolation) and a horizontal flip, then its normalization; ``crop``, the same without the flip;
    ``none``, the evaluation transform itself. Eval: the checkpoint's image processor itself (resize, center crop / crop_pct,
    normalization), so evaluation sees exactly what the checkpoint was made for. Works for transformers'
    processors (ViT, ConvNeXt, DeiT, BEiT, ...) and timm checkpoints (TimmWrapperImageProcessor).
    """
    if augmentation not in TRAIN_AUGMENTATIONS:
        raise ValueError(f"--train_augmentation {augmentation!r} is not valid; choose one of {TRAIN_AUGMENTATIONS}")
    eval_transform = _ProcessorEval(image_processor)
    if augmentation == "none":
        return eval_transform, eval_transform
    geometry = _training_geometry(image_processor)
    train_transform = TrainTransform(geometry["size"], geometry["interpolation"], geometry["mean"], geometry["std"],
                                     geometry["scale"], flip=augmentation == "crop_flip")
    return train_transform, eval_transform


class _ExampleTransform:
    """Batch of raw examples -> ``{"pixel_values": [CHW tensors], "labels": [ints]}`` (for ``set_transform``);
    a split without a ``label`` column (images to predict) gives ``pixel_values`` only."""

    def __init__(self, image_transform: Callable[[Any], torch.Tensor]):
        self.image_transform = image_transform

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        values = {"pixel_values": [self.image_transform(image) for image in batch["image"]]}
        if "label" in batch:
            values["labels"] = list(batch["label"])
        return values


def apply_transforms(dataset_dict: datasets.DatasetDict, image_processor,
                     augmentation: str = "crop_flip") -> datasets.DatasetDict:
    """New DatasetDict whose examples are ``{"pixel_values": FloatTensor CHW, "labels": int}``, decoded lazily.

    ``train`` gets the training transform (``augmentation``, see :func:`build_transforms`), every other split the checkpoint's eval transform.
    The input is not modified. With the Trainer, set ``remove_unused_columns=False``: the model's
    inputs only exist after the transform.
    """
    train_transform, eval_transform = build_transforms(image_processor, augmentation)
    return datasets.DatasetDict({
        name: split.with_transform(_ExampleTransform(train_transform if name == "train" else eval_transform))
        for name, split in dataset_dict.items()
    })


def collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack transformed examples into ``{"pixel_values": (B, C, H, W) float, "labels": (B,) long}``."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([int(example["labels"]) for example in examples], dtype=torch.long),
    }


def apply_eval_transform(dataset: datasets.Dataset, image_processor) -> datasets.Dataset:
    """``dataset`` with each example as ``{"pixel_values": CHW tensor}`` (+ ``labels`` when it has a label
    column), through the checkpoint's own evaluation preprocessing."""
    return dataset.with_transform(_ExampleTransform(_ProcessorEval(image_processor)))


def collate_pixels(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack unlabeled examples (prediction): ``{"pixel_values": (B, C, H, W)}``."""
    return {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
