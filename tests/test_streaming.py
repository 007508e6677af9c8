"""--streaming: a local parquet stream end to end on both faces, resume, corrupt images, refusals."""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import IMAGE_FOLDER_CLASSES, make_image
from test_cli import assert_same_weights, finetune_argv, run_quietly

from cdb_hf import streaming
from cdb_hf.arguments import DataArguments

TRAIN_PER_CLASS, VALIDATION_PER_CLASS = 8, 2


@pytest.fixture(autouse=True)
def short_pass_end(monkeypatch):
    """datasets 5.2 sleeps 5 s at the end of every pass over parquet files (a workaround for apache/arrow#45214,
    threads at shutdown); these tiny streams end many passes, so the tests shorten it."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.2)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet_dataset(root: Path, corrupt: dict[str, int] | None = None, train_shards: int = 2) -> Path:
    """``root/data/{train,validation}-*.parquet``: images as PNG bytes, labels as a ClassLabel (3 colours).

    ``corrupt``: {split: example index} whose bytes are cut short (the header survives, the pixels do not).
    """
    names = sorted(IMAGE_FOLDER_CLASSES)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    rng = np.random.default_rng(0)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, per_class, shards in (("train", TRAIN_PER_CLASS, train_shards), ("validation", VALIDATION_PER_CLASS, 1)):
        images, labels = [], []
        for index in range(per_class * len(names)):
            label = index % len(names)
            data = png_bytes(make_image(IMAGE_FOLDER_CLASSES[names[label]], "RGB", rng))
            if corrupt and corrupt.get(split) == index:
                data = data[: len(data) // 2]
            images.append({"bytes": data, "path": f"{split}_{index:03d}.png"})
            labels.append(label)
        table = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        for shard in range(shards):
            table.shard(shards, shard, contiguous=True).to_parquet(
                str(root / "data" / f"{split}-{shard:05d}-of-{shards:05d}.parquet"))
    return root


@pytest.fixture(scope="module")
def parquet_dataset(tmp_path_factory) -> Path:
    return write_parquet_dataset(tmp_path_factory.mktemp("parquet"))


def stream_argv(model_dir, dataset_dir, output_dir, *extra: str) -> list[str]:
    argv = finetune_argv(model_dir, Path("unused"), output_dir, "--streaming", "true", "--shuffle_buffer_size", "8",
                         *extra)
    at = argv.index("--train_dir")
    return argv[:at] + ["--dataset_name", str(dataset_dir)] + argv[at + 4:]


@pytest.mark.parametrize("trainer", ["hf", "accelerate"])
def test_a_parquet_stream_trains_and_evaluates_end_to_end_and_resumes_bitwise(tmp_path, tiny_vit_dir, parquet_dataset,
                                                                            trainer):
    """Both faces through the CLI; the Trainer path also resumes here (the loop's resume: test_streaming_distributed)."""
    def argv(out):
        return stream_argv(tiny_vit_dir, parquet_dataset, out, "--trainer", trainer, "--max_steps", "8",
                           "--save_steps", "4")

    code, printed = run_quietly(argv(tmp_path / "straight"))
    assert code == 0, printed
    results = json.loads((tmp_path / "straight" / "all_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and np.isfinite(results["eval_loss"])
    assert json.loads((tmp_path / "straight" / "trainer_state.json").read_text())["global_step"] == 8
    # 8 steps of 4 examples = 32 > 24 training examples: the stream went round once and went on.
    state = json.loads((tmp_path / "straight" / "checkpoint-4" / "cdb_hf_stream_rank0.json").read_text())
    assert state["raw_position"] == 16 and state["skipped_positions"] == []
    if trainer == "accelerate":
        return
    # An interrupted run leaves its first checkpoint; the resumed one continues the same stream to the same weights.
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    code, printed = run_quietly(argv(tmp_path / "resumed") + ["--resume_from_checkpoint", "true"])
    assert code == 0, printed
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")


# ------------------------------------------------------------------------------------------- two ranks
def test_each_rank_reads_its_own_part_of_the_stream(parquet_dataset):
    args = DataArguments(dataset_name=str(parquet_dataset), streaming=True)
    streams = streaming.open_streams(args, seed=0)
    seen = []
    for rank in range(2):
        dataset = streaming.StreamTrainImages(streams.train, lambda image: image, 0, buffer_size=4, rank=rank,
                                              world_size=2, corrupt_images="error", source="x")
        seen.append([example["image"]["path"] for example in dataset.stream])
    assert len(seen[0]) == len(seen[1]) == 12
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 24


# ------------------------------------------------------------------------------------------- corrupt images
@pytest.fixture(scope="module")
def corrupt_parquet(tmp_path_factory) -> Path:
    return write_parquet_dataset(tmp_path_factory.mktemp("corrupt_parquet"), corrupt={"train": 5, "validation": 1})


def test_a_corrupt_image_in_a_stream_is_skipped_named_and_counted(tmp_path, tiny_vit_dir, corrupt_parquet, caplog):
    code, printed = run_quietly(stream_argv(tiny_vit_dir, corrupt_parquet, tmp_path / "out", "--corrupt_images",
                                            "skip", "--max_steps", "8", "--save_strategy", "no"))
    assert code == 0, printed
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert results["train_skipped_images"] == 1 and results["eval_skipped_images"] == 1
    warned = printed + caplog.text
    assert "train_005.png" in warned and "validation_001.png" in warned


def test_a_resumed_stream_continues_exactly_after_the_corrupt_images_it_skipped(corrupt_parquet):
    import itertools

    streams = streaming.open_streams(DataArguments(dataset_name=str(corrupt_parquet), streaming=True), seed=0)

    def stream() -> streaming.StreamTrainImages:
        return streaming.StreamTrainImages(streams.train, np.asarray, 0, buffer_size=4, rank=0, world_size=1,
                                           corrupt_images="skip", source="x")

    straight = stream()
    examples = list(itertools.islice(iter(straight), 40))  # 23 good images a pass: the corrupt one is met twice
    assert len(straight.skipped_positions) == 2
    for used in (3, 22, 30):
        resumed = stream()
        resumed.resume_at(*straight.position_after(used))
        following = list(itertools.islice(iter(resumed), 5))
        assert [e["labels"] for e in following] == [e["labels"] for e in examples[used:used + 5]]
        assert all(np.array_equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(following, examples[used:]))


def test_a_stream_position_written_in_another_shard_order_resumes_with_a_warning(tmp_path, corrupt_parquet, caplog):
    """A position means something only in the order that wrote it: an older checkpoint's is said to differ."""
    streams = streaming.open_streams(DataArguments(dataset_name=str(corrupt_parquet), streaming=True), seed=0)
    dataset = streaming.StreamTrainImages(streams.train, np.asarray, 0, buffer_size=4, rank=0, world_size=1,
                                          corrupt_images="skip", source="x")
    streaming.write_stream_state(tmp_path, dataset, 7, rank=0)
    with caplog.at_level("WARNING", logger="cdb_hf.streaming"):
        assert streaming.read_stream_state(tmp_path, 0)["raw_position"] == 7
    assert "another order" not in caplog.text
    path = tmp_path / streaming.STREAM_STATE_FILE.format(rank=0)
    state = json.loads(path.read_text())
    del state["order"]  # what the first streaming release wrote
    path.write_text(json.dumps(state))
    with caplog.at_level("WARNING", logger="cdb_hf.streaming"):
        assert streaming.read_stream_state(tmp_path, 0)["raw_position"] == 7
    assert "another order (order 1" in caplog.text and "will not end with" in caplog.text


@pytest.mark.parametrize("trainer", ["hf", "accelerate"])
def test_a_corrupt_image_in_a_stream_stops_the_run_naming_it(tmp_path, tiny_vit_dir, corrupt_parquet, trainer):
    """Met after training began (a checkpoint was written): still bad input, one line and exit 2, not a traceback."""
    code, printed = run_quietly(stream_argv(tiny_vit_dir, corrupt_parquet, tmp_path / "out", "--max_steps", "8",
                                            "--save_steps", "1", "--trainer", trainer))
    assert code == 2, printed
    assert "train_005.png" in printed and "--corrupt_images skip" in printed and "Traceback" not in printed
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert (tmp_path / "out" / "checkpoint-1").is_dir()  # the checkpoints so far stay


# ------------------------------------------------------------------------------------------- refusals
def _parquet_without_validation(root: Path) -> Path:
    source = write_parquet_dataset(root)
    (source / "data" / "validation-00000-of-00001.parquet").unlink()
    return source


def _parquet_with_integer_labels(root: Path) -> Path:
    root.mkdir(parents=True)
    table = datasets.Dataset.from_dict({"image": [{"bytes": png_bytes(make_image((9, 9, 9), "RGB",
                                                                                  np.random.default_rng(i))),
                                                   "path": f"{i}.png"} for i in range(4)], "label": [0, 1, 0, 1]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "label": datasets.Value("int64")}))
    table.to_parquet(str(root / "train.parquet"))
    table.to_parquet(str(root / "validation.parquet"))
    return root


@pytest.mark.parametrize("source, extra, message", [
    (None, ["--max_steps", "-1", "--num_train_epochs", "2"], "--streaming needs --max_steps"),
    (None, ["--max_train_samples", "8"], "--max_train_samples 8 cannot hold with --streaming"),
    (None, ["--eval_strategy", "epoch"], "--eval_strategy epoch cannot be used with --streaming"),
    (None, ["--dataloader_num_workers", "2"], "--dataloader_num_workers 2 with --streaming"),
    (None, ["--shuffle_buffer_size", "0"], "--shuffle_buffer_size must be a positive number"),
    (None, ["--max_eval_samples", "0"], "--max_eval_samples must be a positive integer"),
    (None, ["--cdb_schedule", "linear", "--cdb_schedule_unit", "epochs"], "needs --cdb_schedule_steps_per_epoch"),
    ("folder", [], "needs --validation_dir: a stream cannot be carved"),
    ("no_validation", [], "cannot be carved into one (--train_val_split)"),
    ("integer_labels", [], "must be a ClassLabel"),
    ("text_file", [], "cannot stream"),
    ("hub", [], "offline mode is on"),
])
def test_streaming_refuses_what_a_stream_cannot_honour_before_any_work(tmp_path, tiny_vit_dir, parquet_dataset,
                                                                       image_folder, source, extra, message):
    if source == "folder":
        argv = finetune_argv(tiny_vit_dir, image_folder, tmp_path / "out", "--streaming", "true")
        at = argv.index("--validation_dir")
        argv = argv[:at] + argv[at + 2:]
    else:
        dataset = {None: parquet_dataset, "hub": "someone/imagenet-like"}.get(source)
        if source == "no_validation":
            dataset = _parquet_without_validation(tmp_path / "pq")
        elif source == "integer_labels":
            dataset = _parquet_with_integer_labels(tmp_path / "pq")
        elif source == "text_file":
            dataset = tmp_path / "notes.txt"
            dataset.write_text("not a dataset")
        argv = stream_argv(tiny_vit_dir, dataset, tmp_path / "out", *extra)
    code, printed = run_quietly(argv)
    assert code == 2, printed
    errors = [line for line in printed.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], printed[-2000:]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", ["vit-b16_imagenet", "vit-l16_imagenet", "vit-b16-384_imagenet",
                                  "vit-l16-384_imagenet"])
