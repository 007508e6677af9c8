"""channels_last training (cdb_hf.perf): plain saved checkpoints, unchanged results, exact CDB on NHWC weights."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForImageClassification

import cdb_hf.run
from cdb_hf import ChannelDropBack, ChannelDropBackConfig, cli
from cdb_hf.arguments import RunArguments
from cdb_hf.perf import apply_memory_format


def train_convnext(tiny_convnext_dir, image_folder, output_dir: Path, *extra: str) -> tuple[nn.Module, str]:
    """One short CDB run of the tiny ConvNeXt through cli.main; returns the in-memory model it saved."""
    argv = ["--model_name_or_path", str(tiny_convnext_dir), "--train_dir", str(image_folder / "train"),
            "--validation_dir", str(image_folder / "validation"), "--output_dir", str(output_dir),
            "--max_steps", "3", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
            "--learning_rate", "1e-3", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
            "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--seed", "0", "--cdb_mode", "exact",
            "--cdb_layer_selection", "bernoulli", "--cdb_layer_rate", "0.5", "--cdb_channel_rate", "0.5", *extra]
    saved: dict[str, nn.Module] = {}
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        real = cdb_hf.run.save_outputs

        def spy(output_dir, model, *args, **kwargs):
            saved["model"] = model
            return real(output_dir, model, *args, **kwargs)

        patch.setattr(cdb_hf.run, "save_outputs", spy)
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            code = cli.main(argv)
    assert code == 0, printed.getvalue()
    return saved["model"], printed.getvalue()


def conv_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param for name, param in model.named_parameters() if param.dim() == 4}


@pytest.fixture(scope="module")
def channels_last_run(tmp_path_factory, tiny_convnext_dir, image_folder):
    output_dir = tmp_path_factory.mktemp("channels_last") / "run"
    model, _ = train_convnext(tiny_convnext_dir, image_folder, output_dir)  # channels_last is the default
    return output_dir, model


def test_channels_last_run_saves_a_plain_checkpoint_with_the_same_logits(channels_last_run):
    output_dir, trained = channels_last_run
    weights = conv_weights(trained)
    # A depthwise kernel (C, 1, k, k) is both layouts at once; the others must be NHWC only.
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights.values())
    assert any(not w.is_contiguous() for w in weights.values()), "the run did not train in channels_last"

    saved = load_file(str(output_dir / "model.safetensors"))
    assert all(tensor.is_contiguous() for tensor in saved.values())
    reloaded = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    assert all(w.is_contiguous() for w in conv_weights(reloaded).values())  # a plain checkpoint loads plain
    for name, tensor in trained.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name

    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    trained.eval()
    with torch.no_grad():
        # The kernels differ by layout, so the float sums may round differently: close, not bitwise.
        torch.testing.assert_close(reloaded(pixel_values).logits, trained(pixel_values).logits,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trainer", ["hf", "accelerate"])
def test_channels_last_trains_to_the_weights_of_the_default_layout(trainer, channels_last_run, tmp_path,
                                                                  tiny_convnext_dir, image_folder):
    if trainer == "hf":
        channels_last = channels_last_run[1]
    else:
        channels_last, _ = train_convnext(tiny_convnext_dir, image_folder, tmp_path / "nhwc", "--trainer", trainer)
    assert any(not w.is_contiguous() for w in conv_weights(channels_last).values())
    plain, _ = train_convnext(tiny_convnext_dir, image_folder, tmp_path / "nchw", "--trainer", trainer,
                              "--channels_last", "false")
    assert all(w.is_contiguous() for w in conv_weights(plain).values())
    expected = plain.state_dict()
    for name, tensor in channels_last.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    initial = AutoModelForImageClassification.from_pretrained(tiny_convnext_dir).state_dict()
    changed = sum(not torch.equal(tensor, initial[name]) for name, tensor in expected.items())
    assert changed > len(expected) // 2, "training barely moved the weights; the comparison would prove nothing"


def conv_and_batch(seed: int = 0) -> tuple[nn.Conv2d, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 12, 3)
    return conv, torch.randn(8, 4, 6, 6), torch.randn(8, 12, 4, 4)


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
    lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, foreach=False),
], ids=["sgd_momentum", "adamw_foreach", "adamw_for_loop"])
@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_exact_mode_keeps_dropped_channels_of_a_channels_last_conv_bitwise(make_optimizer, axis):
    config = ChannelDropBackConfig(channel_rate=0.5, channel_sampling="exact", mode="exact", axis=axis, seed=3)
    conv, inputs, targets = conv_and_batch()
    apply_memory_format(conv, channels_last=True)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    optimizer = make_optimizer(conv.parameters())
    cdb = ChannelDropBack(conv, config)
    cdb.attach(optimizer)
    reference, _, _ = conv_and_batch()  # the same weights and CDB selections in the default layout
    reference_optimizer = make_optimizer(reference.parameters())
    ChannelDropBack(reference, config).attach(reference_optimizer)
    dim = 0 if axis == "rows" else 1
    for _ in range(4):
        before = conv.weight.detach().clone()
        state_before = {k: v.clone() for k, v in optimizer.state.get(conv.weight, {}).items() if v.dim() == 4}
        for model, opt in ((conv, optimizer), (reference, reference_optimizer)):
            opt.zero_grad()
            nn.functional.mse_loss(model(inputs), targets).backward()
            opt.step()
        kept = cdb.last_selection["weight"]
        dropped, kept = (~kept).nonzero().flatten(), kept.nonzero().flatten()
        assert dropped.numel() and kept.numel()
        assert torch.equal(conv.weight.index_select(dim, dropped), before.index_select(dim, dropped))
        assert not torch.equal(conv.weight.index_select(dim, kept), before.index_select(dim, kept))
        state = {k: v for k, v in optimizer.state[conv.weight].items() if v.dim() == 4}
        assert state, "the optimizer keeps no per-element state; the test would prove nothing about it"
        for key, value in state.items():
            assert value.is_contiguous(memory_format=torch.channels_last), key
            expected = state_before.get(key, torch.zeros_like(value))
            assert torch.equal(value.index_select(dim, dropped), expected.index_select(dim, dropped)), key
        torch.testing.assert_close(conv.weight, reference.weight, rtol=1e-5, atol=1e-6)
    assert conv.weight.grad.is_contiguous(memory_format=torch.channels_last)  # masked in its own layout


def test_channels_last_false_leaves_the_model_untouched_and_bad_values_are_refused():
    conv, _, _ = conv_and_batch()
    weight = conv.weight
    assert apply_memory_format(conv, channels_last=False) is conv and conv.weight.is_contiguous()
    apply_memory_format(conv, channels_last=True)
    assert conv.weight is weight  # the same Parameter object: references taken before stay valid
    with pytest.raises(ValueError, match="channels_last='yes' is not valid"):
        apply_memory_format(conv, channels_last="yes")
    with pytest.raises(ValueError, match="channels_last=1 is not valid"):
        RunArguments(channels_last=1)


@pytest.mark.parametrize("trainer", ["hf", "accelerate"])
@pytest.mark.parametrize("case", ["persistent workers", "channels_last not a bool"])
def test_bad_speed_settings_fail_in_one_line_before_any_work(case, trainer, tmp_path, capsys, tiny_convnext_dir,
                                                             image_folder):
    argv = ["--model_name_or_path", str(tiny_convnext_dir), "--train_dir", str(image_folder / "train"),
            "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none", "--trainer", trainer]
    if case == "persistent workers":
        # Workers that outlive an epoch keep epoch 0's augmentation seeds (PerExampleSeeded's epoch).
        argv += ["--dataloader_num_workers", "1", "--dataloader_persistent_workers", "true"]
        expected = "--dataloader_persistent_workers true is not supported"
    else:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text("channels_last: 1\n")  # YAML values skip argparse's bool conversion
        argv = [str(recipe), *argv]
        expected = "channels_last: 1 is not valid; it must be true or false"  # the recipe's key, named
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and expected in error.strip().splitlines()[-1], error
    assert not (tmp_path / "out").exists()
