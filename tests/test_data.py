"""cdb_hf.sources, .transforms and .train_set: every source, column detection, seeded splits, every bad input,
the transforms and the seeded training set."""

from __future__ import annotations

import shutil

import datasets
import numpy as np
import pytest
import torch
from conftest import IMAGE_FOLDER_CLASSES, make_image, write_image_folder
from PIL import Image
from torchvision.transforms import v2
from transformers import ConvNextImageProcessor, DeiTImageProcessor, ViTImageProcessor

from cdb_hf import run, sources
from cdb_hf.arguments import DataArguments
from cdb_hf.sources import load_image_datasets, num_examples_per_class
from cdb_hf.train_set import PerExampleSeeded
from cdb_hf.transforms import ToRGB, apply_transforms, build_transforms, collate_fn


def folder_args(root, **overrides) -> DataArguments:
    return DataArguments(train_dir=str(root / "train"), validation_dir=str(root / "validation"), **overrides)


def image_dataset(num_per_class: int, class_names, seed: int = 0, image_column: str = "image",
                  label_column: str = "label", label_values=None) -> datasets.Dataset:
    """In-memory dataset with an Image column and labels (ClassLabel unless ``label_values`` is given)."""
    rng = np.random.default_rng(seed)
    colours = [tuple(int(c) for c in rng.integers(0, 255, 3)) for _ in class_names]
    images, labels = [], []
    for index, colour in enumerate(colours):
        for _ in range(num_per_class):
            images.append(make_image(colour, "RGB", rng, size=8))
            labels.append(index if label_values is None else label_values[index])
    label_feature = (datasets.ClassLabel(names=list(class_names)) if label_values is None
                     else datasets.Value("string" if isinstance(label_values[0], str) else "int64"))
    features = datasets.Features({image_column: datasets.Image(), label_column: label_feature})
    return datasets.Dataset.from_dict({image_column: images, label_column: labels}, features=features)


def save(dataset_dict: dict, path) -> str:
    datasets.DatasetDict(dataset_dict).save_to_disk(str(path))
    return str(path)


# ------------------------------------------------------------------------------------------- sources


def test_image_folders_give_image_and_classlabel_columns(image_folder):
    loaded = load_image_datasets(folder_args(image_folder), seed=0)
    assert set(loaded) == {"train", "validation"}
    assert (loaded.num_rows["train"], loaded.num_rows["validation"]) == (15, 6)
    for split in loaded.values():
        assert split.column_names == ["image", "label"]
        assert isinstance(split.features["image"], datasets.Image)
        assert split.features["label"].names == sorted(IMAGE_FOLDER_CLASSES)
    assert num_examples_per_class(loaded["train"]) == {"blue": 5, "green": 5, "red": 5}
    # Labels really come from the folder names: the "red" example is reddish.
    red = loaded["train"].features["label"].str2int("red")
    example = next(ex for ex in loaded["train"] if ex["label"] == red)
    r, g, b = np.asarray(example["image"].convert("RGB"), dtype=float).mean(axis=(0, 1))
    assert r > g + 100 and r > b + 100


def test_nested_images_belong_to_their_top_level_class_folder(tmp_path):
    root = write_image_folder(tmp_path / "data", train_modes=("RGB", "RGB"), validation_modes=("RGB",))
    rng = np.random.default_rng(1)
    nested = root / "train" / "red" / "sub" / "deeper"
    nested.mkdir(parents=True)
    make_image(IMAGE_FOLDER_CLASSES["red"], "RGB", rng).save(nested / "deep_red.png")
    only_nested = root / "validation" / "blue" / "sub"  # a class whose images are all nested
    only_nested.mkdir()
    for path in (root / "validation" / "blue").glob("*.png"):
        path.rename(only_nested / path.name)

    loaded = load_image_datasets(folder_args(root), seed=0)
    assert loaded["train"].features["label"].names == sorted(IMAGE_FOLDER_CLASSES)
    assert num_examples_per_class(loaded["train"]) == {"blue": 2, "green": 2, "red": 3}
    assert num_examples_per_class(loaded["validation"]) == {"blue": 1, "green": 1, "red": 1}
    for split in loaded.values():  # every label is the class whose colour the image has
        for example in split:
            mean = np.asarray(example["image"].convert("RGB"), dtype=float).mean(axis=(0, 1))
            name = split.features["label"].int2str(example["label"])
            assert np.abs(mean - np.array(IMAGE_FOLDER_CLASSES[name])).max() < 40, (name, mean)



