"""Corrupt images never crash a run: found by a full decode before training (cached), refused or skipped."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL
import pytest
from conftest import write_image_folder
from PIL import Image
from test_cli import finetune_argv, run_quietly
from test_safety import tree_hashes

from cdb_hf import cli, image_check
from cdb_hf.arguments import DataArguments
from cdb_hf.image_check import find_corrupt_images
from cdb_hf.run_dir import write_run_marker
from cdb_hf.sources import load_image_datasets

REPO = Path(__file__).resolve().parents[1]


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def truncated_jpeg_bytes(seed: int = 0) -> bytes:
    whole = jpeg_bytes(seed)
    return whole[: len(whole) * 6 // 10]  # the header survives, the scan data is cut short


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch) -> Path:
    """Each test starts with an empty verdict cache of its own (subprocesses inherit it)."""
    path = tmp_path_factory.mktemp("image_check_cache")
    monkeypatch.setenv(image_check.CACHE_ENV, str(path))
    return path


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Every image the checker decodes, in order (the cache must make this list empty on a re-check)."""
    seen: list[str] = []
    real = image_check.decode_error

    def counting(source):
        seen.append(source if isinstance(source, str) else "<bytes>")
        return real(source)

    monkeypatch.setattr(image_check, "decode_error", counting)
    return seen


def folder_with_truncated_jpeg(root: Path) -> tuple[Path, Path]:
    """The conftest image folder layout (3 classes, PNGs) plus one truncated JPEG in train/green."""
    write_image_folder(root, train_modes=("RGB", "RGB", "L"), validation_modes=("RGB",))
    bad = root / "train" / "green" / "photo_0042.jpg"
    bad.write_bytes(truncated_jpeg_bytes())
    return root, bad


# ------------------------------------------------------------------------------------------ the checker
def test_a_truncated_jpeg_passes_verify_but_not_the_decode_check(tmp_path):
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    good.write_bytes(jpeg_bytes())
    bad.write_bytes(truncated_jpeg_bytes())
    with Image.open(bad) as image:
        image.verify()  # the old check: no error, the run would crash in a dataloader worker later
    found = image_check.check_files([good, bad, tmp_path / "gone.png"])
    assert list(found) == [str(bad), str(tmp_path / "gone.png")]
    assert "truncated" in found[str(bad)] and "FileNotFoundError" in found[str(tmp_path / "gone.png")]


def test_a_second_check_decodes_nothing_and_a_changed_file_is_checked_again(tmp_path, decodes):
    files = []
    for seed in range(6):
        files.append(tmp_path / f"{seed}.jpg")
        files[-1].write_bytes(jpeg_bytes(seed))
    assert image_check.check_files(files, threads=2) == {}
    assert len(decodes) == 6

    decodes.clear()
    assert image_check.check_files(files) == {}
    assert decodes == []  # only stat calls and one cache query

    files[1].write_bytes(truncated_jpeg_bytes(1))  # other size
    stat = files[2].stat()
    os.utime(files[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, other mtime
    decodes.clear()
    found = image_check.check_files(files)
    assert list(found) == [str(files[1])]
    assert sorted(decodes) == sorted([str(files[1]), str(files[2])])
    decodes.clear()
    assert list(image_check.check_files(files)) == [str(files[1])] and decodes == []  # bad verdicts are cached too


def test_verdicts_are_kept_per_pillow_version(tmp_path, decodes, monkeypatch):
    """README, Corrupt images: the cache is keyed by the Pillow version too; another Pillow may decode a
    file differently, so its verdicts are not reused (files and stored bytes alike)."""
    files = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    for seed, path in enumerate(files):
        path.write_bytes(jpeg_bytes(seed))
    image_check.check_files(files)
    image_check.store_split_result("split-fingerprint", {})
    decodes.clear()
    assert image_check.check_files(files) == {} and decodes == []
    assert image_check.load_split_result("split-fingerprint") == {}

    monkeypatch.setattr(PIL, "__version__", "0.0.1-another")
    assert image_check.check_files(files) == {}
    assert sorted(decodes) == sorted(str(p) for p in files), "another Pillow: every file decoded again"
    assert image_check.load_split_result("split-fingerprint") is None


def test_a_cache_that_cannot_be_written_does_not_fail_the_check(tmp_path, monkeypatch, caplog, decodes):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(image_check.CACHE_ENV, str(blocker / "cache"))  # mkdir fails, even for root
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(truncated_jpeg_bytes())
    with caplog.at_level(logging.DEBUG, logger="cdb_hf.image_check"):
        for _ in range(2):
            assert list(image_check.check_files([bad])) == [str(bad)]
    assert len(decodes) == 2  # no cache: decoded each time
    assert "is not usable" in caplog.text and "checking without it" in caplog.text


def test_images_stored_as_bytes_are_checked_and_cached_by_fingerprint(decodes):
    images = [{"bytes": jpeg_bytes(i), "path": f"img_{i}.jpg"} for i in range(4)]
    images[2] = {"bytes": truncated_jpeg_bytes(2), "path": "img_2.jpg"}
    split = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "label": datasets.ClassLabel(names=["a", "b"])}))
    found = find_corrupt_images(split)
    assert list(found) == [2] and found[2][0] == "img_2.jpg" and "truncated" in found[2][1]
    assert len(decodes) == 4
    decodes.clear()
    assert find_corrupt_images(split) == found and decodes == []