def test_imagenet_recipes_say_why_not_streaming_and_their_streaming_flags_pass_preflight(name, tmp_path):
    import yaml

    from cdb_hf.cli import parse_args
    from cdb_hf.preflight import plan_run

    path = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml"
    header = path.read_text().split("\n\n")[0]
    assert "Data: map-style, not --streaming, because" in header and "Start-up and disk" in header
    lines = header.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("#   --streaming true"))
    flags = " ".join(line[1:] for line in lines[at:at + 2]).split()
    recipe = yaml.safe_load(path.read_text())
    assert recipe.get("streaming", False) is False  # why not: said above
    for key in ("lr_schedule", "lr_milestones", "lr_gamma"):
        recipe.pop(key, None)  # lr_milestones is left unset by the recipes (the official rule for any E)
    copy = tmp_path / f"{name}_streaming.yaml"
    copy.write_text(yaml.safe_dump(recipe))
    model, data, cdb, run, training = parse_args([str(copy), *flags, "--output_dir", str(tmp_path / "never")])
    assert data.streaming and training.max_steps == 85 * 1252
    plan = plan_run(model, data, cdb, run, training)
    assert plan.data.streaming  # pre-flight accepts it as written
    # 85 epochs of 1252 steps: CDB's phases by the official rule for E = 85, as the map-style recipe gets them.
    assert plan.cdb.cdb_schedule_milestones == [28, 53]


