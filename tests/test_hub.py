"""Outputs, model card and Hub upload (the network boundary replaced), without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, RepoUrl
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import filter_repo_objects
from transformers import (
    AutoModelForImageClassification,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

import cdb_hf.hub
import cdb_hf.hub_auth
from cdb_hf.arguments import DataArguments, ModelArguments
from cdb_hf.core import ChannelDropBackConfig
from cdb_hf.hub import push_outputs, save_outputs, write_model_card
from cdb_hf.hub_auth import check_can_push

METRICS = {"train_loss": 0.9, "train_runtime": 1.5, "epoch": 1.0, "eval_loss": 0.7, "eval_accuracy": 0.625,
           "eval_top5_accuracy": 1.0, "eval_runtime": 0.2}


@pytest.fixture
def tiny_vit():
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=8, num_labels=5)
    return ViTForImageClassification(config), ViTImageProcessor(size={"height": 16, "width": 16})


def test_save_outputs_writes_a_plain_checkpoint_and_the_records(tmp_path, tiny_vit):
    model, processor = tiny_vit
    config = ChannelDropBackConfig(channel_rate=0.4, mode="exact")
    save_outputs(tmp_path / "run", model, processor, config, METRICS, trainer_state={"global_step": 7})

    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "cdb_config.json", "all_results.json",
            "train_results.json", "eval_results.json", "trainer_state.json"} == names
    assert ChannelDropBackConfig.from_dict(json.loads((tmp_path / "run" / "cdb_config.json").read_text())) == config
    assert json.loads((tmp_path / "run" / "all_results.json").read_text()) == METRICS
    assert json.loads((tmp_path / "run" / "eval_results.json").read_text()) == {
        "eval_loss": 0.7, "eval_accuracy": 0.625, "eval_top5_accuracy": 1.0, "eval_runtime": 0.2, "epoch": 1.0}
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text()) == {"global_step": 7}
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "run")
    assert type(reloaded) is ViTForImageClassification

    save_outputs(tmp_path / "baseline", model, processor, None, METRICS)
    assert not (tmp_path / "baseline" / "cdb_config.json").exists(), "a baseline has no CDB config"


def test_model_card_records_base_model_dataset_cdb_and_metrics(tmp_path, tiny_vit):
    model, _ = tiny_vit
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, report_to="none",
                             hub_model_id="someone/vit-cifar10-cdb")
    config = ChannelDropBackConfig(channel_rate=0.4, layer_selection="bernoulli", layer_rate=0.3)
    # No Trainer log history (the accelerate loop): the final eval metrics feed the card.
    text = write_model_card(tmp_path, ModelArguments(model_name_or_path="google/vit-base-patch16-224-in21k"),
                            DataArguments(dataset_name="uoft-cs/cifar10"), config, METRICS, training_args=args,
                            model=model)

    card = ModelCard.load(tmp_path / "README.md")
    assert card.content == text
    assert card.data.base_model == "google/vit-base-patch16-224-in21k"
    assert card.data.datasets == ["uoft-cs/cifar10"]
    assert "channeldropback" in card.data.tags
    results = card.data.eval_results
    assert {(r.metric_type, r.metric_value) for r in results} >= {("accuracy", 0.625)}
    assert card.data.model_name == "vit-cifar10-cdb"
    assert "fine-tuned version of [google/vit-base-patch16-224-in21k]" in text
    assert "the uoft-cs/cifar10 dataset" in text
    assert "- layer_selection: bernoulli" in text and "- channel_rate: 0.4" in text and "- layer_rate: 0.3" in text
    assert "| eval_accuracy | 0.6250 |" in text and "train_runtime" not in text.split("### Final metrics")[1]
    assert "standard `ViTForImageClassification`" in text and "needs no extra code" in text
    assert "- learning_rate: 0.0003" in text


def test_model_card_names_the_multistep_schedule_not_the_trainer_default(tmp_path, tiny_vit):
    from cdb_hf.arguments import RunArguments

    model, _ = tiny_vit
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    run_args = RunArguments(lr_schedule="multistep", lr_milestones=[3, 6], lr_gamma=0.1)
    text = write_model_card(tmp_path, ModelArguments(model_name_or_path="google/vit-base-patch16-224-in21k"),
                            DataArguments(dataset_name="uoft-cs/cifar10"), None, METRICS, training_args=args,
                            model=model, run_args=run_args)
    assert "- lr_scheduler_type: multistep (x0.1 from epochs 3, 6)" in text
    assert "lr_scheduler_type: linear" not in text
    official = write_model_card(tmp_path, ModelArguments(model_name_or_path="google/vit-base-patch16-224-in21k"),
                                DataArguments(dataset_name="uoft-cs/cifar10"), None, METRICS, training_args=args,
                                model=model, run_args=RunArguments(lr_schedule="multistep"))
    assert "multistep (x0.1 from 30/60/85 % of the epochs (official))" in official


def test_model_card_of_a_local_baseline_has_no_broken_links(tmp_path, tiny_vit):
    model, _ = tiny_vit
    base = tmp_path / "my_checkpoint"
    base.mkdir()
    text = write_model_card(tmp_path / "out", ModelArguments(model_name_or_path=str(base)),
                            DataArguments(train_dir=str(tmp_path / "images")), None, {"eval_accuracy": 0.5},
                            model=model)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model is None, "a local folder is not a Hub repo"
    assert f"fine-tuned version of `{base}`" in text and "huggingface.co/" + str(base) not in text
    assert "**without** ChannelDropBack" in text


def test_push_outputs_uploads_the_folder_without_checkpoints(tmp_path, monkeypatch):
    output_dir = tmp_path / "my-run"
    (output_dir / "checkpoint-2").mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "README.md", "checkpoint-2/optimizer.pt",
                 "checkpoint-2/training_args.bin", "training_args.bin"):
        (output_dir / name).write_text("x")
    calls = {}

    def fake_create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs, self.token)
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

    def fake_upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, allow_patterns=None, **kwargs):
        files = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
        calls["upload"] = (repo_id, list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)), self.token)

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    args = TrainingArguments(output_dir=str(output_dir), report_to="none", hub_private_repo=True,
                             hub_token="hf_secret")
    assert push_outputs(output_dir, args) == "me/my-run"
    assert calls["create_repo"] == ("my-run", {"private": True, "exist_ok": True}, "hf_secret")
    assert calls["upload"] == ("me/my-run", ["README.md", "config.json", "model.safetensors"], "hf_secret")

    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, branch, **kwargs: calls.update(
        branch=(repo_id, branch)))
    args = TrainingArguments(output_dir=str(output_dir), report_to="none", hub_model_id="me/other",
                             hub_revision="experiment-1")
    assert push_outputs(output_dir, args) == "me/other"
    assert calls["branch"] == ("me/other", "experiment-1") and calls["upload"][0] == "me/other"


def test_push_is_refused_up_front_when_offline(monkeypatch):
    args = TrainingArguments(output_dir="unused", report_to="none", push_to_hub=True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set"):
        check_can_push(args)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(cdb_hf.hub_auth, "get_token", lambda: None)
    with pytest.raises(ValueError, match="--push_to_hub needs a Hugging Face token"):
        check_can_push(args)
    monkeypatch.setattr(cdb_hf.hub_auth, "get_token", lambda: "hf_cached")
    check_can_push(args)


@pytest.mark.parametrize("trainer", ["hf", "accelerate"])
@pytest.mark.parametrize("situation", ["offline", "no token"])
def test_a_run_that_cannot_push_is_told_before_training(situation, trainer, tmp_path, tiny_vit_dir, image_folder,
                                                        monkeypatch):
    """README, outputs: a machine that is offline or has no token is told so before training, in a real run."""
    from test_cli import finetune_argv, run_quietly

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", situation == "offline")
    monkeypatch.setattr(cdb_hf.hub_auth, "get_token", lambda: None)
    output_dir = tmp_path / "out"

    code, printed = run_quietly(finetune_argv(tiny_vit_dir, image_folder, output_dir, "--trainer", trainer,
                                              "--push_to_hub", "true", "--hub_model_id", "me/run"))

    expected = "HF_HUB_OFFLINE is set" if situation == "offline" else "needs a Hugging Face token"
    assert code == 2 and printed.count("\n") == 1 and expected in printed, printed
    assert printed.startswith("run_finetune.py: error: --push_to_hub needs")
    assert not output_dir.exists(), "refused before the run folder (made before training) was made"