def test_listing_a_large_image_folder_holds_little_more_than_its_file_list(tmp_path):
    """The splits go to Arrow a class at a time: no list of strings and dict per image on top of the listing
    (~900 B per file with the listing, 1.1 GB of start-up memory for ImageNet's 1.28M files, instead of ~420 B)."""
    import tracemalloc

    for name in ("d", "c", "b", "a"):
        (tmp_path / "train" / name / "sub").mkdir(parents=True)
        (tmp_path / "val" / name).mkdir(parents=True)
        (tmp_path / "val" / name / "0.jpg").touch()  # never read: listing only
        for i in range(1000):
            (tmp_path / "train" / name / f"{i:04d}.jpg").touch()
        (tmp_path / "train" / name / "sub" / "x.jpg").touch()  # nested: its top-level class
    tracemalloc.start()
    try:
        sources.list_class_folders(str(tmp_path / "train"), "train_dir")
        listing = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        splits = sources._load_image_folders(str(tmp_path / "train"), str(tmp_path / "val"))
        loading = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # What stays on top of the listing: one class's path strings and datasets' fingerprint of the table.
    assert loading < 2.2 * listing, f"{loading / 4004:.0f} B per file vs {listing / 4004:.0f} B for the listing alone"
    rows = splits["train"].with_format("arrow")[:].to_pylist()
    expected = [(f"{tmp_path}/train/{name}/{file}", label) for label, name in enumerate("abcd")
                for file in [f"{i:04d}.jpg" for i in range(1000)] + ["sub/x.jpg"]]
    assert [(row["image"]["path"], row["label"]) for row in rows] == expected
    assert all(row["image"]["bytes"] is None for row in rows)
    assert splits["train"].features == datasets.Features({"image": datasets.Image(),
                                                          "label": datasets.ClassLabel(names=list("abcd"))})
    assert splits["validation"].with_format("arrow")["label"].to_pylist() == [0, 1, 2, 3]

def test_dataset_name_may_be_a_local_image_folder_with_split_folders(image_folder):
    loaded = load_image_datasets(DataArguments(dataset_name=str(image_folder)), seed=0)
    assert (loaded.num_rows["train"], loaded.num_rows["validation"]) == (15, 6)
    assert loaded["train"].features["label"].names == sorted(IMAGE_FOLDER_CLASSES)


def test_save_to_disk_folder_with_other_column_names_is_detected_and_renamed(tmp_path):
    names = ["cat", "dog", "emu"]
    train = image_dataset(4, names, image_column="picture_data", label_column="category")
    train = train.add_column("extra", list(range(len(train))))
    validation = image_dataset(2, names, seed=1, image_column="picture_data", label_column="category")
    path = save({"train": train, "validation": validation}, tmp_path / "saved")
    loaded = load_image_datasets(DataArguments(dataset_name=path), seed=0)
    assert loaded["train"].column_names == ["image", "label"]
    assert loaded["train"].features["label"].names == names
    assert loaded["train"]["label"] == train["category"]


def test_a_single_saved_dataset_and_a_parquet_file_are_sources_too(tmp_path):
    dataset = image_dataset(10, ["a", "b"])
    dataset.save_to_disk(str(tmp_path / "single"))
    dataset.to_parquet(str(tmp_path / "data.parquet"))
    for name in (str(tmp_path / "single"), str(tmp_path / "data.parquet")):
        loaded = load_image_datasets(DataArguments(dataset_name=name), seed=0)
        assert loaded.num_rows["train"] + loaded.num_rows["validation"] == 20
        assert isinstance(loaded["train"][0]["image"], Image.Image)


def test_string_labels_become_sorted_classlabels_shared_by_both_splits(tmp_path):
    train = image_dataset(3, ["x", "y", "z"], label_values=["zebra", "ant", "moose"], label_column="labels",
                          image_column="img")
    validation = image_dataset(1, ["x", "y"], label_values=["moose", "ant"], label_column="labels", image_column="img")
    loaded = load_image_datasets(DataArguments(dataset_name=save({"train": train, "validation": validation},
                                                                 tmp_path / "s")), seed=0)
    names = loaded["train"].features["label"].names
    assert names == ["ant", "moose", "zebra"]
    assert loaded["validation"].features["label"].names == names
    assert [names[i] for i in loaded["train"]["label"]] == train["labels"]
    assert [names[i] for i in loaded["validation"]["label"]] == ["moose", "ant"]


def test_integer_labels_are_sorted_numerically(tmp_path):
    train = image_dataset(3, ["a", "b", "c"], label_values=[10, 3, 7])
    loaded = load_image_datasets(DataArguments(dataset_name=save({"train": train}, tmp_path / "s")), seed=0)
    assert loaded["train"].features["label"].names == ["3", "7", "10"]
    both = datasets.concatenate_datasets([loaded["train"], loaded["validation"]])
    assert sorted(both["label"]) == [0] * 3 + [1] * 3 + [2] * 3


def test_file_path_strings_are_cast_to_images(image_folder, tmp_path):
    files = sorted((image_folder / "train").rglob("*.png"))
    table = datasets.Dataset.from_dict({"img": [str(f) for f in files], "label": [f.parent.name for f in files]})
    loaded = load_image_datasets(DataArguments(dataset_name=save({"train": table}, tmp_path / "s")), seed=0)
    assert isinstance(loaded["train"].features["image"], datasets.Image)
    assert isinstance(loaded["train"][0]["image"], Image.Image)


def test_image_paths_that_do_not_decode_fail_before_training(tmp_path):
    table = datasets.Dataset.from_dict({"image": [str(tmp_path / "gone_1.png"), str(tmp_path / "gone_2.png")] * 2,
                                        "label": ["a", "b"] * 2})
    with pytest.raises(ValueError, match=r"2 file\(s\) in .* are not readable images: .*gone_1\.png \(FileNotFoundError"):
        load_image_datasets(DataArguments(dataset_name=save({"train": table, "validation": table}, tmp_path / "s")),
                            seed=0)


