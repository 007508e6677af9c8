"""Shared pytest fixtures: tiny checkpoints and a generated image folder, all offline and fast.

The environment is made hermetic at import time (before any Hugging Face library is imported): no
network, and a throw-away HF_HOME, so that a checkpoint the developer happens to have cached can
neither make an "offline" test pass nor be touched by the tests.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="cdb_hf_tests_hf_home_")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HOME": _HF_HOME,
    "TOKENIZERS_PARALLELISM": "false",
    # Tiny tensors run fastest on one thread, and OpenMP spin-waits badly when processes share 2 cores;
    # subprocesses (torchrun ranks, the fresh-process checks) inherit it.
    "OMP_NUM_THREADS": "1",
})
for _variable in ("HF_DATASETS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_MODULES_CACHE",
                  "TRANSFORMERS_CACHE", "HF_TOKEN"):
    os.environ.pop(_variable, None)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

# Class name -> RGB colour. Their grayscale luminances also differ, so even the "L" images stay learnable.
IMAGE_FOLDER_CLASSES = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}
# Per class: the modes of the train images (RGB, palette, RGBA, grayscale) and of the validation images.
IMAGE_FOLDER_TRAIN_MODES = ("RGB", "RGB", "P", "RGBA", "L")
IMAGE_FOLDER_VALIDATION_MODES = ("RGB", "RGB")
IMAGE_SIZE = 32
TINY_LABELS = sorted(IMAGE_FOLDER_CLASSES)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread for the whole suite (see OMP_NUM_THREADS above)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def builtin_cache(tmp_path_factory):
    """Built-in checkpoints are exported once per test session into a temp dir (never the user's cache)."""
    path = tmp_path_factory.mktemp("cdb_hf_cache")
    previous = os.environ.get("CDB_HF_CACHE")
    os.environ["CDB_HF_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("CDB_HF_CACHE", None)
    else:
        os.environ["CDB_HF_CACHE"] = previous


def make_image(colour: tuple[int, int, int], mode: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """A noisy image of ``colour`` in PIL ``mode`` ("RGB", "P", "RGBA", "L")."""
    pixels = np.clip(np.array(colour, dtype=np.float64) + rng.normal(0.0, 12.0, (size, size, 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    if mode == "P":
        return image.quantize(colors=16)
    if mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(200)
        return image
    return image.convert(mode)


def write_image_folder(root, classes=IMAGE_FOLDER_CLASSES, train_modes=IMAGE_FOLDER_TRAIN_MODES,
                       validation_modes=IMAGE_FOLDER_VALIDATION_MODES, seed: int = 0):
    """``root/train/<class>/*.png`` and ``root/validation/<class>/*.png``; returns ``root``."""
    rng = np.random.default_rng(seed)
    for split, modes in (("train", train_modes), ("validation", validation_modes)):
        for name, colour in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index, mode in enumerate(modes):
                make_image(colour, mode, rng).save(folder / f"{name}_{index}_{mode}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Generated imagefolder: ``train/`` (5 per class: RGB, RGB, P, RGBA, L) and ``validation/`` (2 RGB per
    class), 3 colour classes (blue, green, red), 32x32 PNGs. Treat as read-only."""
    return write_image_folder(tmp_path_factory.mktemp("image_folder"))


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    """A tiny ViTForImageClassification (hidden 32, 2 layers, 32 px, patch 8, labels blue/green/red) +
    ViTImageProcessor (32x32, mean = std = 0.5), written by save_pretrained."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = tmp_path_factory.mktemp("tiny_vit")
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=IMAGE_SIZE, patch_size=8, id2label=dict(enumerate(TINY_LABELS)),
                       label2id={label: i for i, label in enumerate(TINY_LABELS)})
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_convnext_dir(tmp_path_factory):
    """A tiny ConvNextForImageClassification (hidden_sizes [8, 16], depths [1, 1], 3 labels) +
    ConvNextImageProcessor (shortest_edge 32, crop_pct 0.875), written by save_pretrained."""
    from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessor

    path = tmp_path_factory.mktemp("tiny_convnext")
    config = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=IMAGE_SIZE,
                            id2label=dict(enumerate(TINY_LABELS)),
                            label2id={label: i for i, label in enumerate(TINY_LABELS)})
    ConvNextForImageClassification(config).save_pretrained(path)
    ConvNextImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_pct=0.875).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_timm_dir(tmp_path_factory):
    """timm's ``test_resnet`` (3 classes) saved with ``save_for_hf`` in the layout of a ``timm/...`` Hub repo,
    preprocessing 32 px. Its config keeps ``model_args.num_classes`` as timm writes it (the transformers
    5.24 trap that cdb_hf.models must handle). Loads with AutoModelForImageClassification (TimmWrapper)."""
    import timm
    from timm.models._hub import save_for_hf

    path = tmp_path_factory.mktemp("tiny_timm")
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    save_for_hf(model, str(path), safe_serialization=True,
                data_config={"input_size": (3, IMAGE_SIZE, IMAGE_SIZE), "crop_pct": 0.875})
    config = json.loads((path / "config.json").read_text())
    assert config.get("model_args", {}).get("num_classes") == 3, "fixture no longer reproduces the timm trap"
    return path


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory, tiny_vit_dir, image_folder):
    """Per path: a complete 6-step CDB run with checkpoints every 2 steps (the uninterrupted reference of the
    resume and preemption tests), made once per test module."""
    from test_cli import run_quietly
    from test_safety import PATHS, argv_for

    runs = {}
    for trainer in PATHS:
        output_dir = tmp_path_factory.mktemp(f"straight_{trainer}") / "out"
        code, printed = run_quietly(argv_for(trainer, tiny_vit_dir, image_folder, output_dir, "--max_steps", "6"))
        assert code == 0, printed
        runs[trainer] = output_dir
    return runs