# ------------------------------------------------------------------------------------------- WebDataset
def write_webdataset(root: Path) -> Path:
    """``root/{train,validation}-000000.tar``: ``<key>.png`` + ``<key>.cls`` (an integer class id) per example."""
    import tarfile

    names = sorted(IMAGE_FOLDER_CLASSES)
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for split, count in (("train", 12), ("validation", 6)):
        with tarfile.open(root / f"{split}-000000.tar", "w") as tar:
            for index in range(count):
                label = index % len(names)
                files = {"png": png_bytes(make_image(IMAGE_FOLDER_CLASSES[names[label]], "RGB", rng)),
                         "cls": str(label).encode()}
                for extension, data in files.items():
                    info = tarfile.TarInfo(f"{split}_{index:04d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def test_webdataset_tar_shards_stream_with_class_names(tmp_path, tiny_vit_dir):
    shards = write_webdataset(tmp_path / "wds")
    argv = stream_argv(tiny_vit_dir, shards, tmp_path / "out", "--max_steps", "4", "--save_strategy", "no")
    code, printed = run_quietly(argv)
    assert code == 2 and "Pass --class_names" in printed  # integer labels: the names cannot be read off a stream
    code, printed = run_quietly(argv + ["--class_names", *sorted(IMAGE_FOLDER_CLASSES)])
    assert code == 0, printed
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert np.isfinite(results["eval_loss"]) and 0.0 <= results["eval_accuracy"] <= 1.0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert sorted(config["id2label"].values()) == sorted(IMAGE_FOLDER_CLASSES)


# ------------------------------------------------------------------------------------------- image folders
FOLDER_CLASSES, FILES_PER_CLASS = ("ant", "bee", "cat", "dog"), 40


@pytest.fixture(scope="module")
def listed_folder(tmp_path_factory) -> Path:
    """``<class>/...`` of empty ``.png`` files (nothing may read them), some in nested folders, plus what a
    listing must leave out: hidden files and folders, other extensions, an empty class folder."""
    root = tmp_path_factory.mktemp("listed_folder")
    for name in FOLDER_CLASSES:
        for index in range(FILES_PER_CLASS):
            sub = ("deep/" if index % 5 == 0 else "deep-er/" if index % 7 == 0 else "") + f"{name}_{index:02d}.png"
            (root / name / sub).parent.mkdir(parents=True, exist_ok=True)
            (root / name / sub).touch()
        for skipped in (".hidden.png", "notes.txt", ".cache/x.png"):
            (root / name / skipped).parent.mkdir(parents=True, exist_ok=True)
            (root / name / skipped).touch()
    (root / "empty").mkdir()
    (root / ".hidden_class").mkdir()
    (root / ".hidden_class" / "x.png").touch()
    return root


def folder_stream_paths(folder: Path, seed: int, rank: int = 0, world_size: int = 1, buffer_size: int = 4):
    streams = streaming.open_streams(DataArguments(train_dir=str(folder), validation_dir=str(folder),
                                                   streaming=True), seed=seed)
    dataset = streaming.StreamTrainImages(streams.train, lambda image: image, seed, buffer_size=buffer_size,
                                          rank=rank, world_size=world_size, corrupt_images="error", source="x")
    return streams.labels, [(example["image"]["path"], example["label"]) for example in dataset.stream]


def test_an_image_folder_streams_in_a_seeded_order_of_mixed_classes_whatever_the_listing_order(listed_folder,
                                                                                               monkeypatch):
    """Start-up lists the folder and reads no file (they are empty: a read or decode would fail); the order is
    a function of the seed, not of the order the filesystem lists files in; classes are mixed from the start
    although the buffer (4) is far smaller than a class (40)."""
    import PIL.Image

    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: pytest.fail("an image was opened during start-up"))
    labels, seen = folder_stream_paths(listed_folder, seed=3)
    assert labels == list(FOLDER_CLASSES)  # the empty and the hidden class folders are no classes
    # Per class in Path order (part by part: deep/ < deep-er/ < files), then one seeded permutation of the list.
    expected = [(str(path), label) for label, name in enumerate(FOLDER_CLASSES)
                for path in sorted(p for p in (listed_folder / name).rglob("*.png")
                                   if not any(part.startswith(".") for part in p.relative_to(listed_folder).parts))]
    assert len(expected) == len(FOLDER_CLASSES) * FILES_PER_CLASS
    listed = [expected[i] for i in np.random.default_rng(3).permutation(len(expected))]
    assert sorted(seen) == sorted(expected)
    assert {label for _, label in seen[:20]} == set(range(len(FOLDER_CLASSES)))  # mixed within half a class
    # The stream is read shard by shard from the seeded list: its first shard holds the list's first examples.
    assert set(seen[:2]) <= set(listed[:6])

    real_walk, real_scandir = os.walk, os.scandir

    def walk_backwards(top, *args, **kwargs):
        for folder, dirs, files in real_walk(top, *args, **kwargs):
            dirs.reverse()
            files.reverse()
            yield folder, dirs, files

    class ScandirBackwards:  # what os.scandir returns (os.walk uses it too), its entries the other way round
        def __init__(self, path):
            self.entries = iter(list(real_scandir(path))[::-1])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __iter__(self):
            return self

        def __next__(self):
            return next(self.entries)

        def close(self):
            pass

    monkeypatch.setattr(os, "walk", walk_backwards)
    monkeypatch.setattr(os, "scandir", ScandirBackwards)
    assert folder_stream_paths(listed_folder, seed=3) == (labels, seen)
    monkeypatch.undo()
    assert folder_stream_paths(listed_folder, seed=4)[1] != seen