def _rss_file_mib() -> float:
    """This process's resident file-backed pages (memory-mapped files it has read), in MiB."""
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("RssFile"))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssFile from /proc (Linux)")
def test_images_stored_as_bytes_are_checked_chunk_by_chunk_without_reading_the_bytes_again(tmp_path, decodes):
    """A memory-mapped split of several chunks (as datasets stores a large one): the right indices in every chunk,
    and a cached check reads validity bitmaps and paths only: concatenating a batch's chunks copied its image
    bytes, so every launch read the whole dataset again (150 GB for ImageNet)."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})
    parts = []
    for part in range(3):
        images = [{"bytes": jpeg_bytes(i), "path": f"{part}_{i}.jpg"} for i in range(700)]  # ~9 kB each
        if part == 1:
            images[600] = {"bytes": truncated_jpeg_bytes(5), "path": "1_600.jpg"}  # index 1300
        if part == 2:
            images[50] = None  # index 1450
        parts.append(datasets.Dataset.from_dict({"image": images, "label": [0] * 700}, features=features))
    datasets.concatenate_datasets(parts).save_to_disk(str(tmp_path / "saved"))
    found = find_corrupt_images(datasets.load_from_disk(str(tmp_path / "saved")))
    assert {index: name for index, (name, _) in found.items()} == {1300: "1_600.jpg", 1450: "train example 1450"}
    assert len(decodes) == 2099
    decodes.clear()

    split = datasets.load_from_disk(str(tmp_path / "saved"))  # a fresh memory map: none of it read yet
    size_mib = sum(f.stat().st_size for f in (tmp_path / "saved").glob("*.arrow")) / 2**20
    before = _rss_file_mib()
    assert find_corrupt_images(split) == found and decodes == []  # the verdicts cached by fingerprint
    read = _rss_file_mib() - before
    assert read < size_mib / 4, f"a cached check read {read:.1f} MiB of the {size_mib:.1f} MiB dataset"


def test_the_check_decodes_on_every_available_cpu_by_default(tmp_path, monkeypatch):
    files = []
    for seed in range(6):
        files.append(tmp_path / f"{seed}.jpg")
        files[-1].write_bytes(jpeg_bytes(seed))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5, 7}, raising=False)
    pools = []
    real = image_check.ThreadPoolExecutor

    def recording(max_workers, **kwargs):
        pools.append(max_workers)
        return real(max_workers=max_workers, **kwargs)

    monkeypatch.setattr(image_check, "ThreadPoolExecutor", recording)
    assert image_check.default_threads() == 4
    assert image_check.check_files(files, use_cache=False) == {}
    assert pools == [4]  # one thread per CPU this process may use, not one thread
    assert image_check.check_files(files, threads=1, use_cache=False) == {} and pools == [4]


def test_a_large_check_holds_a_bounded_number_of_pending_decodes():
    """Executor.map would make a future per image up front: 1.3 GB for ImageNet's 1.28M images."""
    import tracemalloc

    tracemalloc.start()
    try:
        verdicts = image_check._decode_all(list(range(20_000)), lambda item: None if item % 7 else "bad", 2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert verdicts == [None if i % 7 else "bad" for i in range(20_000)]  # in order, every item once
    assert peak < 5 * 2**20, f"{peak / 2**20:.1f} MiB held while checking 20,000 items (unbounded: ~30 MiB)"


def test_files_are_checked_a_chunk_at_a_time_with_the_same_verdicts(tmp_path, monkeypatch, decodes):
    """Memory does not grow with a folder: stat, cache look-up, decode and cache write go a chunk at a time,
    and the verdicts, their example indices and the cache come out as in one pass."""
    monkeypatch.setattr(image_check, "_FILE_CHUNK", 3)
    lookups = []
    real_lookup = image_check._Cache.lookup
    monkeypatch.setattr(image_check._Cache, "lookup", lambda self, keys: lookups.append(len(keys)) or real_lookup(self, keys))
    files = [tmp_path / f"{i}.jpg" for i in range(8)]
    for i, file in enumerate(files):
        file.write_bytes(truncated_jpeg_bytes(i) if i in (2, 3, 7) else jpeg_bytes(i))
    files[5].unlink()  # missing: named, never cached
    paths = [str(file) for file in files]
    expected = [paths[2], paths[3], paths[5], paths[7]]
    found = image_check.check_files(iter(paths))  # any iterable, read as it goes
    assert list(found) == expected and "FileNotFoundError" in found[paths[5]]
    assert max(lookups) <= 3 and len(lookups) == 3 and len(decodes) == 7
    split = datasets.Dataset.from_dict({"image": paths, "label": [0, 1] * 4}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}))
    decodes.clear()
    bad = find_corrupt_images(split)
    assert {index: file for index, (file, _) in bad.items()} == {2: paths[2], 3: paths[3], 5: paths[5], 7: paths[7]}
    assert decodes == []  # all cached by check_files, chunk by chunk


