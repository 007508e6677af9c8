"""Find corrupt images before training: a full decode of every image, cached so that a re-run costs only stats.

``PIL.Image.verify`` reads headers (and PNG checksums) but never decodes JPEG data, so a truncated JPEG
passes it and crashes the run hours later, in a dataloader worker. Here each image is opened *and*
loaded, with ``ImageFile.LOAD_TRUNCATED_IMAGES`` off, in a thread pool (Pillow releases the GIL while it
decodes). Results of image files are kept in a sqlite file, ``$CDB_HF_CACHE/image_checks-v1.sqlite``
(``~/.cache/cdb_hf`` by default), keyed by (absolute path, size, mtime_ns, Pillow version): a second run
over the same folder, or the other ranks of a distributed run, decode nothing. Results of images stored
inside a dataset (bytes in arrow files) are kept by the dataset's fingerprint. A cache that cannot be
opened or written never fails a run: it is skipped, with a debug line.

``python -m cdb_hf.image_check FOLDER ...`` checks (and caches) every image file under the folders ahead
of a run, e.g. once on one process before a distributed run over a large folder.

On a ``datasets`` split, :func:`find_corrupt_images` checks every image, whatever holds it (a file path or
bytes in the dataset), and ``--corrupt_images`` (:data:`CORRUPT_IMAGE_MODES`) decides what a run does with
the corrupt ones: refuse to start with one error naming them (``error``), or leave them out with one
warning (``skip``).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import PIL
import pyarrow.compute as pc
from PIL import Image, ImageFile

__all__ = ["CACHE_ENV", "CACHE_FILE", "CORRUPT_IMAGE_MODES", "check_bytes", "check_files", "default_threads",
           "decode_error", "find_corrupt_images", "label_ids", "load_split_result", "store_split_result"]

logger = logging.getLogger(__name__)

CACHE_ENV = "CDB_HF_CACHE"
#: Bump the version when what a check means changes, so that older verdicts are never reused.
CACHE_FILE = "image_checks-v1.sqlite"
# SQLite's default bound on the parameters of one statement is 999 (older builds) or 32766.
_QUERY_CHUNK = 500
# Files are checked (stat, cache lookup, decode, cache write) this many at a time, so memory stays bounded.
_FILE_CHUNK = 4096
# Images handed to the decoding threads at a time, per thread.
_DECODE_SLICE = 64
# Only one check flips the process-wide LOAD_TRUNCATED_IMAGES switch at a time.
_SWITCH_LOCK = threading.Lock()


def default_threads() -> int:
    """The CPUs this process may run on (its affinity mask, which a job scheduler sets), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def decode_error(source: str | os.PathLike | bytes) -> str | None:
    """Why ``source`` (a path, or an encoded image's bytes) does not decode fully, or None when it does."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return f"{type(error).__name__}: {' '.join(str(error).split())}"
    return None


def check_files(paths: Iterable[str | os.PathLike], *, threads: int | None = None,
                use_cache: bool = True) -> dict[str, str]:
    """``{path: reason}`` for each of ``paths`` that is not a fully decodable image (missing, truncated, ...).

    Paths are reported as given. Files whose (absolute path, size, mtime_ns) the cache already knows for
    this Pillow version are not read at all; the rest are decoded on ``threads`` threads (default: the
    CPUs available) and their verdicts added to the cache. ``paths`` is read and checked
    :data:`_FILE_CHUNK` at a time, so memory does not grow with their number (only with the bad ones).
    """
    bad: dict[str, str] = {}
    with _FileChecker(threads, use_cache) as checker:
        chunk: list[str] = []
        for path in paths:
            chunk.append(str(path))
            if len(chunk) == _FILE_CHUNK:
                bad.update(checker.check(chunk))
                chunk = []
        bad.update(checker.check(chunk))
    return bad


class _FileChecker:
    """One cache connection for the chunks of a check; :meth:`check` does a chunk: stat, look up, decode, store."""

    def __init__(self, threads: int | None, use_cache: bool) -> None:
        self.threads, self.use_cache, self.cache, self.opened = threads, use_cache, None, False

    def __enter__(self) -> _FileChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cache is not None:
            self.cache.close()

    def check(self, paths: list[str]) -> dict[str, str]:
        """``{path: reason}`` of the bad ones among ``paths``, in their order."""
        bad: dict[str, str] = {}
        keys: dict[str, tuple[str, int, int]] = {}
        for path in paths:
            try:
                stat = os.stat(path)
            except OSError as error:  # a missing file is never cached: it may appear before the next run
                bad[path] = f"{type(error).__name__}: {error.strerror or error}"
                continue
            keys[path] = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
        if self.use_cache and keys and not self.opened:
            self.cache, self.opened = _Cache.open(), True
        known = self.cache.lookup(list(keys.values())) if self.cache else {}
        todo = []
        for path, key in keys.items():
            if key in known:
                if known[key] is not None:
                    bad[path] = known[key]
            else:
                todo.append(path)
        verdicts = _decode_all(todo, decode_error, self.threads)
        for path, reason in zip(todo, verdicts):
            if reason is not None:
                bad[path] = reason
        if self.cache:
            self.cache.store([(*keys[path], reason) for path, reason in zip(todo, verdicts)])
        return {path: bad[path] for path in paths if path in bad}


def check_bytes(images: Sequence[bytes], *, threads: int | None = None) -> list[str | None]:
    """For each encoded image, why it does not decode fully, or None (not cached: see :func:`load_split_result`)."""
    return _decode_all(list(images), decode_error, threads)


def load_split_result(fingerprint: str | None) -> dict[int, str] | None:
    """The verdicts stored by :func:`store_split_result` for a dataset fingerprint, or None when unknown."""
    if not fingerprint:
        return None
    cache = _Cache.open()
    if cache is None:
        return None
    try:
        return cache.load_split(fingerprint)
    finally:
        cache.close()


def store_split_result(fingerprint: str | None, bad: dict[int, str]) -> None:
    """Remember ``{example index: reason}`` for a dataset fingerprint (which changes with the dataset's content)."""
    if not fingerprint:
        return
    cache = _Cache.open()
    if cache is not None:
        cache.store_split(fingerprint, bad)
        cache.close()


def _decode_all(items: list, check: Callable[[object], str | None], threads: int | None) -> list[str | None]:
    if not items:
        return []
    workers = max(1, min(threads or default_threads(), len(items)))
    with _SWITCH_LOCK:
        truncated_allowed, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            if workers == 1:
                return [check(item) for item in items]
            verdicts: list[str | None] = []
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-check") as pool:
                # Executor.map makes every future at once (about 1.5 kB each): a slice at a time keeps that bounded.
                for start in range(0, len(items), _DECODE_SLICE * workers):
                    verdicts.extend(pool.map(check, items[start:start + _DECODE_SLICE * workers]))
            return verdicts
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = truncated_allowed


def cache_path() -> Path:
    """``$CDB_HF_CACHE/image_checks-v1.sqlite``, or ``~/.cache/cdb_hf/image_checks-v1.sqlite``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "cdb_hf")
    return Path(root) / CACHE_FILE


class _Cache:
    """The sqlite verdict store. Every failure (read-only home, a locked or damaged file) disables it."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self.connection, self.path = connection, path
        self.pillow = PIL.__version__

    @classmethod
    def open(cls) -> _Cache | None:
        path = cache_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(str(path), timeout=30)
            with connection:
                connection.execute("CREATE TABLE IF NOT EXISTS files (path TEXT, size INTEGER, mtime_ns INTEGER, "
                                   "pillow TEXT, reason TEXT, PRIMARY KEY (path, size, mtime_ns, pillow))")
                connection.execute("CREATE TABLE IF NOT EXISTS splits (fingerprint TEXT, pillow TEXT, bad TEXT, "
                                   "PRIMARY KEY (fingerprint, pillow))")
        except (OSError, sqlite3.Error) as error:
            logger.debug(f"image check cache {str(path)!r} is not usable ({error}); checking without it")
            return None
        return cls(connection, path)

    def close(self) -> None:
        self.connection.close()

    def _disable(self, error: Exception) -> None:
        logger.debug(f"image check cache {str(self.path)!r} failed ({error}); going on without it")

    def lookup(self, keys: list[tuple[str, int, int]]) -> dict[tuple[str, int, int], str | None]:
        wanted = set(keys)
        found: dict[tuple[str, int, int], str | None] = {}
        try:
            for start in range(0, len(keys), _QUERY_CHUNK):
                chunk = sorted({key[0] for key in keys[start:start + _QUERY_CHUNK]})
                rows = self.connection.execute(
                    f"SELECT path, size, mtime_ns, reason FROM files WHERE pillow = ? AND path IN "
                    f"({', '.join('?' * len(chunk))})", [self.pillow, *chunk])
                for path, size, mtime_ns, reason in rows:
                    if (path, size, mtime_ns) in wanted:
                        found[(path, size, mtime_ns)] = reason
        except sqlite3.Error as error:
            self._disable(error)
            return {}
        return found

    def store(self, rows: list[tuple[str, int, int, str | None]]) -> None:
        if not rows:
            return
        try:
            with self.connection:
                # A file's older verdicts (other size or mtime) are dead weight: replace them.
                self.connection.executemany("DELETE FROM files WHERE path = ? AND pillow = ?",
                                            [(row[0], self.pillow) for row in rows])
                self.connection.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                                            [(path, size, mtime, self.pillow, reason) for path, size, mtime, reason in rows])
        except sqlite3.Error as error:
            self._disable(error)

    def load_split(self, fingerprint: str) -> dict[int, str] | None:
        try:
            row = self.connection.execute("SELECT bad FROM splits WHERE fingerprint = ? AND pillow = ?",
                                          (fingerprint, self.pillow)).fetchone()
        except sqlite3.Error as error:
            self._disable(error)
            return None
        return None if row is None else {int(index): reason for index, reason in json.loads(row[0]).items()}

    def store_split(self, fingerprint: str, bad: dict[int, str]) -> None:
        try:
            with self.connection:
                self.connection.execute("INSERT OR REPLACE INTO splits VALUES (?, ?, ?)",
                                        (fingerprint, self.pillow, json.dumps({str(k): v for k, v in bad.items()})))
        except sqlite3.Error as error:
            self._disable(error)


