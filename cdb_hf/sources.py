"""Image classification sources: load any supported source into ``image``/``label`` splits.

Follows transformers' ``examples/pytorch/image-classification/run_image_classification.py``: a Hub or
local dataset (``--dataset_name``) or image folders (``--train_dir``/``--validation_dir``), a seeded
validation split carved from train when there is none, and ``max_*_samples`` truncation; also the split
an evaluation-only run evaluates on and the images ``--do_predict`` classifies. Every bad input is
reported as one ValueError/FileNotFoundError before any training work starts; corrupt images are
refused or left out by :mod:`cdb_hf.image_check`. The transforms are in :mod:`cdb_hf.transforms`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

from . import builtin
from .image_check import _drop_or_refuse_corrupt_images, _without_corrupt_images, label_ids

__all__ = ["load_eval_split", "load_image_datasets", "load_predict_images", "num_examples_per_class"]

IMAGE_COLUMN_CANDIDATES = ("image", "img", "images", "picture")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "class", "target")
VALIDATION_SPLIT_NAMES = ("validation", "valid", "val")
# File types datasets can load as a table of examples when given as --dataset_name.
_DATA_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


# ----------------------------------------------------------------------------------------------- load


def load_image_datasets(data_args, seed: int, *, cache_dir: str | None = None,
                        token: str | bool | None = None,
                        skipped_images: dict[str, int] | None = None) -> datasets.DatasetDict:
    """``train`` and ``validation`` splits with exactly an ``image`` (Image) and a ``label`` (ClassLabel) column.

    ``data_args`` is a :class:`~cdb_hf.arguments.DataArguments`. ``seed`` drives the validation split (when
    the source has none) and the ``max_*_samples`` shuffles, so the same seed gives the same examples.
    Every image the splits keep is decoded once (:mod:`cdb_hf.image_check`, cached): a corrupt one raises
    a ValueError naming it, or with ``data_args.corrupt_images == "skip"`` is dropped with a warning;
    ``skipped_images``, if given, receives ``{"train": n, "validation": n}``.
    """
    _check_arguments(data_args)
    raw = _load_source(data_args, cache_dir=cache_dir, token=token)
    source = data_args.dataset_name or data_args.train_dir

    if "train" not in raw:
        raise ValueError(f"Dataset {source!r} has no 'train' split; it has: {sorted(raw)}.")
    eval_name = _eval_split_name(raw, getattr(data_args, "eval_split_name", None), source)
    # Keyed by the source's own split names until the end, so that every message names the real split.
    splits = {"train": raw["train"]}
    if eval_name is not None:
        splits[eval_name] = raw[eval_name]
    for split_name, split in splits.items():
        if len(split) == 0:
            raise ValueError(f"The {split_name!r} split of {source!r} is empty.")

    image_column = _find_image_column(splits["train"], data_args.image_column_name, source)
    label_column = _find_label_column(splits["train"], data_args.label_column_name, source)
    splits = {name: _select_and_rename(split, image_column, label_column, name, source)
              for name, split in splits.items()}
    splits = _unify_labels(splits, source)

    if eval_name is not None:
        splits["validation"] = splits.pop(eval_name)
    else:
        splits["train"], splits["validation"] = _carve_validation(splits["train"], data_args.train_val_split, seed)
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    for name, limit in limits.items():
        if limit is not None and limit < len(splits[name]):
            splits[name] = splits[name].shuffle(seed=seed).select(range(limit))

    skipped = _drop_or_refuse_corrupt_images(splits, getattr(data_args, "corrupt_images", "error"), source)
    if skipped_images is not None:
        skipped_images.update(skipped)
    return datasets.DatasetDict(splits)


def _eval_split_name(raw: datasets.DatasetDict, requested: str | None, source: str) -> str | None:
    """The source split to evaluate on: the requested one, else a validation split, else None (carve one)."""
    if requested is None:
        return next((name for name in VALIDATION_SPLIT_NAMES if name in raw), None)
    if requested not in raw:
        raise ValueError(f"--eval_split_name {requested!r} is not a split of {source!r}; its splits: {sorted(raw)}.")
    if requested == "train":
        raise ValueError(f"--eval_split_name 'train' would evaluate on the training data of {source!r}; choose "
                         f"another of its splits {sorted(raw)}, or leave it unset to carve a validation split.")
    return requested


def _check_arguments(data_args) -> None:
    if data_args.dataset_name is None and data_args.train_dir is None and data_args.validation_dir is not None:
        raise ValueError(f"--validation_dir {data_args.validation_dir!r} needs --train_dir as well.")
    if data_args.dataset_name is None and data_args.train_dir is None:
        raise ValueError("No data given: pass --dataset_name (a Hub id, a local dataset folder, or one of "
                         f"{', '.join(builtin.list_builtin_sources('dataset'))}) or --train_dir (an image folder).")
    if data_args.dataset_name is not None and (data_args.train_dir or data_args.validation_dir):
        raise ValueError(f"Give either --dataset_name ({data_args.dataset_name!r}) or --train_dir/--validation_dir "
                         f"({data_args.train_dir!r}/{data_args.validation_dir!r}), not both.")
    eval_split_name = getattr(data_args, "eval_split_name", None)
    if eval_split_name is not None and (not isinstance(eval_split_name, str) or not eval_split_name.strip()):
        raise ValueError(f"--eval_split_name must be a split name such as 'test' (or unset), got {eval_split_name!r}.")
    split = data_args.train_val_split
    if split is None or not 0.0 < float(split) < 1.0:
        raise ValueError(f"--train_val_split must be a fraction strictly between 0 and 1, got {split!r}.")
    for flag in ("max_train_samples", "max_eval_samples"):
        value = getattr(data_args, flag)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"--{flag} must be a positive integer (or unset), got {value!r}.")


def _load_source(data_args, cache_dir: str | None, token: str | bool | None) -> datasets.DatasetDict:
    """Whatever the source is, a DatasetDict with its native splits and columns."""
    if data_args.train_dir is not None:
        return _load_image_folders(data_args.train_dir, data_args.validation_dir)
    name = data_args.dataset_name
    if builtin.is_builtin(name):
        return builtin.load_builtin_dataset(name)
    path = Path(os.path.expanduser(name))
    if path.exists():
        return _load_local_dataset(path, data_args.dataset_config_name, cache_dir)
    return _as_dataset_dict(load_hub_dataset(name, data_args.dataset_config_name, cache_dir=cache_dir, token=token))


def load_hub_dataset(name: str, config_name: str | None, *, cache_dir: str | None, token: str | bool | None,
                     streaming: bool = False):
    """``datasets.load_dataset`` of a Hub id (map-style or streamed), a name that was meant as a missing local
    path and an unreachable or unknown Hub id each reported in one line."""
    if _looks_like_local_path(name):
        raise FileNotFoundError(f"--dataset_name {name!r}: no such file or directory (and it is not a Hub id of "
                                "the form 'name' or 'owner/name').")
    try:
        return datasets.load_dataset(name, config_name, cache_dir=cache_dir, token=token, streaming=streaming)
    except (OSError, ConnectionError) as error:  # DatasetNotFoundError and OfflineModeIsEnabled included
        raise ValueError(builtin.describe_hub_failure("dataset", name, error, datasets.config.HF_HUB_OFFLINE)) from error
    except Exception as error:
        if type(error).__module__.startswith(("huggingface_hub", "requests", "httpx")):
            raise ValueError(builtin.describe_hub_failure("dataset", name, error, datasets.config.HF_HUB_OFFLINE)) \
                from error
        raise


def _looks_like_local_path(name: str) -> bool:
    # Hub ids are 'name' or 'owner/name'; anything else that does not exist was meant as a local path.
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
            or Path(name).suffix.lower() in _DATA_FILE_BUILDERS)


def _as_dataset_dict(loaded) -> datasets.DatasetDict:
    if isinstance(loaded, datasets.DatasetDict):
        return loaded
    if isinstance(loaded, datasets.Dataset):
        return datasets.DatasetDict({"train": loaded})
    raise ValueError(f"Expected a Dataset or DatasetDict, got {type(loaded).__name__} (streaming is not supported).")


def _load_local_dataset(path: Path, config_name: str | None, cache_dir: str | None) -> datasets.DatasetDict:
    """A ``save_to_disk`` folder, a folder of data files (images, parquet, csv, ...), or a single data file."""
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        try:
            return _as_dataset_dict(datasets.load_from_disk(str(path)))
        except Exception as error:  # datasets fails with IndexError/KeyError on e.g. empty or partial folders
            raise ValueError(f"Could not read the save_to_disk folder {str(path)!r}: "
                             f"{type(error).__name__}: {error}") from error
    if path.is_file():
        builder = _DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"--dataset_name {str(path)!r} is a file of an unsupported type; valid: a folder, or a "
                             f"file ending in {', '.join(_DATA_FILE_BUILDERS)}.")
        return _as_dataset_dict(datasets.load_dataset(builder, data_files=str(path), cache_dir=cache_dir))
    try:
        loaded = datasets.load_dataset(str(path), config_name, cache_dir=cache_dir)
    except (OSError, ValueError) as error:
        raise ValueError(f"Could not read a dataset from folder {str(path)!r}: {error}") from error
    return _as_dataset_dict(loaded)


def _image_files(folder: Path):
    extensions = {ext.lower() for ext in _image_extensions()}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for file in files:
            if not file.startswith(".") and os.path.splitext(file)[1].lower() in extensions:
                yield Path(root) / file


def _image_extensions() -> Sequence[str]:
    # The exact list datasets' imagefolder builder picks up, so that we verify what it will load.
    try:
        from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

        return ImageFolder.EXTENSIONS
    except (ImportError, AttributeError):
        return (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _check_is_dir(folder: str, flag: str) -> Path:
    path = Path(os.path.expanduser(folder))
    if not path.exists():
        raise FileNotFoundError(f"--{flag} {folder!r} does not exist.")
    if not path.is_dir():
        raise ValueError(f"--{flag} {folder!r} is not a directory; expected one sub-folder of images per class.")
    return path


def list_class_folders(folder: str, flag: str) -> tuple[list[str], list[pa.StringArray]]:
    """(class names, each class's image paths) of an image folder: one sub-folder per class, hidden entries
    skipped, images in nested folders (``<class>/<sub>/<image>``) in their top-level class, each class in the
    order a sort of ``Path`` objects gives (whatever order the filesystem lists them in).

    The listing is the one start-up cost of an image folder that grows with its files, so it holds no ``Path``
    per file: names as strings (``os.scandir``), one sort per class, and each class's paths an Arrow array as
    soon as they are sorted, so that Python holds the strings of one class at a time."""
    root = str(_check_is_dir(folder, flag))
    extensions = tuple({extension.lower() for extension in _image_extensions()})
    with os.scandir(root) as entries:
        classes = sorted(entry.name for entry in entries if not entry.name.startswith(".") and entry.is_dir())
    names, paths = [], []
    for name in classes:
        files, nested = [], False
        for top, dirs, found in os.walk(os.path.join(root, name)):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            nested = nested or bool(dirs)
            files.extend([f"{top}{os.sep}{file}" for file in found
                          if not file.startswith(".") and file.lower().endswith(extensions)])
        if files:
            files.sort(key=(lambda path: path.split(os.sep)) if nested else None)  # Path order: part by part
            names.append(name)
            paths.append(pa.array(files, pa.string()))
    if not names:
        loose = sorted(entry.name for entry in os.scandir(root) if entry.is_file())[:5]
        raise ValueError(f"--{flag} {folder!r} has no class sub-folders with images (extensions like .png/.jpg); "
                         f"expected e.g. {folder}/<class name>/<image>.png. Found files: {loose}.")
    return names, paths


def _load_image_folders(train_dir: str, validation_dir: str | None) -> datasets.DatasetDict:
    """Splits built from one listing of the class folders, so that listing alone decides every label.

    (datasets' ``imagefolder`` builder drops the labels when images sit at different depths.)
    """
    _check_is_dir(train_dir, "train_dir")
    if validation_dir is not None:
        _check_is_dir(validation_dir, "validation_dir")
    listed = {"train": list_class_folders(train_dir, "train_dir")}
    names = listed["train"][0]
    if validation_dir is not None:
        listed["validation"] = list_class_folders(validation_dir, "validation_dir")
        unknown = sorted(set(listed["validation"][0]) - set(names))
        if unknown:
            raise ValueError(f"--validation_dir {validation_dir!r} has classes that --train_dir {train_dir!r} lacks: "
                             f"{unknown}. Train classes: {names}.")
    return datasets.DatasetDict({split: _folder_split(names, split_names, paths, split)
                                 for split, (split_names, paths) in listed.items()})


def _folder_split(names: list[str], split_names: list[str], paths: list[pa.StringArray], split: str
                  ) -> datasets.Dataset:
    """A listed image folder as a map-style split (see :func:`folder_columns`)."""
    return datasets.Dataset.from_dict(folder_columns(names, split_names, paths), features=folder_features(names),
                                      split=split)


def folder_columns(names: list[str], split_names: list[str], paths: list[pa.StringArray]) -> dict[str, pa.Array]:
    """The ``image`` (undecoded paths, ``datasets.Image``'s storage) and ``label`` (ids over ``names``) columns of
    a listed image folder, built from the listing's Arrow arrays: no per-image string or ``{"bytes", "path"}``
    dict (~0.9 kB per image before)."""
    labels = [pa.array(np.full(len(files), names.index(name), dtype=np.int64)) for name, files in zip(split_names, paths)]
    path_column = pa.concat_arrays(paths)
    image = pa.StructArray.from_arrays([pa.nulls(len(path_column), pa.binary()), path_column], names=["bytes", "path"])
    return {"image": image, "label": pa.concat_arrays(labels)}


def folder_features(names: list[str]) -> datasets.Features:
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})


# -------------------------------------------------------------------------------------------- columns


def _find_image_column(dataset: datasets.Dataset, requested: str | None, source: str) -> str:
    return _find_column(dataset, requested, source, "image", datasets.Image, IMAGE_COLUMN_CANDIDATES)


def _find_label_column(dataset: datasets.Dataset, requested: str | None, source: str) -> str:
    return _find_column(dataset, requested, source, "label", datasets.ClassLabel, LABEL_COLUMN_CANDIDATES)


def _find_column(dataset: datasets.Dataset, requested: str | None, source: str, kind: str, feature_type: type,
                 candidates: Sequence[str]) -> str:
    """The requested column, else the first of ``feature_type``, else the first conventional name."""
    columns = list(dataset.column_names)
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"--{kind}_column_name {requested!r} is not a column of {source!r}; columns: {columns}.")
        return requested
    for name, feature in dataset.features.items():
        if isinstance(feature, feature_type):
            return name
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"Dataset {source!r} has no {kind} column (no datasets.{feature_type.__name__} feature, none "
                     f"of {list(candidates)}); columns: {columns}. Pass --{kind}_column_name.")


def _select_and_rename(split: datasets.Dataset, image_column: str, label_column: str, split_name: str,
                       source: str) -> datasets.Dataset:
    """Keep the two columns, named ``image`` and ``label``; make sure the image column decodes to PIL."""
    for column in (image_column, label_column):
        if column not in split.column_names:
            raise ValueError(f"The {split_name!r} split of {source!r} has no column {column!r} (the train split has); "
                             f"columns: {split.column_names}.")
    if image_column == label_column:
        raise ValueError(f"Image and label column are both {image_column!r} in {source!r}.")
    split = split.select_columns([image_column, label_column])
    split = split.rename_columns({image_column: "image", label_column: "label"})
    feature = split.features["image"]
    if not (isinstance(feature, datasets.Image) and feature.decode):
        try:  # file paths or {"bytes", "path"} structs become a decoding Image feature
            split = split.cast_column("image", datasets.Image())
        except Exception as error:
            raise ValueError(f"Column {image_column!r} of {source!r} holds {feature}, which is not an image "
                             "(expected a datasets.Image feature, file paths, or encoded image bytes).") from error
    return split


def _label_kind(feature) -> str:
    if isinstance(feature, datasets.ClassLabel):
        return "classlabel"
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return "string"
    if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        return "int"
    return "invalid"


def _unify_labels(splits: dict[str, datasets.Dataset], source: str) -> dict[str, datasets.Dataset]:
    """One ClassLabel shared by all splits (string/int labels become sorted class names)."""
    features = {name: split.features["label"] for name, split in splits.items()}
    kinds = {name: _label_kind(feature) for name, feature in features.items()}
    for name, kind in kinds.items():
        if kind == "invalid":
            raise ValueError(f"The label column of {source!r} ({name} split) has type {features[name]}; expected a "
                             "ClassLabel, string or integer column (single-label classification).")
    if len(set(kinds.values())) > 1:
        raise ValueError(f"The label column of {source!r} has different types per split: {features}.")

    if kinds["train"] == "classlabel":
        names = list(features["train"].names)
        for split_name, feature in features.items():
            if list(feature.names) != names:
                raise ValueError(_label_mismatch_message(source, names, list(feature.names), split_name))
        present = {}
        for split_name, split in splits.items():
            present[split_name] = label_ids(split)  # one Arrow pass: a row-by-row read took 16 s per 200k labels
            if None in present[split_name]:
                raise ValueError(f"The {split_name!r} split of {source!r} has examples without a label.")
            outside = sorted(i for i in present[split_name] if not 0 <= i < len(names))
            if outside:
                raise ValueError(f"The {split_name!r} split of {source!r} has label ids {outside} outside "
                                 f"0..{len(names) - 1}; unlabeled examples (-1) can be neither trained nor evaluated on.")
        for split_name, ids in present.items():
            never_trained = sorted(ids - present["train"])
            if never_trained:  # e.g. a class folder that exists only under validation/
                raise ValueError(f"The {split_name!r} split of {source!r} has classes the train split has no example "
                                 f"of: {[names[i] for i in never_trained]}.")
    else:
        values = {split_name: split.unique("label") for split_name, split in splits.items()}
        for split_name, unique in values.items():
            if None in unique:
                raise ValueError(f"The {split_name!r} split of {source!r} has examples without a label.")
        train_values = sorted(values["train"])
        unseen = sorted(set().union(*(set(v) for k, v in values.items() if k != "train")) - set(train_values))
        if unseen:
            raise ValueError(_label_mismatch_message(source, [str(v) for v in train_values],
                                                     [str(v) for v in train_values + unseen], "validation"))
        names = [str(value) for value in train_values]  # integers sorted as numbers, then named
        # Casts touch only the label column (a map would rewrite every image); ClassLabel casts names to ids.
        splits = {split_name: split.cast_column("label", datasets.Value("string"))
                  .cast_column("label", datasets.ClassLabel(names=names))
                  for split_name, split in splits.items()}
    if len(names) < 2:
        raise ValueError(f"Dataset {source!r} has {len(names)} class(es) ({names}); classification needs at least 2.")
    return splits


def _label_mismatch_message(source: str, train_names: list[str], other_names: list[str], split_name: str) -> str:
    only_train = sorted(set(train_names) - set(other_names))
    only_other = sorted(set(other_names) - set(train_names))
    if not only_train and not only_other:
        detail = f"the same names in a different order (train: {train_names}, {split_name}: {other_names})"
    else:
        detail = f"only in train: {only_train}; only in {split_name}: {only_other}"
    return f"Train and {split_name} labels of {source!r} differ: {detail}."


def _carve_validation(train: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Seeded validation split; stratified by label when every class has enough examples for it."""
    if len(train) < 2:
        raise ValueError(f"The train split has {len(train)} example(s); cannot carve a validation split from it.")
    try:
        parts = train.train_test_split(test_size=fraction, seed=seed, stratify_by_column="label")
    except ValueError:  # a class too small to appear on both sides: fall back to a plain seeded split
        parts = train.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]


def num_examples_per_class(dataset: datasets.Dataset) -> dict[str, int]:
    """``{class name: count}`` of a normalized split, for logs and model cards."""
    names = dataset.features["label"].names
    counts = np.bincount(dataset.with_format("arrow")["label"].to_numpy(), minlength=len(names))  # one Arrow read
    return {name: int(count) for name, count in zip(names, counts)}



# ------------------------------------------------------------------------------------ evaluate / predict only


def load_eval_split(data_args, seed: int, *, cache_dir: str | None = None,
                    token: str | bool | None = None) -> datasets.Dataset:
    """The split an evaluation-only run (``--do_train false``) evaluates on, with ``image`` and ``label`` columns.

    ``--validation_dir`` alone is one image folder (one sub-folder per class); any other source is loaded as
    for training and its ``validation`` split returned, so the same flags (and seed) evaluate on the very
    split a training run evaluated on, a carved one included.
    """
    if data_args.dataset_name is None and data_args.train_dir is None and data_args.validation_dir is not None:
        names, paths = list_class_folders(data_args.validation_dir, "validation_dir")
        split = _folder_split(names, names, paths, "validation")
        limit = data_args.max_eval_samples
        if limit is not None and limit < len(split):
            split = split.shuffle(seed=seed).select(range(limit))
        split, _ = _without_corrupt_images(split, "validation", getattr(data_args, "corrupt_images", "error"),
                                           data_args.validation_dir)
        return split
    return load_image_datasets(data_args, seed, cache_dir=cache_dir, token=token)["validation"]


def load_predict_images(data_args, *, cache_dir: str | None = None, token: str | bool | None = None
                        ) -> tuple[str, list[Any], datasets.Dataset, list[str] | None]:
    """``(key name, keys, dataset with an image column, true class names or None)`` for ``--do_predict``.

    ``--predict_dir``: every image file under the folder (flat or in sub-folders), keyed by its path relative to
    the folder (``file``); no true classes. ``--predict_split_name``: that split of ``--dataset_name``, keyed by
    ``index``; when it has a class-label column, each image's true class name (``""`` for an unlabeled example,
    e.g. the ``-1`` of a hidden test set), which ``predictions.csv`` lists beside the prediction.
    """
    if data_args.predict_dir:
        folder = _check_is_dir(data_args.predict_dir, "predict_dir")
        files = sorted(_image_files(folder))
        if not files:
            raise ValueError(f"--predict_dir {data_args.predict_dir!r} holds no image files (extensions like "
                             ".png/.jpg)")
        dataset = datasets.Dataset.from_dict({"image": [str(file) for file in files]},
                                             features=datasets.Features({"image": datasets.Image()}))
        dataset, kept = _without_corrupt_images(dataset, "predict", getattr(data_args, "corrupt_images", "error"),
                                                data_args.predict_dir)
        return "file", [files[i].relative_to(folder).as_posix() for i in kept], dataset, None
    name = data_args.predict_split_name
    raw = _load_source(data_args, cache_dir=cache_dir, token=token)
    source = data_args.dataset_name or data_args.train_dir
    if name not in raw:
        raise ValueError(f"--predict_split_name {name!r} is not a split of {source!r}; its splits: {sorted(raw)}.")
    split = raw[name]
    if len(split) == 0:
        raise ValueError(f"The {name!r} split of {source!r} is empty.")
    column = _find_image_column(split, data_args.image_column_name, source)
    class_names = _class_names(split, getattr(data_args, "label_column_name", None))
    split = split.select_columns([column]).rename_columns({column: "image"} if column != "image" else {})
    if not (isinstance(split.features["image"], datasets.Image) and split.features["image"].decode):
        split = split.cast_column("image", datasets.Image())
    split, kept = _without_corrupt_images(split, name, getattr(data_args, "corrupt_images", "error"), source)
    return "index", kept, split, [class_names[i] for i in kept] if class_names is not None else None


def _class_names(split: datasets.Dataset, requested: str | None) -> list[str] | None:
    """Each example's class name from the split's class-label column (``""`` where the id is not a class, such
    as ``-1``), or None when it has none. Reads that column alone: no image is decoded."""
    column = requested if requested in split.column_names else next(
        (name for name, feature in split.features.items() if isinstance(feature, datasets.ClassLabel)), None)
    feature = split.features.get(column) if column is not None else None
    if not isinstance(feature, datasets.ClassLabel):
        return None
    names = feature.names
    return [names[i] if isinstance(i, int) and 0 <= i < len(names) else ""
            for i in split.select_columns([column])[column]]