# ------------------------------------------------------------------------------------------ data loading
def test_skip_leaves_out_the_corrupt_files_and_counts_them(tmp_path, caplog):
    root, bad = folder_with_truncated_jpeg(tmp_path / "data")
    args = DataArguments(train_dir=str(root / "train"), validation_dir=str(root / "validation"),
                         corrupt_images="skip")
    skipped: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="cdb_hf"):
        loaded = load_image_datasets(args, seed=0, skipped_images=skipped)
    assert skipped == {"train": 1, "validation": 0}
    assert len(loaded["train"]) == 9 and len(loaded["validation"]) == 3
    assert str(bad) in caplog.text and "leaving out 1 image(s)" in caplog.text

    for other in (root / "train" / "green").iterdir():  # now every green training image is corrupt
        other.write_bytes(truncated_jpeg_bytes())
    with pytest.raises(ValueError, match=r"leaves class\(es\) \['green'\] without any image"):
        load_image_datasets(args, seed=0)


def test_bad_corrupt_images_values_are_refused_in_one_line(tmp_path, tiny_vit_dir, image_folder):
    argv = finetune_argv(tiny_vit_dir, image_folder, tmp_path / "out")
    code, printed = run_quietly(argv + ["--corrupt_images", "maybe"])
    assert code == 2 and "--corrupt_images" in printed and "'maybe'" in printed
    recipe = tmp_path / "recipe.yaml"  # a recipe value bypasses argparse's choices: pre-flight refuses it
    recipe.write_text("corrupt_images: sometimes\n")
    code, printed = run_quietly([str(recipe), *argv])
    assert code == 2 and "--corrupt_images 'sometimes' is not valid; choose one of error, skip" in printed
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ as a user runs it
def test_by_default_a_corrupt_image_stops_the_run_in_one_line_before_anything_changes(tmp_path, tiny_vit_dir, capsys):
    """In-process (test_safety checks in a subprocess that a late refusal prints only its line)."""
    root, bad = folder_with_truncated_jpeg(tmp_path / "data")
    previous = tmp_path / "out"
    previous.mkdir()
    write_run_marker(previous, status="complete")
    (previous / "model.safetensors").write_bytes(b"weights of an earlier run")
    before = tree_hashes(previous)

    code = cli.main(finetune_argv(tiny_vit_dir, root, previous, "--overwrite_output_dir", "true"))

    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert str(bad) in lines[0] and "truncated" in lines[0] and "--corrupt_images skip" in lines[0]
    assert tree_hashes(previous) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]  # nothing set aside either


