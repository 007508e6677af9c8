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
from cdb_hf.optimization import lr_milestone_epochs
from cdb_hf.preflight import official_cdb_phase_starts, plan_run

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


# The official StepLR_Dropback rates, in phase order.
OFFICIAL_CDB_RATES = [0.03, 0.15, 0.3]


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _official_cdb_phase_starts(epochs: int) -> list[int]:
    """The first epoch of each later phase of the official StepLR_Dropback (SGD_Dropback.py), simulated: its
    rate starts at init and, stepped after every epoch, compares its epoch counter with round(0.3E), round(0.6E)
    before incrementing it."""
    milestones = [round(epochs * 0.3), round(epochs * 0.6)]
    rates, rate = [], "init"
    for counter in range(epochs):
        rates.append(rate)
        rate = "final" if counter > milestones[1] else "half" if counter > milestones[0] else "init"
    return [rates.index(phase) for phase in ("half", "final") if phase in rates]


def _official_lr_milestones(epochs: int) -> list[int]:
    """fine_tune.py's MultiStepLR milestones (stepped once per epoch)."""
    return [round(epochs * 0.3), round(epochs * 0.6), round(epochs * 0.85)]


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
def test_paper_recipes_follow_the_official_fine_tuning_code(stem, tmp_path):
    path = RECIPES_DIR / f"{stem}.yaml"
    raw = _raw(path)
    model_key, dataset_key = re.match(r"([a-z0-9-]+?)(?:-384)?_(\w+)$", stem).groups()
    assert raw["model_name_or_path"] == HUB_IDS[model_key] and raw["dataset_name"] == DATASET_IDS[dataset_key]
    _, _, cdb_args, run_args, training_args = cli.parse_args([str(path)])
    assert training_args.optim == "sgd" and training_args.optim_args == "momentum=0.9,nesterov=True"
    assert (training_args.learning_rate, training_args.weight_decay) == (0.01, 1e-4)
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    assert batch == 1024 and training_args.num_train_epochs == 85
    # MultiStepLR x0.1 at the official epochs, decay on every parameter, no clipping.
    epochs = int(training_args.num_train_epochs)
    # Milestones unset: the official rule for the run's own E (so another --num_train_epochs moves them).
    assert (run_args.lr_schedule, run_args.lr_milestones, run_args.lr_gamma) == ("multistep", None, 0.1)
    assert lr_milestone_epochs(run_args.lr_milestones, epochs) == _official_lr_milestones(epochs)
    assert run_args.weight_decay_all is True and training_args.max_grad_norm == 0
    assert "lr_scheduler_type" not in raw and "warmup_steps" not in raw
    config = cdb_args.to_config(schedule_milestones=official_cdb_phase_starts(epochs))  # pre-flight fills them in
    assert (config.layer_selection, config.axis, config.mode, config.rescale) == ("bernoulli", "cols", "grad", True)
    assert (config.channel_rate, config.layer_rate_init, config.layer_rate) == (0.3, 0.03, 0.3)
    # The official per-epoch CDB rate schedule, from the official rule for this recipe's epoch count.
    assert (raw["cdb_schedule"], raw["cdb_schedule_unit"]) == ("piecewise", "epochs")
    assert "cdb_schedule_milestones" not in raw and official_cdb_phase_starts(epochs) == _official_cdb_phase_starts(epochs)
    assert raw["cdb_schedule_rates"] == OFFICIAL_CDB_RATES
    assert config.skip_first == (2 if model_key == "resnet50" else 1)
    assert raw["eval_split_name"] == EVAL_SPLITS[dataset_key] and "train_val_split" not in raw
    assert raw.get("image_size") == (384 if stem in PAPER_384 else None)
    header = path.read_text().split("\n\n")[0]
    assert "Remaining differences from the official fine_tune.py" in header
    if stem in {**PAPER, **PAPER_384}:
        cdb_number, baseline_number = {**PAPER, **PAPER_384}[stem]
        assert f"CDB {cdb_number} vs baseline {baseline_number}" in header
    else:
        assert "no reported numbers" in header


def test_the_official_boundaries_for_known_epoch_counts():
    """METHOD.md's worked examples of the official schedules, so the simulations above cannot drift."""
    assert _official_cdb_phase_starts(85) == [28, 53] and _official_cdb_phase_starts(10) == [5, 8]
    assert _official_lr_milestones(85) == [26, 51, 72] and _official_lr_milestones(10) == [3, 6, 8]