# ------------------------------------------------------------------------- a dataset split: refuse or leave out


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
    :func:`check_files`, cached per file; images stored as bytes in the dataset (Hub and
    arrow datasets, the built-in ones) are decoded too, their verdicts cached by the split's fingerprint.
    """
    raw = split.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
    cached = load_split_result(split._fingerprint)
    bad: dict[int, tuple[str, str]] = {}
    bad_files: set[int] = set()  # the bad examples that are image files (cached per file, not with the split)
    has_bytes = False
    start = 0
    paths: dict[int, str] = {}  # image files not checked yet: checked once _FILE_CHUNK have gathered

    def check_paths(files: _FileChecker) -> None:
        by_path = files.check(list(dict.fromkeys(paths.values())))
        for index, path in paths.items():
            if path in by_path:
                bad[index] = (path, by_path[path])
                bad_files.add(index)
        paths.clear()

    with _FileChecker(None, use_cache=True) as files:
        for batch in raw.with_format("arrow").iter(batch_size=_CHECK_BATCH):
            # Chunk by chunk, never concatenated: that would copy the image bytes, i.e. read the whole dataset
            # at every launch (150 GB for ImageNet) even when the verdicts are cached. Only the validity bitmaps
            # and the paths are read here; bytes only for the images decoded.
            for column in batch.column("image").chunks:
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
                    verdicts = check_bytes([byte_values[offset].as_py() for _, offset, _ in pending])
                    for (index, _, path), reason in zip(pending, verdicts):
                        if reason is not None:
                            bad[index] = (path or f"{split_name} example {index}", reason)
                start += len(column)
            if len(paths) >= _FILE_CHUNK:
                check_paths(files)
        check_paths(files)
    if has_bytes and cached is not None:
        for index, reason in cached.items():  # the few bad ones: their stored names
            if index not in bad:  # (an example without an image was found again above)
                bad[index] = (raw[index]["image"]["path"] or f"{split_name} example {index}", reason)
    elif has_bytes:
        store_split_result(split._fingerprint, {i: reason for i, (_, reason) in bad.items() if i not in bad_files})
    return dict(sorted(bad.items()))


def label_ids(split: datasets.Dataset) -> set:
    """The label values of ``split``, in one Arrow pass over its rows (``Dataset.unique`` first copies a selected
    split's whole table, images included)."""
    return set(pc.unique(split.with_format("arrow")["label"]).to_pylist())


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
        before = label_ids(splits[name])
        kept = splits[name].select([i for i in range(len(splits[name])) if i not in bad])
        if len(kept) == 0:
            raise ValueError(f"every image of the {name!r} split of {source!r} is corrupt ({len(bad)}); nothing is left "
                             "to train or evaluate on with --corrupt_images skip.")
        emptied = sorted(before - label_ids(kept))
        if emptied:
            raise ValueError(f"leaving out the corrupt images of the {name!r} split of {source!r} leaves class(es) "
                             f"{[names[i] for i in emptied]} without any image; replace those images.")
        splits[name] = kept
    return {name: len(found.get(name, {})) for name in splits}


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Check every image file under the given folders and fill the cache; exit 1 if any is corrupt."""
    parser = argparse.ArgumentParser(prog="python -m cdb_hf.image_check",
                                     description="Decode every image file under FOLDER(s) once and cache the "
                                                 "verdicts, so that the runs over them only stat the files.")
    parser.add_argument("folders", nargs="+", type=Path, metavar="FOLDER")
    parser.add_argument("--threads", type=int, default=None, help="Decoding threads (default: the CPUs available).")
    args = parser.parse_args(argv)
    missing = [str(folder) for folder in args.folders if not folder.is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)}")
    extensions = {extension.lower() for extension in Image.registered_extensions()}
    files = sorted(str(path) for folder in args.folders for path in folder.rglob("*")
                   if path.suffix.lower() in extensions and path.is_file())
    started = time.perf_counter()
    bad = check_files(files, threads=args.threads)
    for path, reason in bad.items():
        print(f"{path}: {reason}")
    print(f"checked {len(files)} image file(s) in {time.perf_counter() - started:.1f} s: {len(bad)} corrupt",
          file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