def test_explicit_column_names_win_and_are_checked(tmp_path):
    train = image_dataset(3, ["a", "b"]).add_column("other_label", ["u", "v"] * 3)
    path = save({"train": train}, tmp_path / "s")
    loaded = load_image_datasets(DataArguments(dataset_name=path, label_column_name="other_label"), seed=0)
    assert loaded["train"].features["label"].names == ["u", "v"]
    with pytest.raises(ValueError, match=r"'nope' is not a column.*\['image', 'label', 'other_label'\]"):
        load_image_datasets(DataArguments(dataset_name=path, image_column_name="nope"), seed=0)


# ---------------------------------------------------------------------------------- splits, truncation


def test_missing_validation_split_is_carved_seeded_and_stratified(tmp_path):
    path = save({"train": image_dataset(20, ["a", "b", "c"])}, tmp_path / "s")
    args = DataArguments(dataset_name=path, train_val_split=0.25)
    first, again = load_image_datasets(args, seed=3), load_image_datasets(args, seed=3)
    other = load_image_datasets(args, seed=4)
    assert (first.num_rows["train"], first.num_rows["validation"]) == (45, 15)
    assert num_examples_per_class(first["validation"]) == {"a": 5, "b": 5, "c": 5}

    def pixels(split):
        return [np.asarray(image).tobytes() for image in split["image"]]

    assert pixels(first["validation"]) == pixels(again["validation"])
    assert pixels(first["validation"]) != pixels(other["validation"])
    assert not set(pixels(first["validation"])) & set(pixels(first["train"]))


def test_tiny_classes_fall_back_to_an_unstratified_split(tmp_path):
    train = image_dataset(9, ["a", "b"]).select(range(10))  # a: 9 examples, b: 1
    loaded = load_image_datasets(DataArguments(dataset_name=save({"train": train}, tmp_path / "s")), seed=0)
    assert loaded.num_rows["train"] + loaded.num_rows["validation"] == 10


def test_eval_split_name_evaluates_on_the_named_split(tmp_path):
    """A train/test dataset (CIFAR-style): 'test' is used as is; unset, the evaluation split is carved from train."""
    test = image_dataset(3, ["a", "b"], seed=1)
    path = save({"train": image_dataset(10, ["a", "b"]), "test": test}, tmp_path / "s")
    named = load_image_datasets(DataArguments(dataset_name=path, eval_split_name="test", max_eval_samples=5), seed=0)
    assert (named.num_rows["train"], named.num_rows["validation"]) == (20, 5)  # all of train, test truncated
    test_pixels = {np.asarray(image).tobytes() for image in test["image"]}
    assert {np.asarray(image).tobytes() for image in named["validation"]["image"]} <= test_pixels
    assert named["validation"].features["label"].names == ["a", "b"]

    carved = load_image_datasets(DataArguments(dataset_name=path, train_val_split=0.25), seed=0)
    assert (carved.num_rows["train"], carved.num_rows["validation"]) == (15, 5)
    assert not {np.asarray(image).tobytes() for image in carved["validation"]["image"]} & test_pixels


def test_eval_split_name_also_picks_among_several_splits(image_folder):
    loaded = load_image_datasets(folder_args(image_folder, eval_split_name="validation"), seed=0)
    assert (loaded.num_rows["train"], loaded.num_rows["validation"]) == (15, 6)


def test_unknown_or_training_eval_split_name_is_refused_listing_the_splits(tmp_path):
    path = save({"train": image_dataset(2, ["a", "b"]), "test": image_dataset(1, ["a", "b"])}, tmp_path / "s")
    with pytest.raises(ValueError, match=r"--eval_split_name 'validation' is not a split of .*its splits: "
                                         r"\['test', 'train'\]"):
        load_image_datasets(DataArguments(dataset_name=path, eval_split_name="validation"), seed=0)
    with pytest.raises(ValueError, match="'train' would evaluate on the training data"):
        load_image_datasets(DataArguments(dataset_name=path, eval_split_name="train"), seed=0)
    with pytest.raises(ValueError, match="eval_split_name must be a split name"):
        load_image_datasets(DataArguments(dataset_name=path, eval_split_name=" "), seed=0)


def test_an_unlabeled_test_split_is_refused_by_its_name(tmp_path):
    """ImageNet-1k's Hub test split has label -1 everywhere: naming it must fail, not score nonsense."""
    test = image_dataset(1, ["a", "b"]).map(lambda example: {"label": -1})
    path = save({"train": image_dataset(2, ["a", "b"]), "test": test}, tmp_path / "s")
    with pytest.raises(ValueError, match=r"'test' split .* label ids \[-1\].*unlabeled"):
        load_image_datasets(DataArguments(dataset_name=path, eval_split_name="test"), seed=0)


