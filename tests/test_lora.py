"""LoRA fine-tuning from run_finetune.py (--lora_*): flags, pre-flight, saving, merging, resume, both paths.

What ChannelDropBack acts on inside a LoRA model is the core's business (tests/test_core.py); here CDB only
has to run on one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file
from test_cli import finetune_argv, run_quietly
from transformers import AutoConfig, AutoModelForImageClassification

from cdb_hf import cli
from cdb_hf.arguments import ModelArguments
from cdb_hf.hub import UPLOAD_IGNORE_PATTERNS
from cdb_hf.models import apply_lora, classifier_module_names, load_model_and_processor, resolve_lora_targets

peft = pytest.importorskip("peft")

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "preprocessor_config.json", "README.md",
                 "model_config/config.json", "cdb_config.json", "all_results.json", "trainer_state.json"}


def lora_args(**values) -> SimpleNamespace:
    defaults = {"lora_r": 4, "lora_alpha": None, "lora_dropout": 0.0, "lora_target_modules": None}
    return SimpleNamespace(**{**defaults, **values})


def cdb_applied(output_dir) -> list[float]:
    """The cdb/applied statistic of every training log of a finished run (CDB ran on those steps)."""
    history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    return [entry["cdb/applied"] for entry in history if "cdb/applied" in entry]


def adapter_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(output_dir) / "adapter_model.safetensors"))


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- flags
def test_lora_flags_fill_model_arguments():
    model_args, *_ = cli.parse_args(["--output_dir", "x", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout",
                                     "0.1", "--lora_target_modules", "q_proj", "o_proj", "--lora_merge", "true"])
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (8, 16, 0.1)
    assert model_args.lora_target_modules == ["q_proj", "o_proj"] and model_args.lora_merge is True
    default, *_ = cli.parse_args(["--output_dir", "x"])
    assert default.lora_r == 0 and default.lora_target_modules is None  # off unless asked for


@pytest.mark.parametrize(("flags", "expected"), [
    (["--lora_r", "-1"], "--lora_r -1 is not valid"),
    (["--lora_r", "4", "--lora_alpha", "0"], "--lora_alpha 0 is not valid"),
    (["--lora_r", "4", "--lora_dropout", "1.0"], "--lora_dropout 1.0 is not valid"),
    (["--lora_alpha", "16"], "--lora_alpha only applies to LoRA fine-tuning"),
    (["--lora_merge", "true"], "--lora_merge only applies to LoRA fine-tuning"),
    (["--lora_r", "4", "--lora_target_modules", "nope"], "--lora_target_modules 'nope' matches no layer"),
    (["--lora_r", "4", "--lora_target_modules", "layernorm_before"], "matches layers LoRA cannot adapt"),
])
def test_bad_lora_flags_are_refused_before_output_dir_changes(tmp_path, tiny_vit_dir, image_folder, flags,
                                                              expected):
    output_dir = tmp_path / "run"
    code, printed = run_quietly(finetune_argv(tiny_vit_dir, image_folder, output_dir, *flags))
    assert code == 2, printed
    error = printed.strip().splitlines()[-1]
    assert error.startswith("run_finetune.py: error:") and expected in error, error
    if "--lora_target_modules" in expected or "cannot adapt" in expected:
        assert "q_proj (x2)" in error and "fc1 (x2)" in error  # names the layers that do exist
    assert not output_dir.exists()


# ---------------------------------------------------------------------------------------------- targets
def test_default_targets_follow_the_architecture(tiny_vit_dir, tiny_convnext_dir, tiny_timm_dir):
    import timm

    def targets(model):
        return resolve_lora_targets(model, None, exclude=classifier_module_names(model))

    assert targets(AutoModelForImageClassification.from_pretrained(tiny_vit_dir)) == ["q_proj", "v_proj"]
    assert targets(AutoModelForImageClassification.from_pretrained(tiny_convnext_dir)) == ["pwconv1", "pwconv2"]
    # a timm checkpoint through TimmWrapper: the head is timm's get_classifier(), trained in full
    timm_resnet, _ = load_model_and_processor(ModelArguments(model_name_or_path=str(tiny_timm_dir), lora_r=2),
                                              ["a", "b", "c"])
    config = timm_resnet.peft_config["default"]
    assert sorted(config.target_modules) == ["conv2"] and config.modules_to_save == ["timm_model.fc"]
    assert resolve_lora_targets(timm.create_model("test_vit"), None) == ["qkv"]
    # test_efficientnet's conv_dw are grouped (depthwise) convolutions: never a default target
    assert resolve_lora_targets(timm.create_model("test_efficientnet"), None) == ["conv_pw", "conv_pwl"]


def test_trainable_parameters_are_what_lora_promises(tiny_vit_dir):
    """Base frozen; trainable = r * (in + out) per adapted layer, plus the whole classification head."""
    model = AutoModelForImageClassification.from_pretrained(tiny_vit_dir)
    head = sum(p.numel() for p in model.classifier.parameters())
    adapted = [m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    peft_model = apply_lora(model, lora_args(lora_r=4, lora_alpha=8))
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    expected = sum(4 * (m.in_features + m.out_features) for m in adapted) + head
    assert len(adapted) == 4 and sum(p.numel() for p in trainable.values()) == expected
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (4, 8, ["q_proj", "v_proj"])
    assert config.modules_to_save == ["classifier"]


def test_lora_with_a_resized_vit_is_refused(tmp_path, tiny_vit_dir, image_folder):
    code, printed = run_quietly(finetune_argv(tiny_vit_dir, image_folder, tmp_path / "run", "--lora_r", "4",
                                              "--image_size", "48"))
    assert code == 2 and "--image_size 48 with --lora_r is not supported" in printed
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_vit_dir, image_folder):
    """A LoRA + CDB fine-tuning of the tiny ViT on the Trainer path, merged at the end."""
    root = tmp_path_factory.mktemp("lora")

    def argv_for(out, *extra):
        return finetune_argv(tiny_vit_dir, image_folder, out, "--lora_r", "4", "--lora_alpha", "8",
                             "--cdb_channel_rate", "0.5", "--learning_rate", "1e-2", *extra)

    code, printed = run_quietly(argv_for(root / "run", "--lora_merge", "true"))
    assert code == 0, printed
    return SimpleNamespace(output_dir=root / "run", argv_for=argv_for, printed=printed, base=tiny_vit_dir)


def test_lora_run_saves_an_adapter_that_peft_loads(lora_run):
    out = lora_run.output_dir
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert ADAPTER_FILES <= files
    assert "model.safetensors" not in files and "config.json" not in files  # an adapter, not a full model
    assert cdb_applied(out) == [1.0, 1.0]  # ChannelDropBack ran on the LoRA model at every step
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    assert Path(adapter_config["base_model_name_or_path"]) == Path(lora_run.base)

    # The loading recipe of the README and the model card.
    config = AutoConfig.from_pretrained(out, subfolder="model_config")
    assert config.id2label == {0: "blue", 1: "green", 2: "red"}
    base = AutoModelForImageClassification.from_pretrained(
        peft.PeftConfig.from_pretrained(out).base_model_name_or_path, config=config, ignore_mismatched_sizes=True)
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    untouched = AutoModelForImageClassification.from_pretrained(lora_run.base).eval()
    merged = AutoModelForImageClassification.from_pretrained(out / "merged").eval()  # --lora_merge: plain model
    assert not hasattr(merged, "peft_config")
    with torch.no_grad():
        logits = loaded(pixel_values=images()).logits
        assert torch.allclose(logits, merged(pixel_values=images()).logits, atol=1e-5)
        assert not torch.allclose(logits, untouched(pixel_values=images()).logits, atol=1e-3)  # it trained
    # The base stayed frozen: in the merged model, every weight LoRA did not adapt is the checkpoint's, bitwise.
    reference = untouched.state_dict()
    kept = {name: tensor for name, tensor in merged.state_dict().items()
            if not name.startswith("classifier") and not name.endswith(("q_proj.weight", "v_proj.weight"))}
    assert len(kept) > 10 and all(torch.equal(tensor, reference[name]) for name, tensor in kept.items())
    adapted = [name for name in reference if name.endswith("q_proj.weight")]
    assert not any(torch.equal(merged.state_dict()[name], reference[name]) for name in adapted)


def test_the_merged_model_of_a_lora_run_evaluates_without_training(lora_run, image_folder, tmp_path):
    output_dir = tmp_path / "eval"
    code, printed = run_quietly(["--do_train", "false", "--model_name_or_path", str(lora_run.output_dir / "merged"),
                                 "--validation_dir", str(image_folder / "validation"), "--output_dir",
                                 str(output_dir), "--report_to", "none", "--use_cpu"])
    assert code == 0, printed
    results = json.loads((output_dir / "eval_results.json").read_text())
    trained = json.loads((lora_run.output_dir / "eval_results.json").read_text())
    assert results["eval_accuracy"] == pytest.approx(trained["eval_accuracy"])
    assert results["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-4)


def test_lora_card_and_push_staging(lora_run):
    out = lora_run.output_dir
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "- lora" in card and "PeftModel.from_pretrained" in card
    assert "rank 4, alpha 8" in card and "ChannelDropBack" in card
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    staged = set(filter_repo_objects(files, ignore_patterns=UPLOAD_IGNORE_PATTERNS))
    assert {"adapter_config.json", "adapter_model.safetensors", "model_config/config.json",
            "merged/model.safetensors", "merged/config.json", "preprocessor_config.json", "README.md"} <= staged
    assert not any(name.startswith("checkpoint-") for name in staged)


def test_lora_trainer_checkpoints_hold_the_adapter_and_resume_identically(lora_run, tmp_path):
    checkpoint = lora_run.output_dir / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    uninterrupted = tmp_path / "uninterrupted"
    code, printed = run_quietly(lora_run.argv_for(uninterrupted))
    assert code == 0, printed
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-2", resumed / "checkpoint-2")
    code, printed = run_quietly(lora_run.argv_for(resumed, "--resume_from_checkpoint", "true"))
    assert code == 0, printed
    left, right = adapter_weights(uninterrupted), adapter_weights(resumed)
    assert left.keys() == right.keys() and any("lora_B" in name for name in left)
    assert all(torch.equal(left[name], right[name]) for name in left), "the resumed adapter differs"


def test_resuming_with_other_lora_settings_is_refused(lora_run, tiny_vit_dir, image_folder, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(lora_run.output_dir / "checkpoint-2", run / "checkpoint-2")
    before = sorted(p.as_posix() for p in run.rglob("*"))
    plain = finetune_argv(tiny_vit_dir, image_folder, run, "--cdb_channel_rate", "0.5", "--learning_rate", "1e-2",
                          "--resume_from_checkpoint", "true")
    code, printed = run_quietly(plain)
    assert code == 2 and "holds a LoRA adapter; resume it with the same --lora_r" in printed, printed
    code, printed = run_quietly(lora_run.argv_for(run, "--lora_r", "8", "--resume_from_checkpoint", "true"))
    assert code == 2 and "saved with LoRA r=4, this run has 8" in printed, printed
    assert sorted(p.as_posix() for p in run.rglob("*")) == before


def test_lora_on_the_accelerate_loop_trains_and_resumes_identically(tmp_path, tiny_convnext_dir, image_folder):
    def argv_for(out, *extra):
        return finetune_argv(tiny_convnext_dir, image_folder, out, "--trainer", "accelerate", "--lora_r", "2",
                             "--cdb_channel_rate", "0.5", *extra)

    code, printed = run_quietly(argv_for(tmp_path / "run"))
    assert code == 0, printed
    weights = adapter_weights(tmp_path / "run")
    assert cdb_applied(tmp_path / "run") == [1.0, 1.0]
    assert any("pwconv1.lora_A" in name for name in weights) and "base_model.model.classifier.weight" in weights
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "run" / "checkpoint-2", resumed / "checkpoint-2")
    code, printed = run_quietly(argv_for(resumed, "--resume_from_checkpoint", "true"))
    assert code == 0, printed
    again = adapter_weights(resumed)
    assert all(torch.equal(weights[name], again[name]) for name in weights), "the resumed adapter differs"
    # save_state holds the whole model: a full fine-tuning cannot resume it, and is told so up front
    code, printed = run_quietly(finetune_argv(tiny_convnext_dir, image_folder, tmp_path / "run", "--trainer",
                                              "accelerate", "--cdb_channel_rate", "0.5", "--resume_from_checkpoint",
                                              str(tmp_path / "run" / "checkpoint-2")))
    assert code == 2 and "holds a LoRA adapter" in printed, printed
