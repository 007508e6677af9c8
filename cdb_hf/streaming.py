"""``--streaming``: train and evaluate on data read as it is used, without loading or checking it first.

Any source ``datasets`` can stream (a Hub id, local parquet/arrow/csv/json files, image folders, WebDataset
tar shards, a ``save_to_disk`` folder, the built-in sets) becomes a ``datasets.IterableDataset``; start-up
reads no image (image folders are listed, the only part that grows with the dataset). Per split:

* training: a seeded shuffle (shards in a seeded order, read one at a time through a buffer of
  ``--shuffle_buffer_size`` examples), the rank's own part of it (``split_dataset_by_node``),
  repeated endlessly with a new shuffle per pass (``set_epoch``); the run's length is ``--max_steps``. Each
  image is decoded when it is read, and its augmentation is a pure function of (seed, rank, stream position);
* evaluation: read in order by every process (accelerate gives each process its part of every batch);
* a corrupt image is met when it is read: ``--corrupt_images error`` stops with its name, ``skip`` leaves it
  out with a warning naming it, and the results count it.

A resumed run re-reads the stream up to the checkpoint's position without decoding (its images are not
decoded again, but their bytes are read again), so it continues exactly where the interrupted run was.
Reading happens in the main process of each rank (``--dataloader_num_workers 0``): stream positions, and so
resumption, stay exact.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.distributed import split_dataset_by_node
from datasets.table import InMemoryTable
from PIL import Image as PILImage

from . import builtin, sources
from .errors import UsageError
from .run_dir import write_json_atomic

__all__ = ["STREAM_STATE_FILE", "StreamEvalImages", "StreamSplits", "StreamTrainImages", "check_streaming_arguments",
           "open_streams", "read_stream_state", "unshard", "write_stream_state"]

logger = logging.getLogger(__name__)

#: Per-rank stream position in a checkpoint folder (``{rank}`` is the process index).
STREAM_STATE_FILE = "cdb_hf_stream_rank{rank}.json"
# The order in which a training stream reads its shards; a position means something only in the order that wrote
# it. 1: the shuffle filled its buffer from several shards at once (datasets 5's default, until 2026-12); 2: one
# shard at a time (``_shuffled``).
STREAM_ORDER = 2


# ------------------------------------------------------------------------------------------- refusals
def check_streaming_arguments(data_args, run_args, training_args, cdb_args=None) -> None:
    """Refuse, before any work, every setting a stream cannot honour (ValueError naming the flag)."""
    if not getattr(data_args, "streaming", False):
        return
    if (cdb_args is not None and getattr(cdb_args, "cdb", False) and getattr(cdb_args, "cdb_schedule", "") != "constant"
            and getattr(cdb_args, "cdb_schedule_unit", "steps") == "epochs"
            and getattr(cdb_args, "cdb_schedule_steps_per_epoch", None) is None):
        raise ValueError("--cdb_schedule_unit epochs with --streaming needs --cdb_schedule_steps_per_epoch N (a "
                         "stream has no epochs of known length), or --cdb_schedule_unit steps")
    buffer = data_args.shuffle_buffer_size
    if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
        raise ValueError(f"--shuffle_buffer_size must be a positive number of examples, got {buffer!r}")
    if not training_args.do_train:
        raise ValueError("--streaming applies to training runs; --do_train false evaluates a saved model on "
                         "map-style data: drop --streaming")
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise ValueError(f"--streaming needs --max_steps: a stream has no known length, so --num_train_epochs "
                         f"{training_args.num_train_epochs} cannot be turned into steps; give --max_steps N")
    for name in ("logging", "eval", "save"):
        strategy = str(getattr(getattr(training_args, f"{name}_strategy"), "value",
                               getattr(training_args, f"{name}_strategy")))
        if strategy == "epoch":
            raise ValueError(f"--{name}_strategy epoch cannot be used with --streaming (a stream has no epochs "
                             f"of known length); use --{name}_strategy steps with --{name}_steps N")
    if getattr(run_args, "lr_schedule", "trainer") == "multistep":
        raise ValueError("--lr_schedule multistep counts epochs, which a stream does not have; use --lr_schedule "
                         "trainer (--lr_scheduler_type) with --streaming")
    if training_args.dataloader_num_workers:
        raise ValueError(f"--dataloader_num_workers {training_args.dataloader_num_workers} with --streaming: "
                         "streams are read in each rank's main process so that positions (and resumption) stay "
                         "exact; use --dataloader_num_workers 0")
    if data_args.max_train_samples is not None:
        raise ValueError(f"--max_train_samples {data_args.max_train_samples} cannot hold with --streaming: a "
                         "seeded sample of a stream needs the whole stream; bound the run with --max_steps instead")
    if data_args.train_dir is not None and data_args.validation_dir is None and data_args.dataset_name is None:
        raise ValueError(f"--streaming with --train_dir {data_args.train_dir!r} needs --validation_dir: a stream "
                         "cannot be carved into a validation split (--train_val_split)")
    if getattr(data_args, "predict_split_name", None):
        raise ValueError("--predict_split_name with --streaming is not supported; predict a folder with "
                         "--predict_dir, or run --do_predict without --streaming")


# ------------------------------------------------------------------------------------------- sources
@dataclass
class StreamSplits:
    """The two streams of a run, with exactly ``image`` (undecoded) and ``label`` columns, and the class names."""

    train: datasets.IterableDataset
    validation: datasets.IterableDataset
    labels: list[str]
    source: str


def open_streams(data_args, seed: int, *, cache_dir: str | None = None,
                 token: str | bool | None = None) -> StreamSplits:
    """Open the source as streams: nothing is decoded and no image is read (one example at most, for the columns).

    Raises ValueError/FileNotFoundError for a source that cannot stream, a Hub id that cannot be reached, no
    validation split (a stream cannot be carved), or a label column without class names.
    """
    sources._check_arguments(data_args)  # the map-style path's own checks of the same flags
    raw = _open_source(data_args, seed, cache_dir, token)
    source = data_args.dataset_name or data_args.train_dir
    if "train" not in raw:
        raise ValueError(f"Dataset {source!r} has no 'train' split; it has: {sorted(raw)}.")
    eval_name = data_args.eval_split_name
    if eval_name is None:
        eval_name = next((name for name in sources.VALIDATION_SPLIT_NAMES if name in raw), None)
        if eval_name is None:
            raise ValueError(f"{source!r} has no validation split (its splits: {sorted(raw)}) and a stream cannot "
                             "be carved into one (--train_val_split): pass --eval_split_name, or drop --streaming")
    elif eval_name not in raw or eval_name == "train":
        raise ValueError(f"--eval_split_name {eval_name!r} is not a split of {source!r} other than train; its "
                         f"splits: {sorted(raw)}.")
    train = _resolved(raw["train"])
    image_column = sources._find_image_column(train, data_args.image_column_name, source)
    label_column = sources._find_column(train, data_args.label_column_name, source, "label", datasets.ClassLabel,
                                            (*sources.LABEL_COLUMN_CANDIDATES, "cls"))  # "cls": WebDataset
    splits = {}
    for name, split in (("train", train), ("validation", _resolved(raw[eval_name]))):
        missing = [c for c in (image_column, label_column) if c not in split.column_names]
        if missing:
            raise ValueError(f"The {eval_name if name == 'validation' else name!r} split of {source!r} has no "
                             f"column(s) {missing}; columns: {split.column_names}.")
        split = split.select_columns([image_column, label_column])
        if image_column != "image" or label_column != "label":
            split = split.rename_columns({c: n for c, n in ((image_column, "image"), (label_column, "label"))
                                          if c != n})
        splits[name] = split
    labels, splits = _class_names(splits, source, getattr(data_args, "class_names", None))
    splits = {name: split.cast_column("image", datasets.Image(decode=False)) for name, split in splits.items()}
    limit = data_args.max_eval_samples
    if limit is not None:
        splits["validation"] = splits["validation"].take(limit)  # the first N of the stream, in its order
    return StreamSplits(train=splits["train"], validation=splits["validation"], labels=labels, source=source)


def _open_source(data_args, seed: int, cache_dir: str | None, token) -> dict[str, datasets.IterableDataset]:
    if data_args.train_dir is not None:
        return {"train": _folder_stream(data_args.train_dir, "train_dir", seed),
                "validation": _folder_stream(data_args.validation_dir, "validation_dir", None)}
    name = data_args.dataset_name
    if builtin.is_builtin(name):
        return {split_name: _sharded_stream(split) for split_name, split in builtin.load_builtin_dataset(name).items()}
    path = Path(os.path.expanduser(name))
    if path.exists():
        return _local_streams(path, data_args.dataset_config_name, cache_dir)
    loaded = sources.load_hub_dataset(name, data_args.dataset_config_name, cache_dir=cache_dir, token=token,
                                      streaming=True)
    return _as_streams(loaded, name)


def _local_streams(path: Path, config_name: str | None, cache_dir: str | None) -> dict[str, datasets.IterableDataset]:
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        loaded = loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
        return {name: _sharded_stream(split) for name, split in loaded.items()}
    if path.is_file():
        builder = sources._DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"--dataset_name {str(path)!r} cannot stream: valid files end in "
                             f"{', '.join(sources._DATA_FILE_BUILDERS)}; or give a folder of data files")
        loaded = datasets.load_dataset(builder, data_files=str(path), cache_dir=cache_dir, streaming=True)
    else:
        try:
            loaded = datasets.load_dataset(str(path), config_name, cache_dir=cache_dir, streaming=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"Could not stream a dataset from folder {str(path)!r}: {error}") from error
    return _as_streams(loaded, str(path))


def _as_streams(loaded, source: str) -> dict[str, datasets.IterableDataset]:
    if isinstance(loaded, datasets.IterableDatasetDict):
        return dict(loaded)
    if isinstance(loaded, datasets.IterableDataset):
        return {"train": loaded}
    raise ValueError(f"{source!r} cannot stream: datasets returned a {type(loaded).__name__}")


def _folder_stream(folder: str, flag: str, seed: int | None) -> datasets.IterableDataset:
    """An image folder as a stream of (path, label): listing the files reads no image. With ``seed``, the files are
    put in a seeded order first: the stream's shards are contiguous runs of the list, and a list sorted by class
    would give shards of few classes, which no shuffle buffer smaller than a class could mix.

    The listing is the only start-up cost that grows with the number of files, so it is kept to what the order
    needs: file names as strings (``os.scandir``), one sort per class folder, and one Arrow table built in one go
    (no per-file ``Path`` or feature encoding). The order is the one a sort of ``Path`` objects gives, whatever
    order the filesystem lists them in."""
    names, paths = sources.list_class_folders(folder, flag)
    table = pa.table(sources.folder_columns(names, names, paths))
    del paths
    if seed is not None:
        table = table.take(np.random.default_rng(seed).permutation(table.num_rows))
    pa.default_memory_pool().release_unused()  # the intermediate copies (measured: 30 of 50 MiB at 200k files)
    features = sources.folder_features(names)
    # A fingerprint of the listing, so that datasets does not hash the whole table (time and a copy's memory).
    fingerprint = hashlib.sha256(json.dumps([folder, seed, names, table.num_rows]).encode()).hexdigest()[:16]
    return _sharded_stream(datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features),
                                            fingerprint=fingerprint))


def _sharded_stream(split: datasets.Dataset) -> datasets.IterableDataset:
    """A map-style split as a stream of up to 64 shards, so that ranks (and shuffles) have shards to split."""
    return split.to_iterable_dataset(num_shards=max(1, min(len(split), 64)))


def _resolved(split: datasets.IterableDataset) -> datasets.IterableDataset:
    # Some builders (WebDataset) only know their columns after reading one example.
    return split if split.features is not None else split._resolve_features()


def _class_names(splits: dict[str, datasets.IterableDataset], source: str, class_names: list[str] | None
                 ) -> tuple[list[str], dict[str, datasets.IterableDataset]]:
    """The class names, from the label column's ClassLabel or ``--class_names`` for integer labels (a stream's
    labels cannot be collected up front); the splits with a ClassLabel column."""
    train = splits["train"].features["label"]
    if class_names is not None:
        if len(class_names) < 2 or len(set(class_names)) != len(class_names):
            raise ValueError(f"--class_names must name at least 2 distinct classes, got {class_names!r}")
        if not (isinstance(train, datasets.Value) and train.dtype.startswith(("int", "uint"))):
            raise ValueError(f"--class_names names integer labels; the label column of {source!r} is {train}")
        feature = datasets.ClassLabel(names=list(class_names))
        splits = {name: split.cast_column("label", feature) for name, split in splits.items()}
        train = feature
    if not isinstance(train, datasets.ClassLabel):
        raise ValueError(f"With --streaming the label column of {source!r} must be a ClassLabel (class names known "
                         f"without reading the stream); it is {train}. Pass --class_names for integer labels, drop "
                         "--streaming, or store the labels as a ClassLabel (parquet written by datasets, image folders)")
    other = splits["validation"].features["label"]
    if not isinstance(other, datasets.ClassLabel) or list(other.names) != list(train.names):
        raise ValueError(f"The validation labels of {source!r} ({other}) differ from the train labels "
                         f"({list(train.names)}).")
    if len(train.names) < 2:
        raise ValueError(f"Dataset {source!r} has {len(train.names)} class(es); classification needs at least 2.")
    return list(train.names), splits


# ------------------------------------------------------------------------------------------- reading
_DECODER = datasets.Image()


class _Reader:
    """Decode one undecoded ``{"bytes", "path"}`` image; corrupt ones raise or are counted under the policy."""

    def __init__(self, mode: str, source: str, split_name: str, skipped: dict[str, int] | None) -> None:
        self.mode, self.source, self.split_name = mode, source, split_name
        self.skipped = skipped if skipped is not None else {}
        self.names: set[str] = set()

    def decode(self, value: Any, position: int) -> PILImage.Image | None:
        name = (value or {}).get("path") or f"{self.split_name} example {position}"
        try:
            if value is None or (value.get("bytes") is None and not value.get("path")):
                raise ValueError("no image")
            image = _DECODER.decode_example(value)  # bytes, local or remote paths, as datasets decodes them
            image.load()
            return image
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            if self.mode != "skip":
                raise UsageError(f"{name} in {self.source!r} is not a readable image ({reason}); remove or replace "
                                 "it, or pass --corrupt_images skip to go on without it") from error
            if name not in self.names:  # a stream read round again meets the same file again: named, counted once
                self.names.add(name)
                self.skipped[self.split_name] = len(self.names)
                logger.warning(f"--corrupt_images skip: leaving out {name} of {self.source!r} ({reason})")
            return None


def _shuffled(stream: datasets.IterableDataset, seed: int, buffer_size: int) -> datasets.IterableDataset:
    """The seeded shuffle of a stream, reading one shard at a time (in a seeded shard order) into the buffer.

    Since ``datasets`` 5.0 (huggingface/datasets#8194) the buffer is filled from up to 10 shards at once by default
    (``max_buffer_input_shards``), and datasets reads each open parquet shard through pyarrow's threaded fragment
    scanner, which reads far ahead (pyarrow 26: the whole file, ``batch_readahead=0`` notwithstanding). Memory
    then grew with min(shards, 10) x the shard size, i.e. with the dataset (measured: 16 parquet shards of 37 MB,
    10 held at once, +600 to 900 MiB). One shard at a time, as ``datasets`` 4 read, holds one shard and the
    buffer, whatever the number of shards."""
    if "max_buffer_input_shards" in inspect.signature(stream.shuffle).parameters:
        return stream.shuffle(seed=seed, buffer_size=buffer_size, max_buffer_input_shards=1)
    return stream.shuffle(seed=seed, buffer_size=buffer_size)


class StreamTrainImages(torch.utils.data.IterableDataset):
    """This rank's endless training stream as ``{"pixel_values", "labels"}`` examples.

    Pass ``e`` of the stream is shuffled with ``set_epoch(e)`` of the seeded shuffle; the examples of a rank are
    numbered from 0 across passes (its raw stream position), and each augmentation draws from
    ``random.Random(f"{seed}:stream:{rank}:{position}")`` only. :meth:`position_after` maps a number of yielded
    examples to the raw position, so that a checkpoint can name where the stream stands, and
    :meth:`resume_at` makes the next iteration start there (reading, not decoding, what comes before).
    """

    def __init__(self, stream: datasets.IterableDataset, transform, seed: int, *, buffer_size: int, rank: int,
                 world_size: int, corrupt_images: str, source: str, skipped: dict[str, int] | None = None) -> None:
        super().__init__()
        self.stream = split_dataset_by_node(_shuffled(stream, seed, buffer_size), rank, world_size)
        self.transform, self.seed, self.rank = transform, seed, rank
        self.reader = _Reader(corrupt_images, source, "train", skipped)
        #: raw positions this rank left out as corrupt, in order (for position_after)
        self.skipped_positions: list[int] = []
        self.start = 0
        self.num_labels = stream.features["label"].num_classes

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the stream counts its own passes (the trainers' epochs are not the stream's)."""

    def resume_at(self, raw_position: int, skipped_positions: list[int]) -> None:
        self.start, self.skipped_positions = int(raw_position), [int(p) for p in skipped_positions]

    def position_after(self, yielded: int) -> tuple[int, list[int]]:
        """(raw position after ``yielded`` examples were used, the corrupt positions before it)."""
        position = yielded
        before = []
        for skipped in sorted(self.skipped_positions):
            if skipped < position:
                position += 1
                before.append(skipped)
        return position, before

    def _raw(self) -> Iterator[tuple[int, dict]]:
        position, epoch = 0, 0
        while True:
            self.stream.set_epoch(epoch)
            empty = True
            for example in self.stream:
                empty = False
                yield position, example
                position += 1
            if empty:
                raise ValueError(f"the training stream of {self.reader.source!r} is empty on process {self.rank}")
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from .transforms import TrainTransform, to_uint8_chw

        for position, example in self._raw():
            if position < self.start:
                continue  # read again, not decoded: the resumed run starts where the saved one stood
            image = self.reader.decode(example["image"], position)
            if image is None:
                if position not in self.skipped_positions:
                    self.skipped_positions.append(position)
                continue
            label = _checked_label(example["label"], self.num_labels, self.reader, position)
            pixels = to_uint8_chw(image)
            if isinstance(self.transform, TrainTransform):
                values = self.transform(pixels, random.Random(f"{self.seed}:stream:{self.rank}:{position}"))
            else:
                values = self.transform(PILImage.fromarray(pixels.permute(1, 2, 0).numpy()))
            yield {"pixel_values": values, "labels": label}


class StreamEvalImages(torch.utils.data.IterableDataset):
    """The evaluation stream, in order, through the checkpoint's own evaluation preprocessing."""

    def __init__(self, stream: datasets.IterableDataset, transform, *, corrupt_images: str, source: str,
                 skipped: dict[str, int] | None = None) -> None:
        super().__init__()
        self.stream, self.transform = stream, transform
        self.num_labels = stream.features["label"].num_classes
        self.reader = _Reader(corrupt_images, source, "validation", skipped)
        #: examples yielded by the current (or last) pass: what a process's padded last batch goes beyond
        self.examples_read = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.reader.names.clear()  # counted per pass: each evaluation reads the same stream
        self.reader.skipped.pop("validation", None)
        self.examples_read = 0
        for position, example in enumerate(self.stream):
            image = self.reader.decode(example["image"], position)
            if image is not None:
                label = _checked_label(example["label"], self.num_labels, self.reader, position)
                self.examples_read += 1
                yield {"pixel_values": self.transform(image), "labels": label}


def _checked_label(label: Any, num_labels: int, reader: _Reader, position: int) -> int:
    if label is None or not 0 <= int(label) < num_labels:
        raise UsageError(f"{reader.split_name} example {position} of {reader.source!r} has label {label!r}, outside "
                         f"0..{num_labels - 1} (the classes); unlabeled examples can be neither trained nor evaluated on")
    return int(label)


def unshard(dataloader) -> Any:
    """Undo accelerate's per-process slicing of a prepared loader over a :class:`StreamTrainImages`.

    Each rank's stream already is its own part (``split_dataset_by_node``); accelerate would otherwise keep
    only 1/N of it. The same neutralisation transformers applies to its own rank-aware samplers.
    """
    from accelerate.data_loader import IterableDatasetShard

    shard = getattr(dataloader, "dataset", None)
    if isinstance(shard, IterableDatasetShard) and isinstance(shard.dataset, StreamTrainImages):
        shard.num_processes, shard.process_index = 1, 0
    return dataloader


# ------------------------------------------------------------------------------------------- checkpoints
def write_stream_state(checkpoint: str | os.PathLike, dataset: StreamTrainImages, yielded: int, rank: int) -> None:
    """Record where this rank's stream stands after ``yielded`` examples (written atomically)."""
    position, skipped = dataset.position_after(yielded)
    path = Path(checkpoint) / STREAM_STATE_FILE.format(rank=rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"yielded": int(yielded), "raw_position": position, "skipped_positions": skipped,
                             "order": STREAM_ORDER})


def read_stream_state(checkpoint: str | os.PathLike, rank: int) -> dict[str, Any]:
    """The stream state a rank saved in ``checkpoint``; a checkpoint without one cannot resume a stream."""
    path = Path(checkpoint) / STREAM_STATE_FILE.format(rank=rank)
    try:
        state = json.loads(path.read_text())
        resumed = {"raw_position": int(state["raw_position"]),
                   "skipped_positions": [int(p) for p in state.get("skipped_positions", [])]}
        order = int(state.get("order", 1))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--resume_from_checkpoint {str(checkpoint)!r} holds no usable stream position for "
                         f"process {rank} ({path.name}: {type(error).__name__}); it was not written by a --streaming "
                         "run with this number of processes. Resume without --streaming, or start afresh") from error
    if order != STREAM_ORDER:
        logger.warning(f"{path.name} in {str(checkpoint)!r} was written by a cdb_hf that read the stream's shards in "
                       f"another order (order {order}; this one: {STREAM_ORDER}): the run goes on from the same "
                       f"position ({resumed['raw_position']} examples read) in today's order, so it will not end with "
                       "the weights the interrupted run would have reached.")
    return resumed