def test_max_samples_truncate_after_a_seeded_shuffle(image_folder):
    args = folder_args(image_folder, max_train_samples=4, max_eval_samples=2)
    first, again = load_image_datasets(args, seed=0), load_image_datasets(args, seed=0)
    assert (first.num_rows["train"], first.num_rows["validation"]) == (4, 2)
    assert first["train"]["label"] == again["train"]["label"]
    assert [np.asarray(i).tobytes() for i in first["train"]["image"]] == \
        [np.asarray(i).tobytes() for i in again["train"]["image"]]
    # A shuffle, not the first rows (imagefolder lists the classes in order: the first 5 are all "blue").
    many = [load_image_datasets(folder_args(image_folder, max_train_samples=5), seed=s)["train"]["label"]
            for s in range(3)]
    assert any(len(set(labels)) > 1 for labels in many)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("arguments, message", [
    ({}, "No data given"),
    ({"dataset_name": "builtin:digits", "train_dir": "x"}, "not both"),
    ({"validation_dir": "x"}, "needs --train_dir"),
    ({"dataset_name": "builtin:digits", "train_val_split": 1.5}, "train_val_split"),
    ({"dataset_name": "builtin:digits", "train_val_split": 0.0}, "train_val_split"),
    ({"dataset_name": "builtin:digits", "max_train_samples": 0}, "max_train_samples"),
    ({"dataset_name": "builtin:digits", "max_eval_samples": -3}, "max_eval_samples"),
    ({"dataset_name": "builtin:nope"}, r"builtin:nope.*builtin:mnist5k, builtin:digits"),
])
def test_bad_arguments_raise_one_clear_value_error(arguments, message):
    with pytest.raises(ValueError, match=message):
        load_image_datasets(DataArguments(**arguments), seed=0)


def test_hub_ids_fail_offline_with_a_message_that_says_so():
    with pytest.raises(ValueError) as error:
        load_image_datasets(DataArguments(dataset_name="someone/no-such-dataset"), seed=0)
    text = str(error.value)
    assert "'someone/no-such-dataset'" in text and "unreachable" in text and "HF_HUB_OFFLINE" in text
    assert "--train_dir" in text and "builtin:mnist5k" in text


def test_missing_paths_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_datasets(DataArguments(train_dir=str(tmp_path / "missing")), seed=0)
    with pytest.raises(FileNotFoundError, match="validation_dir"):
        load_image_datasets(DataArguments(train_dir=str(tmp_path), validation_dir=str(tmp_path / "gone")), seed=0)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_image_datasets(DataArguments(dataset_name=str(tmp_path / "nothing_here")), seed=0)


def test_train_dir_without_class_folders_is_refused(tmp_path):
    make_image((1, 2, 3), "RGB", np.random.default_rng(0)).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match=r"no class sub-folders.*loose\.png"):
        load_image_datasets(DataArguments(train_dir=str(tmp_path)), seed=0)