@pytest.mark.parametrize("stem", PAPER_RECIPES)
def test_paper_recipes_configure_the_official_cdb_schedule(stem, tmp_path):
    """Through the CLI parser and pre-flight, the recipe's piecewise schedule is the official one per epoch."""
    path = RECIPES_DIR / f"{stem}.yaml"
    model_args, data_args, cdb_args, run_args, training_args = cli.parse_args([str(path)])
    training_args.output_dir = str(tmp_path / "out")
    config = plan_run(model_args, data_args, cdb_args, run_args, training_args).cdb_config
    epochs = int(training_args.num_train_epochs)
    assert (config.schedule, config.schedule_unit) == ("piecewise", "epochs")
    assert list(config.schedule_milestones) == _official_cdb_phase_starts(epochs)
    assert list(config.schedule_rates) == OFFICIAL_CDB_RATES
    # The rate each epoch gets: 5 optimizer steps per epoch, read at each epoch's first and last step.
    run_config = config.for_run(epochs * 5, 5)
    phases = [0] * epochs
    for boundary in _official_cdb_phase_starts(epochs):
        phases = [phase + (epoch >= boundary) for epoch, phase in enumerate(phases)]
    for epoch in range(epochs):
        expected = OFFICIAL_CDB_RATES[phases[epoch]]
        assert run_config.rate_at(epoch * 5) == pytest.approx(expected)
        assert run_config.rate_at(epoch * 5 + 4) == pytest.approx(expected)


def _official_eligible(model: nn.Module, skip: int) -> set[str]:
    """The official SGD_Dropback rule: index in named_parameters() > skip, no 'bias'/'bn', >= 2 dims."""
    return {name for index, (name, param) in enumerate(model.named_parameters())
            if index > skip and "bias" not in name and "bn" not in name and param.dim() >= 2}


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
    if kind == "resnet50":
        # ResNet-50's geometry in small: the stem's width differs from the first stage's (64 vs 256), so the
        # first block has a shortcut convolution, registered before the block's own convolutions.
        return ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1],
                                                         layer_type="bottleneck"))
    return ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))


@pytest.mark.parametrize("kind", ["vit", "resnet50", "convnext"])
def test_recipe_skip_first_is_the_official_skip_init_layers_3(kind):
    """The recipes' skip comment: the official skip of named_parameters entries 0-3 and the recipe's
    cdb_skip_first leave the same Linear/Conv weights to CDB."""
    stem = {"vit": "vit-b16_cifar10", "resnet50": "resnet50_cifar10", "convnext": "convnext-tiny_cifar100"}[kind]
    skip_first = _raw(RECIPES_DIR / f"{stem}.yaml")["cdb_skip_first"]
    model = _tiny(kind)
    ours = ChannelDropBack(model, ChannelDropBackConfig(axis="cols", skip_first=skip_first)).layers
    all_typed = ChannelDropBack(model, ChannelDropBackConfig(axis="cols")).layers
    assert set(ours) == _official_eligible(model, skip=3) & set(all_typed)
    assert len(ours) == len(all_typed) - skip_first


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
    """The offline A/B recipe, one seed, truncated: every arm trains, evaluates the same 4 images, and the
    summary reports each arm's own result and their paired difference; only the CDB arm has CDB, the recipe's."""
    raw = _raw(path)
    output_dir = tmp_path / "run"
    argv = [str(path), "--output_dir", str(output_dir), "--max_steps", "1", "--max_train_samples", "4",
            "--max_eval_samples", "4", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
            "--eval_strategy", "no", "--log_level", "error", "--ab_seeds", "1"]
    assert cli.main(argv) == 0
    summary = json.loads((output_dir / "results.json").read_text())["summary"]
    seed = raw.get("seed", 42)
    assert summary["complete_seeds"] == [seed] and not summary["failed_runs"]
    accuracy = summary["metrics"]["eval_accuracy"]
    for arm in summary["arms"]:
        results = json.loads((output_dir / f"seed{seed}" / arm / "all_results.json").read_text())
        state = json.loads((output_dir / f"seed{seed}" / arm / "trainer_state.json").read_text())
        assert state["global_step"] == 1
        assert results["eval_accuracy"] * 4 == round(results["eval_accuracy"] * 4), "4 images evaluated"
        assert accuracy[arm]["mean"] == results["eval_accuracy"] and accuracy[arm]["n"] == 1
        assert (output_dir / f"seed{seed}" / arm / "cdb_config.json").is_file() == (arm == "cdb")
    assert accuracy["difference"]["mean"] == pytest.approx(accuracy["cdb"]["mean"] - accuracy["baseline"]["mean"])
    cdb = json.loads((output_dir / f"seed{seed}" / "cdb" / "cdb_config.json").read_text())
    assert {key: cdb[key.removeprefix("cdb_")] for key in raw if key.startswith("cdb_")} == \
        {key: value for key, value in raw.items() if key.startswith("cdb_")}


