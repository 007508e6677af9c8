"""cdb_hf.models: every architecture through the Auto classes, label heads, passthrough, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_LABELS
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

from cdb_hf import models
from cdb_hf.arguments import ModelArguments
from cdb_hf.models import load_model_and_processor

FIVE_LABELS = ["ant", "bee", "cat", "dog", "eel"]


def load(path, labels, **kwargs):
    return load_model_and_processor(ModelArguments(model_name_or_path=str(path), **kwargs), labels)


def logits_of(model, size=32, batch=2):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=torch.randn(batch, 3, size, size)).logits


def test_same_label_count_keeps_the_checkpoint_head(tiny_vit_dir):
    model, processor = load(tiny_vit_dir, TINY_LABELS)
    saved = load_file(str(tiny_vit_dir / "model.safetensors"))
    assert torch.equal(model.classifier.weight, saved["classifier.weight"])
    assert model.config.id2label == dict(enumerate(TINY_LABELS))
    assert model.config.label2id == {label: i for i, label in enumerate(TINY_LABELS)}
    assert type(processor).__name__ == "ViTImageProcessor"
    assert logits_of(model).shape == (2, 3)


def test_new_label_count_gets_a_new_head_and_keeps_the_backbone(tiny_vit_dir):
    model, _ = load(tiny_vit_dir, FIVE_LABELS)
    saved = load_file(str(tiny_vit_dir / "model.safetensors"))
    assert model.classifier.out_features == 5 and model.config.num_labels == 5
    assert model.config.id2label[4] == "eel"
    embedding = next(key for key in saved if key.endswith("patch_embeddings.projection.weight"))
    assert torch.equal(model.vit.embeddings.patch_embeddings.projection.weight, saved[embedding])
    assert logits_of(model).shape == (2, 5)


def test_convnext_checkpoint(tiny_convnext_dir):
    model, processor = load(tiny_convnext_dir, FIVE_LABELS)
    assert type(model).__name__ == "ConvNextForImageClassification"
    assert type(processor).__name__ == "ConvNextImageProcessor"
    assert logits_of(model).shape == (2, 5)


def test_timm_checkpoint_in_hub_layout_despite_the_num_classes_trap(tiny_timm_dir):
    assert "num_classes" in json.loads((tiny_timm_dir / "config.json").read_text())["model_args"]
    for labels in (["x", "y", "z"], FIVE_LABELS):
        model, processor = load(tiny_timm_dir, labels)
        assert type(model).__name__ == "TimmWrapperForImageClassification"
        assert type(processor).__name__ == "TimmWrapperImageProcessor"
        assert model.config.id2label == dict(enumerate(labels))
        assert logits_of(model).shape == (2, len(labels))
    saved = load_file(str(tiny_timm_dir / "model.safetensors"))
    stem = next(key for key in saved if key.endswith("weight") and saved[key].ndim == 4)
    assert torch.equal(model.timm_model.state_dict()[stem], saved[stem])
    assert model.timm_model.get_classifier().out_features == 5


def _tiny(architecture: str):
    import transformers as t

    if architecture == "resnet":
        return t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3), \
            t.ResNetForImageClassification, t.ConvNextImageProcessor(size={"shortest_edge": 32})
    common = {"image_size": 32, "patch_size": 8, "num_labels": 3}
    if architecture == "swin":
        return t.SwinConfig(embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=2, **common), \
            t.SwinForImageClassification, t.ViTImageProcessor(size={"height": 32, "width": 32})
    vit_like = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                **common}
    if architecture == "deit":
        return t.DeiTConfig(**vit_like), t.DeiTForImageClassification, \
            t.DeiTImageProcessor(size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32})
    return t.BeitConfig(**vit_like), t.BeitForImageClassification, \
        t.BeitImageProcessor(size={"height": 32, "width": 32})


@pytest.mark.parametrize("architecture", ["resnet", "swin", "deit", "beit"])
def test_any_auto_image_classification_architecture(tmp_path, architecture):
    config, model_class, processor = _tiny(architecture)
    model_class(config).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model, loaded_processor = load(tmp_path, FIVE_LABELS)
    assert isinstance(model, model_class)
    assert type(loaded_processor) is type(processor)
    assert logits_of(model).shape == (2, 5)


def test_config_and_processor_can_come_from_elsewhere(tiny_vit_dir, tiny_convnext_dir):
    model, processor = load_model_and_processor(
        ModelArguments(model_name_or_path=str(tiny_vit_dir), image_processor_name=str(tiny_convnext_dir)),
        TINY_LABELS)
    assert type(model).__name__ == "ViTForImageClassification"
    assert type(processor).__name__ == "ConvNextImageProcessor"


def test_hub_arguments_are_passed_through_and_remote_code_is_off_by_default(tiny_vit_dir, monkeypatch):
    seen = []
    original = models.AutoConfig.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(models.AutoConfig, "from_pretrained", spy)
    load(tiny_vit_dir, TINY_LABELS)
    assert seen[0]["trust_remote_code"] is False
    seen.clear()
    load(tiny_vit_dir, TINY_LABELS, cache_dir="/tmp/some-cache", model_revision="v2", token="secret",
         trust_remote_code=True)
    assert {key: seen[0][key] for key in ("cache_dir", "revision", "token", "trust_remote_code")} == \
        {"cache_dir": "/tmp/some-cache", "revision": "v2", "token": "secret", "trust_remote_code": True}


def test_remote_code_is_refused_unless_trusted(tmp_path):
    marker = tmp_path / "code_ran"
    (tmp_path / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load(tmp_path, TINY_LABELS)
    assert not marker.exists()


def test_hub_ids_fail_offline_with_a_clear_message():
    with pytest.raises(ValueError) as error:
        load("google/vit-base-patch16-224-in21k", TINY_LABELS)
    text = str(error.value)
    assert "'google/vit-base-patch16-224-in21k'" in text and "unreachable" in text and "HF_HUB_OFFLINE" in text
    assert "local directory" in text and "builtin:efficientnet_lite0" in text


def test_bad_model_inputs_raise_one_clear_error(tmp_path, tiny_vit_dir):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load(tmp_path / "missing" / "model", TINY_LABELS)
    with pytest.raises(ValueError, match="without config.json"):
        load(tmp_path, TINY_LABELS)
    with pytest.raises(ValueError, match="model_name_or_path is required"):
        load_model_and_processor(ModelArguments(), TINY_LABELS)
    with pytest.raises(ValueError, match=r"builtin:resnet9000.*valid: builtin:efficientnet_lite0"):
        load("builtin:resnet9000", TINY_LABELS)
    with pytest.raises(ValueError, match="at least 2"):
        load(tiny_vit_dir, ["only"])
    with pytest.raises(ValueError, match=r"duplicated: \['a'\]"):
        load(tiny_vit_dir, ["a", "b", "a"])


def test_a_checkpoint_without_an_image_classification_head_is_named(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path)
    with pytest.raises(ValueError, match="'bert' checkpoint, which has no image-classification model"):
        load(tmp_path, TINY_LABELS)


def test_loaded_model_round_trips_through_save_pretrained(tiny_timm_dir, tmp_path):
    model, _ = load(tiny_timm_dir, FIVE_LABELS)
    model.save_pretrained(tmp_path)
    again = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert again.config.id2label == dict(enumerate(FIVE_LABELS))
    inputs = torch.randn(1, 3, 32, 32)
    model.eval()
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=inputs).logits, model(pixel_values=inputs).logits)


def test_a_model_folder_without_image_processor_asks_for_one(tmp_path, tiny_vit_dir):
    import shutil

    shutil.copy(tiny_vit_dir / "config.json", tmp_path)
    shutil.copy(tiny_vit_dir / "model.safetensors", tmp_path)
    with pytest.raises(ValueError, match=r"image processor from local folder .*--image_processor_name"):
        load(tmp_path, TINY_LABELS)
    model, _ = load_model_and_processor(ModelArguments(model_name_or_path=str(tmp_path),
                                                       image_processor_name=str(tiny_vit_dir)), TINY_LABELS)
    assert model.config.problem_type == "single_label_classification"


# ------------------------------------------------------------------------------------- --image_size


def _eval_logits(model, pixel_values, **kwargs):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixel_values, **kwargs).logits


def _train_and_eval_shapes(processor):
    from PIL import Image

    from cdb_hf.transforms import build_transforms

    image = Image.new("RGB", (40, 30), (10, 120, 200))
    return [tuple(transform(image).shape) for transform in build_transforms(processor)]


def test_vit_at_a_new_image_size_saves_a_plain_model_at_that_size(tiny_vit_dir, tmp_path):
    native, _ = load(tiny_vit_dir, TINY_LABELS)
    model, processor = load(tiny_vit_dir, TINY_LABELS, image_size=48)
    old, new = native.vit.embeddings.position_embeddings, model.vit.embeddings.position_embeddings
    assert (old.shape[1], new.shape[1]) == (1 + 4 * 4, 1 + 6 * 6)
    assert torch.equal(new[:, :1], old[:, :1])  # the CLS position is kept bitwise
    assert model.config.image_size == 48
    assert _train_and_eval_shapes(processor) == [(3, 48, 48), (3, 48, 48)]

    pixel_values = torch.randn(2, 3, 48, 48)
    logits = _eval_logits(model, pixel_values)
    # The resized embeddings are what the checkpoint's own run-time interpolation computes.
    torch.testing.assert_close(logits, _eval_logits(native, pixel_values, interpolate_pos_encoding=True))

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["image_size"] == 48
    assert torch.equal(_eval_logits(again, pixel_values), logits)  # no interpolate_pos_encoding needed
    from transformers import AutoImageProcessor

    assert _train_and_eval_shapes(AutoImageProcessor.from_pretrained(tmp_path)) == [(3, 48, 48), (3, 48, 48)]


@pytest.mark.parametrize("architecture", ["deit", "vit_msn"])
def test_other_position_embedding_models_are_resized_too(tmp_path, architecture):
    import transformers as t

    common = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "image_size": 32, "patch_size": 8, "num_labels": 3}
    if architecture == "deit":  # CLS + distillation token, and a 36 -> 32 center crop
        checkpoint = t.DeiTForImageClassification(t.DeiTConfig(**common))
        processor = t.DeiTImageProcessor(size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32})
    else:
        checkpoint = t.ViTMSNForImageClassification(t.ViTMSNConfig(**common))
        processor = t.ViTImageProcessor(size={"height": 32, "width": 32})
    checkpoint.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    native, _ = load(tmp_path, TINY_LABELS)
    model, resized = load(tmp_path, TINY_LABELS, image_size=48)
    prefix = 2 if architecture == "deit" else 1
    assert torch.equal(model.base_model.embeddings.position_embeddings[:, :prefix],
                       native.base_model.embeddings.position_embeddings[:, :prefix])
    pixel_values = torch.randn(1, 3, 48, 48)
    torch.testing.assert_close(_eval_logits(model, pixel_values),
                               _eval_logits(native, pixel_values, interpolate_pos_encoding=True))
    if architecture == "deit":  # the resize-then-crop ratio is kept
        assert (resized.size.height, resized.crop_size.height) == (54, 48)
    assert _train_and_eval_shapes(resized) == [(3, 48, 48), (3, 48, 48)]


def test_convnext_gets_only_the_processor_change(tiny_convnext_dir):
    native, _ = load(tiny_convnext_dir, TINY_LABELS)
    model, processor = load(tiny_convnext_dir, TINY_LABELS, image_size=48)
    assert (processor.size.shortest_edge, processor.crop_pct) == (48, 0.875)
    assert _train_and_eval_shapes(processor) == [(3, 48, 48), (3, 48, 48)]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), native.state_dict().values()))
    assert logits_of(model, size=48).shape == (2, 3)


@pytest.mark.parametrize("architecture", ["resnet", "swin", "beit"])
def test_models_that_run_at_any_size_get_only_the_processor_change(tmp_path, architecture):
    config, model_class, processor = _tiny(architecture)
    model_class(config).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model, resized = load(tmp_path, FIVE_LABELS, image_size=48)
    assert _train_and_eval_shapes(resized) == [(3, 48, 48), (3, 48, 48)]
    assert logits_of(model, size=48).shape == (2, 5)


def test_timm_cnn_gets_only_the_processor_change_and_saves_it_in_its_config(tiny_timm_dir, tmp_path):
    native, _ = load(tiny_timm_dir, FIVE_LABELS)
    model, processor = load(tiny_timm_dir, FIVE_LABELS, image_size=48)
    assert processor.data_config["input_size"] == (3, 48, 48)
    assert _train_and_eval_shapes(processor) == [(3, 48, 48), (3, 48, 48)]
    backbone = [key for key in native.state_dict() if "fc" not in key]  # the head is new, hence random
    assert all(torch.equal(model.state_dict()[key], native.state_dict()[key]) for key in backbone)
    model.save_pretrained(tmp_path)  # a timm checkpoint's image processor lives in its config.json
    assert json.loads((tmp_path / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 48, 48]


def test_timm_vit_is_resized_by_timm_and_reloads_at_the_new_size(tmp_path):
    import timm
    from timm.models._hub import save_for_hf

    source, output = tmp_path / "source", tmp_path / "output"
    timm_vit = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32, patch_size=8)
    save_for_hf(timm_vit, str(source), safe_serialization=True, model_args={"img_size": 32, "patch_size": 8},
                data_config={"input_size": (3, 32, 32), "crop_pct": 0.875})
    model, processor = load(source, TINY_LABELS, image_size=48)
    assert model.timm_model.pos_embed.shape[1] == 1 + 6 * 6
    assert torch.equal(model.timm_model.pos_embed[:, :1], timm_vit.pos_embed[:, :1])
    assert _train_and_eval_shapes(processor) == [(3, 48, 48), (3, 48, 48)]
    pixel_values = torch.randn(1, 3, 48, 48)
    logits = _eval_logits(model, pixel_values)
    model.save_pretrained(output)
    assert torch.equal(_eval_logits(AutoModelForImageClassification.from_pretrained(output), pixel_values), logits)
    with pytest.raises(ValueError, match="not a multiple of this timm model's patch size"):
        load(source, TINY_LABELS, image_size=44)


def test_bad_image_sizes_are_refused_before_the_weights_load(tiny_vit_dir, monkeypatch):
    for bad in (0, -32, 1.5, True):
        with pytest.raises(ValueError, match=r"--image_size .* is not valid: give a positive number of pixels"):
            ModelArguments(model_name_or_path=str(tiny_vit_dir), image_size=bad)

    def must_not_load(*args, **kwargs):
        raise AssertionError("the weights were read before the image size was checked")

    monkeypatch.setattr(models.AutoModelForImageClassification, "from_pretrained", must_not_load)
    with pytest.raises(ValueError, match=r"--image_size 50 is not a multiple of this vit checkpoint's patch size 8"):
        load(tiny_vit_dir, TINY_LABELS, image_size=50)
    # The same check from the config alone, for training paths that load the data before the model.
    with pytest.raises(ValueError, match="not a multiple of this vit checkpoint's patch size 8"):
        models.check_image_size(ModelArguments(model_name_or_path=str(tiny_vit_dir), image_size=50))
    models.check_image_size(ModelArguments(model_name_or_path=str(tiny_vit_dir), image_size=48))


def test_unsupported_models_and_processors_are_refused_clearly(tmp_path):
    import transformers as t

    swin = tmp_path / "swin"
    t.SwinConfig(embed_dim=8, depths=[1], num_heads=[1], window_size=2, image_size=32, patch_size=4,
                 use_absolute_embeddings=True).save_pretrained(swin)
    t.ViTImageProcessor().save_pretrained(swin)
    with pytest.raises(ValueError, match="not supported for Swin checkpoints with absolute position embeddings"):
        load(swin, TINY_LABELS, image_size=48)
    with pytest.raises(ValueError, match=r"cannot set the size of ViTImageProcessor .*longest_edge"):
        models.processor_at_size(t.ViTImageProcessor(size={"longest_edge": 32}, do_resize=True), 48)