@pytest.mark.parametrize("content", [b"this is not a PNG", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
def test_corrupt_images_are_named_before_anything_loads(tmp_path, content):
    root = write_image_folder(tmp_path / "data", train_modes=("RGB", "RGB"), validation_modes=("RGB",))
    bad = root / "train" / "green" / "broken.png"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=r"1 file\(s\) in .*not readable images: .*broken\.png"):
        load_image_datasets(folder_args(root), seed=0)
    shutil.move(bad, root / "broken.png")  # also checked when the folder is given as --dataset_name
    bad = root / "validation" / "red" / "broken.png"
    shutil.move(root / "broken.png", bad)
    with pytest.raises(ValueError, match="broken.png"):
        load_image_datasets(DataArguments(dataset_name=str(root)), seed=0)


def test_truncated_image_is_caught(tmp_path):
    root = write_image_folder(tmp_path / "data", train_modes=("RGB", "RGB"), validation_modes=("RGB",))
    victim = next((root / "train" / "red").glob("*.png"))
    victim.write_bytes(victim.read_bytes()[:-40])
    with pytest.raises(ValueError, match=victim.name):
        load_image_datasets(folder_args(root), seed=0)


def test_validation_classes_unknown_to_train_are_listed(tmp_path):
    root = write_image_folder(tmp_path / "data", train_modes=("RGB",), validation_modes=("RGB",))
    extra = root / "validation" / "purple"
    extra.mkdir()
    make_image((120, 0, 120), "RGB", np.random.default_rng(0)).save(extra / "p.png")
    with pytest.raises(ValueError, match=r"classes that --train_dir .* lacks: \['purple'\]"):
        load_image_datasets(folder_args(root), seed=0)


def test_split_folders_with_a_validation_only_class_are_refused(tmp_path):
    root = write_image_folder(tmp_path / "data", train_modes=("RGB",), validation_modes=("RGB",))
    extra = root / "validation" / "purple"
    extra.mkdir()
    make_image((120, 0, 120), "RGB", np.random.default_rng(0)).save(extra / "p.png")
    with pytest.raises(ValueError, match=r"classes the train split has no example of: \['purple'\]"):
        load_image_datasets(DataArguments(dataset_name=str(root)), seed=0)


def test_classlabel_mismatch_between_splits_lists_the_differing_names(tmp_path):
    path = save({"train": image_dataset(2, ["cat", "dog"]), "validation": image_dataset(2, ["cat", "cow"])},
                tmp_path / "s")
    with pytest.raises(ValueError, match=r"only in train: \['dog'\]; only in validation: \['cow'\]"):
        load_image_datasets(DataArguments(dataset_name=path), seed=0)
    path = save({"train": image_dataset(2, ["cat", "dog"]), "validation": image_dataset(2, ["dog", "cat"])},
                tmp_path / "order")
    with pytest.raises(ValueError, match="different order"):
        load_image_datasets(DataArguments(dataset_name=path), seed=0)


def test_string_label_unseen_in_train_is_refused(tmp_path):
    train = image_dataset(2, ["a", "b"], label_values=["ant", "bee"])
    validation = image_dataset(1, ["a", "b"], label_values=["ant", "wasp"])
    with pytest.raises(ValueError, match=r"only in validation: \['wasp'\]"):
        load_image_datasets(DataArguments(dataset_name=save({"train": train, "validation": validation},
                                                            tmp_path / "s")), seed=0)


def test_dataset_without_image_column_lists_its_columns(tmp_path):
    table = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    with pytest.raises(ValueError, match=r"no image column.*\['text', 'label'\]"):
        load_image_datasets(DataArguments(dataset_name=save({"train": table}, tmp_path / "s")), seed=0)


def test_image_column_that_is_not_an_image_is_refused(tmp_path):
    table = datasets.Dataset.from_dict({"image": [1.5, 2.5], "label": [0, 1]})
    with pytest.raises(ValueError, match="not an image"):
        load_image_datasets(DataArguments(dataset_name=save({"train": table}, tmp_path / "s")), seed=0)


def test_label_column_of_wrong_type_is_refused(tmp_path):
    table = image_dataset(2, ["a", "b"]).cast_column("label", datasets.Value("float32"))
    with pytest.raises(ValueError, match=r"has type .*float32.*expected a ClassLabel, string or integer"):
        load_image_datasets(DataArguments(dataset_name=save({"train": table}, tmp_path / "s")), seed=0)


def test_missing_train_split_and_empty_split_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"no 'train' split; it has: \['test'\]"):
        load_image_datasets(DataArguments(dataset_name=save({"test": image_dataset(2, ["a", "b"])},
                                                            tmp_path / "t")), seed=0)
    # datasets itself cannot save and reload an empty split, so hand one over directly.
    empty = datasets.DatasetDict({"train": image_dataset(2, ["a", "b"]), "validation": image_dataset(2, ["a", "b"])
                                  .select([])})
    monkeypatch.setattr(sources, "_load_source", lambda *args, **kwargs: empty)
    with pytest.raises(ValueError, match="'validation' split .* is empty"):
        load_image_datasets(DataArguments(dataset_name="owner/anything"), seed=0)