@pytest.mark.parametrize("world_size", [2, 3])  # 64 shards: whole shards per rank; every 3rd example
def test_each_rank_reads_its_own_part_of_an_image_folder_stream(listed_folder, world_size):
    parts = [folder_stream_paths(listed_folder, seed=0, rank=rank, world_size=world_size)[1]
             for rank in range(world_size)]
    everything = [example for part in parts for example in part]
    assert len(everything) == len(set(everything)) == len(FOLDER_CLASSES) * FILES_PER_CLASS
    assert all(abs(len(part) - len(parts[0])) <= 3 for part in parts)


def test_the_training_shuffle_reads_one_shard_at_a_time(tmp_path):
    """datasets >= 5 fills the shuffle buffer from up to 10 shards at once, and pyarrow reads each open parquet
    shard whole (memory grew with the number of shards: docs/streaming.md); cdb_hf reads one at a time, so the
    first examples all come from one shard (3 shards of 8 rows, a buffer of 2)."""
    source = write_parquet_dataset(tmp_path / "parquet", train_shards=3)
    streams = streaming.open_streams(DataArguments(dataset_name=str(source), streaming=True), seed=0)
    dataset = streaming.StreamTrainImages(streams.train, lambda image: image, 0, buffer_size=2, rank=0,
                                          world_size=1, corrupt_images="error", source="x")
    shards = [int(example["image"]["path"][len("train_"):-len(".png")]) // 8 for example in dataset.stream]
    assert sorted(shards) == [0] * 8 + [1] * 8 + [2] * 8
    assert len(set(shards[:6])) == 1, shards


def test_an_unlabeled_example_met_in_a_stream_is_bad_input_naming_it():
    """A label outside the classes stops the run as bad input (one line, exit 2) wherever the stream meets it."""
    from cdb_hf.errors import UsageError

    names = sorted(IMAGE_FOLDER_CLASSES)
    image = {"bytes": png_bytes(make_image(IMAGE_FOLDER_CLASSES[names[0]], "RGB", np.random.default_rng(0))),
             "path": None}
    split = datasets.Dataset.from_dict({"image": [image] * 3, "label": [0, 1, -1]}, features=datasets.Features(
        {"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=names)}))
    dataset = streaming.StreamTrainImages(split.to_iterable_dataset(), lambda image: image, 0, buffer_size=1, rank=0,
                                          world_size=1, corrupt_images="error", source="src")
    with pytest.raises(UsageError, match=r"train example \d of 'src' has label -1, outside 0..2"):
        list(itertools.islice(iter(dataset), 3))