def test_skip_trains_without_the_corrupt_image_and_reports_the_count(tmp_path, tiny_vit_dir):
    root, bad = folder_with_truncated_jpeg(tmp_path / "data")
    result = subprocess.run([sys.executable, str(REPO / "run_finetune.py"),
                             *finetune_argv(tiny_vit_dir, root, tmp_path / "out", "--corrupt_images", "skip",
                                            "--max_steps", "2", "--save_strategy", "no")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(bad) in result.stdout + result.stderr
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert results["train_skipped_images"] == 1 and results["eval_skipped_images"] == 0
    assert json.loads((tmp_path / "out" / "train_results.json").read_text())["train_skipped_images"] == 1
    assert (tmp_path / "out" / "model.safetensors").is_file()



def test_predict_and_evaluate_only_images_are_checked_too(tmp_path):
    from cdb_hf.sources import load_eval_split, load_predict_images

    folder = tmp_path / "to_predict"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(jpeg_bytes(1))
    (folder / "sub" / "b.jpg").write_bytes(jpeg_bytes(2))
    (folder / "sub" / "broken.jpg").write_bytes(truncated_jpeg_bytes())
    with pytest.raises(ValueError, match=r"broken\.jpg.*--corrupt_images skip"):
        load_predict_images(DataArguments(predict_dir=str(folder)))
    key_name, keys, dataset, true_labels = load_predict_images(DataArguments(predict_dir=str(folder),
                                                                             corrupt_images="skip"))
    assert (key_name, keys, len(dataset), true_labels) == ("file", ["a.jpg", "sub/b.jpg"], 2, None)

    validation = tmp_path / "validation"
    for label in ("cat", "dog"):
        (validation / label).mkdir(parents=True)
        (validation / label / "ok.jpg").write_bytes(jpeg_bytes(3))
    (validation / "dog" / "broken.jpg").write_bytes(truncated_jpeg_bytes())
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        load_eval_split(DataArguments(validation_dir=str(validation)), seed=0)
    kept = load_eval_split(DataArguments(validation_dir=str(validation), corrupt_images="skip"), seed=0)
    assert len(kept) == 2 and sorted(kept["label"]) == [0, 1]


def test_the_command_line_checker_names_corrupt_files_and_fills_the_cache(tmp_path, decodes, capsys):
    folder, bad = folder_with_truncated_jpeg(tmp_path / "images")
    assert image_check.main([str(folder)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{bad}: {image_check.decode_error(str(bad))}"] and "1 corrupt" in err
    checked = len(decodes) - 1  # the decode_error call just above
    assert checked >= 4
    decodes.clear()
    assert image_check.main([str(folder)]) == 1 and decodes == []  # the second pass only stats the files
    with pytest.raises(SystemExit):
        image_check.main([str(tmp_path / "nowhere")])