def test_empty_class_folders_are_refused(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class sub-folders with images"):
        load_image_datasets(DataArguments(train_dir=str(tmp_path / "train")), seed=0)


def test_single_class_and_unlabeled_examples_are_refused(tmp_path):
    with pytest.raises(ValueError, match="needs at least 2"):
        load_image_datasets(DataArguments(dataset_name=save({"train": image_dataset(4, ["only"])},
                                                            tmp_path / "one")), seed=0)
    unlabeled = image_dataset(2, ["a", "b"]).cast_column("label", datasets.Value("int64"))
    unlabeled = unlabeled.map(lambda ex: {"label": -1}).cast_column("label", datasets.ClassLabel(names=["a", "b"]))
    with pytest.raises(ValueError, match=r"label ids \[-1\] outside 0..1; unlabeled examples \(-1\)"):
        load_image_datasets(DataArguments(dataset_name=save({"train": image_dataset(2, ["a", "b"]),
                                                             "validation": unlabeled}, tmp_path / "u")), seed=0)


# -------------------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("mode", ["RGB", "P", "RGBA", "L", "LA", "CMYK", "1"])
def test_to_rgb_handles_every_common_mode(mode):
    image = make_image((200, 30, 30), "RGB", np.random.default_rng(0)).convert(mode)
    converted = ToRGB()(image)
    assert converted.mode == "RGB" and converted.size == image.size
    transparent_palette = Image.new("P", (4, 4))
    transparent_palette.info["transparency"] = 0
    assert ToRGB()(transparent_palette).mode == "RGB"
    assert ToRGB()(np.zeros((5, 6), dtype=np.uint8)).size == (6, 5)


@pytest.mark.parametrize("mode, pixels, expected", [
    ("I;16", np.full((3, 4), 65535, dtype=np.uint16), 255),
    ("I;16", np.full((3, 4), 32896, dtype=np.uint16), 128),
    ("I", np.full((3, 4), 100, dtype=np.int32), 100),
    ("F", np.full((3, 4), 0.5, dtype=np.float32), 128),
])
def test_to_rgb_rescales_high_bit_depth_grayscale(mode, pixels, expected):
    image = Image.fromarray(pixels)
    assert image.mode == mode
    converted = np.asarray(ToRGB()(image))
    assert converted.shape == (3, 4, 3) and (converted == expected).all()


def constant_image(colour=(200, 100, 50), size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


def expected_normalized(colour, mean, std, scale=1 / 255) -> torch.Tensor:
    return torch.tensor([(c * scale - m) / s for c, m, s in zip(colour, mean, std)])


def test_transforms_follow_a_vit_processor_size_mean_and_std():
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    processor = ViTImageProcessor(size={"height": 24, "width": 20}, image_mean=mean, image_std=std)
    train, evaluate = build_transforms(processor)
    for transform in (train, evaluate):
        out = transform(constant_image())
        assert out.shape == (3, 24, 20) and out.dtype == torch.float32
        # A constant image stays constant under any crop/flip/resize: only the normalization shows.
        torch.testing.assert_close(out.mean(dim=(1, 2)), expected_normalized((200, 100, 50), mean, std),
                                   atol=1e-4, rtol=0)


def test_eval_transform_is_the_processors_own_resize_and_crop():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    processor = ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.5)
    train, evaluate = build_transforms(processor)
    torch.testing.assert_close(evaluate(image), processor(image, return_tensors="pt")["pixel_values"][0])
    assert train(image).shape == (3, 32, 32)
    # Grayscale input is converted first, where the processor alone would see a single channel.
    assert evaluate(image.convert("L")).shape == (3, 32, 32)


def test_center_crop_processors_train_at_the_crop_size():
    processor = DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": 28, "width": 28})
    train, evaluate = build_transforms(processor)
    assert train(constant_image()).shape == evaluate(constant_image()).shape == (3, 28, 28)


def test_unnormalized_processors_give_rescaled_values():
    train, evaluate = build_transforms(ViTImageProcessor(size={"height": 8, "width": 8}, do_normalize=False))
    for transform in (train, evaluate):
        torch.testing.assert_close(transform(constant_image()).mean(dim=(1, 2)),
                                   torch.tensor([200 / 255, 100 / 255, 50 / 255]), atol=1e-4, rtol=0)
    train, _ = build_transforms(ViTImageProcessor(size={"height": 8, "width": 8}, do_normalize=False,
                                                  do_rescale=False))
    torch.testing.assert_close(train(constant_image()).mean(dim=(1, 2)), torch.tensor([200.0, 100.0, 50.0]))


def test_timm_processor_transforms_use_its_data_config(tiny_timm_dir):
    from timm.data.transforms import str_to_interp_mode
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_timm_dir)
    config = processor.data_config
    train, evaluate = build_transforms(processor)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (45, 60, 3), dtype=np.uint8))
    torch.testing.assert_close(evaluate(image), processor.val_transforms(image))
    assert train(image).shape == (3, *config["input_size"][1:])
    assert train.interpolation == str_to_interp_mode(config["interpolation"])
    torch.testing.assert_close(train(constant_image()).mean(dim=(1, 2)),
                               expected_normalized((200, 100, 50), config["mean"], config["std"]),
                               atol=1e-4, rtol=0)


def test_train_transform_is_random_and_eval_is_deterministic():
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    train, evaluate = build_transforms(processor)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    torch.manual_seed(0)
    assert not torch.equal(train(image), train(image))
    assert torch.equal(evaluate(image), evaluate(image))