# The paper recipe's own keys that name its Hub model, data and hardware: replaced by the tiny fixtures.
_HARDWARE_KEYS = ("model_name_or_path", "dataset_name", "image_column_name", "label_column_name", "eval_split_name",
                  "output_dir", "run_name", "per_device_train_batch_size", "per_device_eval_batch_size",
                  "gradient_accumulation_steps", "dataloader_num_workers", "eval_strategy", "save_strategy",
                  "save_total_limit", "logging_steps", "num_train_epochs")


@pytest.mark.parametrize("epochs,trainer", [(10, "hf"), (10, "accelerate"), (85, "hf")])
def test_a_paper_recipe_at_any_length_follows_the_official_rule_end_to_end(epochs, trainer, tmp_path, tiny_vit_dir,
                                                                           image_folder):
    """The logged learning rate and cdb/layer_rate of every epoch, through the CLI, for E = 10 and E = 85 (one
    optimizer step per epoch: 15 images, batch 16)."""
    raw = {k: v for k, v in _raw(RECIPES_DIR / "vit-b16_cifar100.yaml").items() if k not in _HARDWARE_KEYS}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    output_dir = tmp_path / "out"
    code = cli.main([str(recipe), "--model_name_or_path", str(tiny_vit_dir), "--train_dir",
                     str(image_folder / "train"), "--validation_dir", str(image_folder / "validation"),
                     "--output_dir", str(output_dir), "--num_train_epochs", str(epochs), "--trainer", trainer,
                     "--per_device_train_batch_size", "16", "--logging_steps", "1", "--eval_strategy", "no",
                     "--save_strategy", "no", "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true",
                     "--log_level", "error", "--dataloader_num_workers", "0"])
    assert code == 0
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    logged = {entry["step"]: entry for entry in history if "learning_rate" in entry}
    assert sorted(logged) == list(range(1, epochs + 1))
    lr_starts, cdb_starts = _official_lr_milestones(epochs), _official_cdb_phase_starts(epochs)
    for step, entry in logged.items():
        epoch = step - 1
        expected_lr = 0.01 * 0.1 ** sum(epoch >= m for m in lr_starts)
        expected_rate = OFFICIAL_CDB_RATES[sum(epoch >= m for m in cdb_starts)]
        assert entry["cdb/layer_rate"] == pytest.approx(expected_rate), (epoch, entry)
        assert entry["learning_rate"] == pytest.approx(expected_lr, rel=1e-6), (epoch, entry)


def test_explicit_milestones_past_the_run_are_refused(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    raw = _raw(RECIPES_DIR / "vit-b16_cifar100.yaml")
    raw.update(output_dir=str(tmp_path / "out"), lr_milestones=[26, 51, 72])
    recipe.write_text(yaml.safe_dump(raw))
    assert cli.main([str(recipe), "--num_train_epochs", "10"]) == 2
    assert "--lr_milestones [26, 51, 72] do not fit a run of 10 epochs" in capsys.readouterr().err
    raw.pop("lr_milestones")
    raw["cdb_schedule_milestones"] = [28, 53]
    recipe.write_text(yaml.safe_dump(raw))
    assert cli.main([str(recipe), "--num_train_epochs", "10"]) == 2
    assert "--cdb_schedule_milestones [28, 53] do not fit a run of 10 epochs" in capsys.readouterr().err
    assert cli.main([str(RECIPES_DIR / "vit-b16_cifar100.yaml"), "--max_steps", "5", "--output_dir",
                     str(tmp_path / "out")]) == 2
    assert "--max_steps sets the run's length in steps" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
