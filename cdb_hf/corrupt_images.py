"""What to do with images that do not decode: refuse the run (``--corrupt_images error``) or leave them out (``skip``).

:mod:`cdb_hf.image_check` decides whether one image decodes (and caches the verdict); this module applies
that check to every image of a ``datasets`` split, whatever holds the image (a file path or bytes in the
dataset), and turns the corrupt ones into one clear error or one warning before any training work starts.
"""

from __future__ import annotations

import logging

import datasets
import pyarrow as pa

from . import image_check

__all__ = ["CORRUPT_IMAGE_MODES", "find_corrupt_images"]

logger = logging.getLogger(__name__)

#: ``--corrupt_images`` values: refuse a run with corrupt images, or train without them.
CORRUPT_IMAGE_MODES = ("error", "skip")
# Decoded (or, when cached, only located) this many examples at a time, to bound the memory of image bytes.
_CHECK_BATCH = 1024
# Listing every bad file of a huge folder helps nobody; the count says how many more there are.
_MAX_LISTED_BAD_FILES = 5
# The skip warning names this many files, then gives the count of the rest.
_MAX_WARNED_BAD_FILES = 20


def find_corrupt_images(split: datasets.Dataset, split_name: str = "train") -> dict[int, tuple[str, str]]:
    """``{example index: (file or example name, reason)}`` for the images of ``split`` that do not decode fully.

    Image files (image folders, local imagefolders, path columns) go through
    :func:`cdb_hf.image_check.check_files`, cached per file; images stored as bytes in the dataset (Hub and
    arrow datasets, the built-in ones) are decoded too, their verdicts cached by the split's fingerprint.
    """
    raw = split.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
    cached = image_check.load_split_result(split._fingerprint)
    bad: dict[int, tuple[str, str]] = {}
    paths: dict[int, str] = {}
    has_bytes = False
    start = 0
    for batch in raw.with_format("arrow").iter(batch_size=_CHECK_BATCH):
        column = batch.column("image")
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        present = column.is_valid().to_pylist()
        byte_values, path_values = column.field("bytes"), column.field("path").to_pylist()
        has_value = byte_values.is_valid().to_pylist()
        pending = []
        for offset, (is_present, stored, path) in enumerate(zip(present, has_value, path_values)):
            index = start + offset
            if not is_present or (not stored and not path):
                bad[index] = (f"{split_name} example {index}", "no image")
            elif stored:
                has_bytes = True
                if cached is None:
                    pending.append((index, offset, path))
            else:
                paths[index] = path
        if pending:
            verdicts = image_check.check_bytes([byte_values[offset].as_py() for _, offset, _ in pending])
            for (index, _, path), reason in zip(pending, verdicts):
                if reason is not None:
                    bad[index] = (path or f"{split_name} example {index}", reason)
        start += len(column)
    if has_bytes and cached is not None:
        for index, reason in cached.items():  # the few bad ones: their stored names
            bad[index] = (raw[index]["image"]["path"] or f"{split_name} example {index}", reason)
    elif has_bytes:
        image_check.store_split_result(split._fingerprint, {i: reason for i, (_, reason) in bad.items()
                                                            if i not in paths})
    by_path = image_check.check_files(paths.values())
    bad.update({index: (path, by_path[path]) for index, path in paths.items() if path in by_path})
    return dict(sorted(bad.items()))


def _refuse_or_warn(listed: list[str], mode: str, source: str) -> None:
    """``error``: raise one ValueError naming the first corrupt files; ``skip``: one warning naming them."""
    if mode == "error":
        more = f" and {len(listed) - _MAX_LISTED_BAD_FILES} more" if len(listed) > _MAX_LISTED_BAD_FILES else ""
        raise ValueError(f"{len(listed)} file(s) in {source!r} are not readable images: "
                         f"{'; '.join(listed[:_MAX_LISTED_BAD_FILES])}{more}. Remove or replace them, or pass "
                         "--corrupt_images skip to go on without them.")
    more = f" and {len(listed) - _MAX_WARNED_BAD_FILES} more" if len(listed) > _MAX_WARNED_BAD_FILES else ""
    logger.warning(f"--corrupt_images skip: leaving out {len(listed)} image(s) of {source!r} that do not decode: "
                   f"{'; '.join(listed[:_MAX_WARNED_BAD_FILES])}{more}")


def _without_corrupt_images(split: datasets.Dataset, split_name: str, mode: str, source: str
                            ) -> tuple[datasets.Dataset, list[int]]:
    """``split`` checked like the training splits (evaluate-only, predict): refused, or without its corrupt
    images; also the kept example indices (the rows of ``predictions.csv``)."""
    bad = find_corrupt_images(split, split_name)
    kept = [i for i in range(len(split)) if i not in bad]
    if bad:
        _refuse_or_warn([f"{file} ({reason})" for file, reason in bad.values()], mode, source)
        if not kept:
            raise ValueError(f"every image of {source!r} is corrupt ({len(bad)}); nothing is left with "
                             "--corrupt_images skip.")
        split = split.select(kept)
    return split, kept


def _drop_or_refuse_corrupt_images(splits: dict[str, datasets.Dataset], mode: str, source: str) -> dict[str, int]:
    """Refuse (``error``) or drop (``skip``) the corrupt images of every split; return the counts dropped."""
    if mode not in CORRUPT_IMAGE_MODES:
        raise ValueError(f"--corrupt_images {mode!r} is not valid; choose one of {', '.join(CORRUPT_IMAGE_MODES)}")
    found = {name: find_corrupt_images(split, name) for name, split in splits.items()}
    # A file both splits use is named once.
    listed = list(dict.fromkeys(f"{file} ({reason})" for bad in found.values() for file, reason in bad.values()))
    if not listed:
        return {name: 0 for name in splits}
    _refuse_or_warn(listed, mode, source)
    names = splits["train"].features["label"].names
    for name, bad in found.items():
        if not bad:
            continue
        before = set(splits[name].unique("label"))
        kept = splits[name].select([i for i in range(len(splits[name])) if i not in bad])
        if len(kept) == 0:
            raise ValueError(f"every image of the {name!r} split of {source!r} is corrupt ({len(bad)}); nothing is left "
                             "to train or evaluate on with --corrupt_images skip.")
        emptied = sorted(before - set(kept.unique("label")))
        if emptied:
            raise ValueError(f"leaving out the corrupt images of the {name!r} split of {source!r} leaves class(es) "
                             f"{[names[i] for i in emptied]} without any image; replace those images.")
        splits[name] = kept
    return {name: len(found.get(name, {})) for name in splits}