def test_apply_transforms_and_collate_give_model_inputs(image_folder):
    loaded = load_image_datasets(folder_args(image_folder), seed=0)
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    transformed = apply_transforms(loaded, processor)
    assert set(transformed) == {"train", "validation"}
    assert isinstance(loaded["train"][0]["image"], Image.Image)  # the input is left untouched
    examples = [transformed["train"][i] for i in range(len(transformed["train"]))]  # RGB, P, RGBA and L files
    assert all(set(example) == {"pixel_values", "labels"} for example in examples)
    assert all(example["pixel_values"].shape == (3, 16, 16) for example in examples)
    batch = collate_fn(examples)
    assert batch["pixel_values"].shape == (15, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == loaded["train"]["label"]
    evaluation = [transformed["validation"][i]["pixel_values"] for i in range(2)]
    assert torch.equal(evaluation[0], transformed["validation"][0]["pixel_values"])
    loader = torch.utils.data.DataLoader(transformed["validation"], batch_size=4, collate_fn=collate_fn)
    assert [b["labels"].shape[0] for b in loader] == [4, 2]


def test_transforms_pickle_for_dataloader_workers(tiny_vit_dir, tiny_convnext_dir, tiny_timm_dir):
    import pickle

    from transformers import AutoImageProcessor

    image = constant_image()
    for folder in (tiny_vit_dir, tiny_convnext_dir, tiny_timm_dir):
        train, evaluate = pickle.loads(pickle.dumps(build_transforms(AutoImageProcessor.from_pretrained(folder))))
        assert train(image).shape == evaluate(image).shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------- seeding


class _TorchDraws(torch.utils.data.Dataset):
    """Each item is what an augmentation would draw from the CPU torch RNG."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> float:
        return torch.rand(()).item()


def test_per_example_seeding_touches_neither_cuda_generators_nor_the_global_cpu_state(monkeypatch):
    def no_cuda_reseed(*args, **kwargs):
        raise AssertionError("fetching an example reseeded the CUDA generators (dropout's RNG)")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", no_cuda_reseed)
    monkeypatch.setattr(torch.cuda, "manual_seed", no_cuda_reseed)
    dataset = PerExampleSeeded(_TorchDraws(), seed=3)
    torch.default_generator.manual_seed(0)
    state = torch.get_rng_state()
    first = dataset[1]
    assert torch.equal(torch.get_rng_state(), state), "the global CPU RNG state is unchanged by a fetch"
    assert dataset[1] == first and dataset[0] != first


def test_data_seed_follows_the_trainers_rule():
    from types import SimpleNamespace

    from cdb_hf.train_set import data_seed

    assert data_seed(SimpleNamespace(seed=3, data_seed=None)) == 3
    assert data_seed(SimpleNamespace(seed=3, data_seed=11)) == 11


# ----------------------------------------------------------------------------------------- training set


def _train_images(image_folder, augmentation="crop_flip", cache_bytes=2**20, seed=7, processor=None):
    from cdb_hf.train_set import TrainImages

    loaded = load_image_datasets(folder_args(image_folder), seed=0)
    processor = processor or ViTImageProcessor(size={"height": 16, "width": 16})
    train, _ = build_transforms(processor, augmentation)
    return TrainImages(loaded["train"], train, seed=seed, cache_bytes=cache_bytes)


def test_training_augmentation_is_a_pure_function_of_seed_epoch_and_index(image_folder):
    dataset = _train_images(image_folder)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = [dataset[i]["pixel_values"] for i in range(len(dataset))]
    assert torch.equal(torch.get_rng_state(), state), "fetching draws nothing from the global RNG"
    again = _train_images(image_folder)  # a fresh object, e.g. a resumed run or a dataloader worker
    for index in reversed(range(len(dataset))):  # in any order
        assert torch.equal(again[index]["pixel_values"], first[index])
    dataset.set_epoch(1)
    next_epoch = [dataset[i]["pixel_values"] for i in range(len(dataset))]
    assert sum(not torch.equal(a, b) for a, b in zip(first, next_epoch)) >= len(first) - 1, "new epoch, new crops"
    other_seed = _train_images(image_folder, seed=8)
    assert any(not torch.equal(other_seed[i]["pixel_values"], first[i]) for i in range(len(first)))


@pytest.mark.parametrize("augmentation", ["crop_flip", "crop", "none"])
def test_image_cache_gives_the_tensors_of_decoding_at_each_fetch(image_folder, augmentation):
    cached = _train_images(image_folder, augmentation, cache_bytes=2**20)
    uncached = _train_images(image_folder, augmentation, cache_bytes=0)
    assert cached.cached and not uncached.cached
    for index in range(len(cached)):  # RGB, P, RGBA and L files
        left, right = cached[index], uncached[index]
        assert left["labels"] == right["labels"]
        assert torch.equal(left["pixel_values"], right["pixel_values"])
    # A training set that does not fit is decoded at each fetch instead, with the same result.
    too_small = _train_images(image_folder, augmentation, cache_bytes=32 * 32 * 3 * 4)
    assert not too_small.cached and torch.equal(too_small[3]["pixel_values"], cached[3]["pixel_values"])


def test_training_labels_follow_a_selection_of_the_split(image_folder):
    """The labels are read from Arrow in one go: a selected or shuffled split (indices mapping) keeps its order."""
    from cdb_hf.train_set import TrainImages

    split = load_image_datasets(folder_args(image_folder), seed=0)["train"]
    picked = split.shuffle(seed=3).select([4, 0, 5, 1])
    dataset = TrainImages(picked, lambda image, rng: torch.zeros(1), seed=0)
    assert dataset.labels == [picked[i]["label"] for i in range(4)] == [example["label"] for example in picked]
    assert all(type(label) is int for label in dataset.labels) and len(set(split["label"])) > 1

def test_start_up_reads_no_column_row_by_row(image_folder, monkeypatch):
    """Loading, checking and the training set read the labels in Arrow passes: a column read row by row through
    datasets' formatter cost ~80 us per example (16 s per 200k images, every launch)."""
    from cdb_hf.train_set import TrainImages

    def refuse(self):
        raise AssertionError(f"{type(self).__name__} iterated row by row at start-up")

    def no_copy(self, *args, **kwargs):
        raise AssertionError("a selected split's table was copied (flatten_indices) to read its labels")

    monkeypatch.setattr(datasets.Dataset, "__iter__", refuse)
    if hasattr(datasets.arrow_dataset, "Column"):  # datasets >= 4: ds["label"] is a lazy column
        monkeypatch.setattr(datasets.arrow_dataset.Column, "__iter__", refuse)
    monkeypatch.setattr(datasets.Dataset, "flatten_indices", no_copy)  # what Dataset.unique does to a selection
    loaded = load_image_datasets(folder_args(image_folder, max_train_samples=5), seed=0)  # a selection
    dataset = TrainImages(loaded["train"], lambda image, rng: torch.zeros(1), seed=0, cache_bytes=2**20)
    assert dataset.cached and len(dataset.labels) == len(loaded["train"]) == 5
    run._warn_about_unseen_classes(loaded, loaded["train"].features["label"].names)
    assert sum(num_examples_per_class(loaded["train"]).values()) == 5


def test_labels_missing_from_a_classlabel_split_are_refused_in_one_line():
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    splits = {"train": datasets.Dataset.from_dict({"image": [None] * 3, "label": [0, 1, None]}, features=features)}
    with pytest.raises(ValueError, match=r"'train' split of 'src' has examples without a label"):
        sources._unify_labels(splits, "src")

def test_a_split_that_will_not_fit_the_image_cache_is_given_up_after_a_sample(monkeypatch):
    """Projected from the first 256 images' mean size, not decoded up to the cap and then dropped."""
    from cdb_hf import train_set

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(1000)]
    split = datasets.Dataset.from_dict({"image": images, "label": [0] * 1000},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "label": datasets.ClassLabel(names=["a"])}))
    decoded = []
    real = train_set.to_uint8_chw
    monkeypatch.setattr(train_set, "to_uint8_chw", lambda image: decoded.append(1) or real(image))
    one = 8 * 8 * 3
    assert train_set._decode_into_memory(split, 750 * one) is None  # 1000 images: 1.33x the cap
    assert len(decoded) == 256  # the cap alone would have decoded 750 first
    decoded.clear()
    fits = train_set._decode_into_memory(split, 1000 * one)
    assert len(fits) == 1000 == len(decoded) and torch.equal(fits[999], real(images[999]))

