"""Every recipe parses into the argument dataclasses and passes pre-flight; one recipe per experiment (the
baseline is --cdb false); the offline recipe runs (truncated) end to end and is what the demo reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from torch import nn

from cdb_hf import ChannelDropBack, ChannelDropBackConfig, cli
from cdb_hf.demo import recipe_path
from cdb_hf.preflight import plan_run

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))

# The paper's fine-tuning results (METHOD.md, Tables 1 and 2): recipe stem -> (CDB, baseline) top-1 %.
PAPER = {
    "vit-b16_cifar10": ("98.80", "98.95"), "vit-b16_cifar100": ("92.20", "91.67"),
    "vit-b16_imagenet": ("82.03", "81.32"), "vit-l16_cifar10": ("99.08", "99.04"),
    "vit-l16_cifar100": ("93.44", "93.25"), "vit-l16_imagenet": ("83.13", "82.94"),
    "resnet50_svhn": ("95.37", "95.31"), "resnet50_cifar10": ("97.45", "97.38"),
    "resnet50_cifar100": ("84.90", "84.20"),
}
# The 384 px rows fine-tune the 224 px checkpoints at image_size 384 (position embeddings resized).
PAPER_384 = {"vit-b16-384_imagenet": ("83.90", "83.32"), "vit-l16-384_imagenet": ("85.05", "85.05")}
PAPER_RECIPES = [*PAPER, *PAPER_384, "convnext-tiny_cifar100"]
HUB_IDS = {"vit-b16": "google/vit-base-patch16-224-in21k", "vit-l16": "google/vit-large-patch16-224-in21k",
           "resnet50": "microsoft/resnet-50", "convnext-tiny": "facebook/convnext-tiny-224"}
DATASET_IDS = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100", "svhn": "ufldl-stanford/svhn",
               "imagenet": "ILSVRC/imagenet-1k"}
# The paper reports test accuracy. CIFAR and SVHN on the Hub have train/test (SVHN also extra) and no
# validation split; ImageNet-1k's test split is unlabeled, so its labelled validation set is used.
EVAL_SPLITS = {"cifar10": "test", "cifar100": "test", "svhn": "test", "imagenet": "validation"}


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _is_offline(path: Path) -> bool:
    return str(_raw(path)["model_name_or_path"]).startswith("builtin:")


def test_the_expected_recipes_exist_once_each():
    stems = {p.stem for p in RECIPES}
    assert set(PAPER_RECIPES) <= stems
    assert not [stem for stem in stems if stem.endswith("_baseline")], "a baseline is --cdb false, not a copy"
    assert [p.stem for p in RECIPES if _is_offline(p) and _raw(p).get("ab_seeds", 0) > 1] == [recipe_path().stem]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_validates(path, tmp_path):
    model_args, data_args, cdb_args, run_args, training_args = cli.parse_args([str(path)])
    assert model_args.model_name_or_path and (data_args.dataset_name or data_args.train_dir)
    assert cdb_args.cdb is True
    training_args.output_dir = str(tmp_path / "out")  # validation must not depend on the checkout
    plan = plan_run(model_args, data_args, cdb_args, run_args, training_args)
    assert plan.cdb_config is not None and plan.output_mode == "fresh"
    assert _raw(path)["output_dir"].endswith(path.stem) and _raw(path)["run_name"] == path.stem
    assert training_args.do_train and training_args.do_eval


@pytest.mark.parametrize("stem", PAPER_RECIPES)
def test_paper_recipes_follow_the_official_fine_tuning_code(stem):
    path = RECIPES_DIR / f"{stem}.yaml"
    raw = _raw(path)
    model_key, dataset_key = re.match(r"([a-z0-9-]+?)(?:-384)?_(\w+)$", stem).groups()
    assert raw["model_name_or_path"] == HUB_IDS[model_key] and raw["dataset_name"] == DATASET_IDS[dataset_key]
    _, _, cdb_args, _, training_args = cli.parse_args([str(path)])
    assert training_args.optim == "sgd" and training_args.optim_args == "momentum=0.9,nesterov=True"
    assert (training_args.learning_rate, training_args.weight_decay) == (0.01, 1e-4)
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    assert batch == 1024 and training_args.num_train_epochs == 85
    config = cdb_args.to_config()
    assert (config.layer_selection, config.axis, config.mode, config.rescale) == ("bernoulli", "cols", "grad", True)
    assert (config.channel_rate, config.layer_rate_init, config.layer_rate, config.schedule) == (0.3, 0.03, 0.3, "step")
    assert raw["eval_split_name"] == EVAL_SPLITS[dataset_key] and "train_val_split" not in raw
    assert raw.get("image_size") == (384 if stem in PAPER_384 else None)
    header = path.read_text().split("\n\n")[0]
    if stem in {**PAPER, **PAPER_384}:
        cdb_number, baseline_number = {**PAPER, **PAPER_384}[stem]
        assert f"CDB {cdb_number} vs baseline {baseline_number}" in header
    else:
        assert "no reported numbers" in header


def _official_eligible(model: nn.Module, skip: int) -> set[str]:
    """The official SGD_Dropback rule: after the first `skip` named_parameters, no 'bias'/'bn', >= 2 dims."""
    return {name for index, (name, param) in enumerate(model.named_parameters())
            if index >= skip and "bias" not in name and "bn" not in name and param.dim() >= 2}


def _tiny(kind: str) -> nn.Module:
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    if kind == "vit":
        return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=64, image_size=32, patch_size=8))
    if kind == "resnet":
        return ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                         layer_type="bottleneck"))
    return ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))


@pytest.mark.parametrize("kind", ["vit", "resnet", "convnext"])
def test_skip_first_1_is_the_official_skip_init_layers_3(kind):
    """The recipes' comment: on these architectures the official skip of 3 named_parameters entries and our
    skip of 1 eligible layer leave the same Linear/Conv weights to CDB."""
    model = _tiny(kind)
    ours = ChannelDropBack(model, ChannelDropBackConfig(axis="cols", skip_first=1)).layers
    all_typed = ChannelDropBack(model, ChannelDropBackConfig(axis="cols")).layers
    assert set(ours) == _official_eligible(model, skip=3) & set(all_typed)
    assert len(ours) == len(all_typed) - 1


@pytest.mark.parametrize("stem", PAPER_384)
def test_384_recipes_resize_a_224_px_patch16_checkpoint_to_a_24x24_grid(stem, tmp_path):
    """The ViT-B/16 and ViT-L/16 in21k checkpoints' geometry (224 px, patch 16, ViTImageProcessor 224x224) in
    a tiny model: the recipe's model arguments give 577 position embeddings and 384 px inputs."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from cdb_hf.models import load_model_and_processor

    ViTForImageClassification(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, image_size=224, patch_size=16)).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3) \
        .save_pretrained(tmp_path)
    model_args = cli.parse_args([str(RECIPES_DIR / f"{stem}.yaml")])[0]
    model_args.model_name_or_path = str(tmp_path)
    model, processor = load_model_and_processor(model_args, ["a", "b"])
    assert model.vit.embeddings.position_embeddings.shape[1] == 1 + 24 * 24
    assert (processor.size.height, processor.size.width) == (384, 384)


@pytest.mark.parametrize("path", [p for p in RECIPES if _is_offline(p)], ids=lambda p: p.stem)
def test_offline_recipe_runs_on_truncated_data(path, tmp_path):
    output_dir = tmp_path / "run"
    argv = [str(path), "--output_dir", str(output_dir), "--max_steps", "1", "--max_train_samples", "4",
            "--max_eval_samples", "4", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
            "--eval_strategy", "no", "--log_level", "error"]
    if _raw(path).get("ab_seeds", 0) > 1:
        argv += ["--ab_seeds", "1"]
    assert cli.main(argv) == 0
    if _raw(path).get("ab_seeds", 0) > 1:
        results = json.loads((output_dir / "results.json").read_text())
        assert results["summary"]["complete_seeds"] == [_raw(path).get("seed", 42)]
    else:
        metrics = json.loads((output_dir / "all_results.json").read_text())
        assert 0.0 <= metrics["eval_accuracy"] <= 1.0
        assert (output_dir / "cdb_config.json").is_file()