def test_crop_draws_the_same_boxes_as_crop_flip_without_the_flip(image_folder):
    crop, crop_flip = _train_images(image_folder, "crop"), _train_images(image_folder, "crop_flip")
    flipped = 0
    for epoch in range(4):
        crop.set_epoch(epoch)
        crop_flip.set_epoch(epoch)
        for index in range(len(crop)):
            plain, maybe_flipped = crop[index]["pixel_values"], crop_flip[index]["pixel_values"]
            assert torch.equal(plain, maybe_flipped) or torch.equal(plain.flip(-1), maybe_flipped)
            flipped += not torch.equal(plain, maybe_flipped)
    assert 0 < flipped < 4 * len(crop)


def test_no_augmentation_trains_on_the_processors_own_pixels(image_folder):
    processor = ConvNextImageProcessor(size={"shortest_edge": 16}, crop_pct=0.5)
    dataset = _train_images(image_folder, "none", processor=processor)
    loaded = load_image_datasets(folder_args(image_folder), seed=0)
    for index in range(len(dataset)):
        expected = processor(loaded["train"][index]["image"].convert("RGB"), return_tensors="pt")["pixel_values"][0]
        assert torch.equal(dataset[index]["pixel_values"], expected)


def test_eval_transform_gives_the_logits_of_the_processors_own_preprocessing(image_folder, tiny_vit_dir):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(tiny_vit_dir)
    model = AutoModelForImageClassification.from_pretrained(tiny_vit_dir).eval()
    evaluation = apply_transforms(load_image_datasets(folder_args(image_folder), seed=0), processor)["validation"]
    images = [image.convert("RGB") for image in load_image_datasets(folder_args(image_folder), seed=0)
              ["validation"]["image"]]
    with torch.no_grad():
        ours = model(pixel_values=collate_fn([evaluation[i] for i in range(len(images))])["pixel_values"]).logits
        reference = model(**processor(images, return_tensors="pt")).logits
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_train_transform_on_uint8_tensors_matches_a_pil_resize_closely():
    """The tensor path resizes as PIL does up to rounding: a smooth image gives nearly the same pixels."""
    from cdb_hf.transforms import TrainTransform, to_uint8_chw

    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    vertical = np.tile(np.linspace(0, 255, 48, dtype=np.uint8)[:, None], (1, 64))
    image = Image.fromarray(np.stack([ramp, vertical, 255 - ramp], axis=-1))
    transform = TrainTransform((24, 24), v2.InterpolationMode.BILINEAR, [0.0] * 3, [1.0] * 3, 1.0, flip=False)
    top, left, height, width = 4, 6, 40, 50
    ours = v2.functional.resized_crop(to_uint8_chw(image), top, left, height, width, [24, 24], antialias=True)
    pil = v2.functional.pil_to_tensor(v2.functional.resized_crop(image, top, left, height, width, [24, 24]))
    assert (ours.int() - pil.int()).abs().max() <= 2
    assert torch.equal(transform.normalize(ours), ours.float())  # mean 0, std 1, scale 1: the pixel values


def test_a_negative_image_cache_size_is_refused_before_any_work(tmp_path, image_folder):
    from cdb_hf.cli import parse_args
    from cdb_hf.errors import UsageError
    from cdb_hf.preflight import plan_run

    argv = ["--model_name_or_path", "builtin:efficientnet_lite0", "--train_dir", str(image_folder / "train"),
            "--output_dir", str(tmp_path / "out"), "--do_train", "--use_cpu", "--report_to", "none",
            "--train_image_cache_mb", "-1"]
    with pytest.raises(UsageError, match="--train_image_cache_mb must be a whole number of MiB >= 0"):
        plan_run(*parse_args(argv))
    assert not (tmp_path / "out").exists()


def test_an_unknown_train_augmentation_is_refused_by_name():
    from cdb_hf.transforms import build_transforms

    with pytest.raises(ValueError, match="train_augmentation 'rotate'"):
        build_transforms(ViTImageProcessor(size={"height": 16, "width": 16}), "rotate")
