"""The optimizer groups and the learning-rate schedule are the same on both training paths: --weight_decay_all,
--lr_schedule multistep (the official MultiStepLR stepped per epoch) and their pre-flight refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification

import cdb_hf.accelerate_loop as loop
import cdb_hf.trainer_path as trainer_path
from cdb_hf.arguments import RunArguments
from cdb_hf.cli import parse_args
from cdb_hf.core import ChannelDropBack
from cdb_hf.errors import UsageError
from cdb_hf.optimization import build_optimizer, lr_milestone_steps
from cdb_hf.preflight import plan_run
from cdb_hf.trainer import CDBTrainer


def _args(model_dir, image_folder, output_dir, *extra: str):
    return parse_args([
        "--model_name_or_path", str(model_dir), "--train_dir", str(image_folder / "train"),
        "--validation_dir", str(image_folder / "validation"), "--output_dir", str(output_dir), "--use_cpu",
        "--seed", "3", "--report_to", "none", "--disable_tqdm", "true", "--eval_strategy", "no",
        "--save_strategy", "no", "--log_level", "error", *extra])


@pytest.fixture
def used_learning_rates(monkeypatch):
    """``{optimizer step: learning rate that step used}``, read inside the optimizer step (CDB's hook)."""
    record: dict[int, float] = {}
    after_step = ChannelDropBack.after_step

    def spy(cdb, *args, **kwargs):
        record[cdb.step] = cdb._optimizer.param_groups[0]["lr"]  # the optimizer CDB is attached to
        after_step(cdb, *args, **kwargs)

    monkeypatch.setattr(ChannelDropBack, "after_step", spy)
    return record


@pytest.mark.parametrize("face", ["hf", "accelerate"])
def test_multistep_gives_every_step_the_rate_of_torch_multisteplr_stepped_per_epoch(
        face, tmp_path, tiny_vit_dir, image_folder, used_learning_rates):
    # 15 images in batches of 2 = 8 micro-batches; accumulation 3 makes 3 optimizer steps per epoch (3+3+2).
    plan = plan_run(*_args(tiny_vit_dir, image_folder, tmp_path / face, "--trainer", face, "--num_train_epochs", "4",
                           "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3",
                           "--learning_rate", "0.01", "--lr_schedule", "multistep", "--lr_milestones", "1", "3",
                           "--lr_gamma", "0.5"))
    (trainer_path.train if face == "hf" else loop.train)(plan)

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    official = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1, 3], gamma=0.5)
    expected = []
    for _epoch in range(4):
        expected += [optimizer.param_groups[0]["lr"]] * 3
        optimizer.step()
        official.step()
    assert [used_learning_rates[step] for step in sorted(used_learning_rates)] == pytest.approx(expected)
    assert sorted(used_learning_rates) == list(range(12))


def test_default_milestones_are_the_official_rounded_fractions_in_optimizer_steps():
    assert lr_milestone_steps(None, max_steps=85 * 49, steps_per_epoch=49) == [26 * 49, 51 * 49, 72 * 49]
    assert lr_milestone_steps(None, max_steps=10 * 7, steps_per_epoch=7) == [3 * 7, 6 * 7, 8 * 7]
    # A fractional last epoch still counts as an epoch, as both paths count it.
    assert lr_milestone_steps([2], max_steps=9, steps_per_epoch=4) == [8]


def _tiny_vit() -> ViTForImageClassification:
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=64, image_size=16, patch_size=8, num_labels=3))


def _decay_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    return {name: decay[id(p)] for name, p in model.named_parameters()}


@pytest.mark.parametrize("weight_decay_all", [True, False])
def test_weight_decay_groups_are_the_same_on_both_paths(weight_decay_all, tmp_path):
    model = _tiny_vit()
    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=0.05, optim="sgd", use_cpu=True,
                             report_to="none")
    trainer = CDBTrainer(model=model, args=args, run_args=RunArguments(weight_decay_all=weight_decay_all))
    on_trainer = _decay_by_name(model, trainer.create_optimizer())
    on_loop = _decay_by_name(model, build_optimizer(model, args, weight_decay_all))
    assert on_trainer == on_loop
    biases_and_norms = [name for name in on_loop if name.endswith("bias") or "layernorm" in name]
    assert biases_and_norms and "vit.embeddings.position_embeddings" in on_loop
    if weight_decay_all:
        assert set(on_loop.values()) == {0.05}
    else:
        assert {on_loop[name] for name in biases_and_norms} == {0.0}
        assert on_loop["classifier.weight"] == 0.05


@pytest.mark.parametrize(("extra", "named"), [
    (["--lr_schedule", "multistep", "--lr_scheduler_type", "cosine"], "--lr_scheduler_type 'cosine'"),
    (["--lr_schedule", "multistep", "--warmup_steps", "10"], "--warmup_steps"),
    (["--lr_milestones", "3", "6"], "--lr_milestones [3, 6] needs --lr_schedule multistep"),
    (["--lr_schedule", "multistep", "--lr_milestones", "6", "3"], "--lr_milestones [6, 3] is not valid"),
    (["--lr_schedule", "multistep", "--lr_milestones", "0", "3"], "--lr_milestones [0, 3] is not valid"),
    (["--lr_schedule", "multistep", "--lr_gamma", "0"], "--lr_gamma 0.0 is not valid"),
])
def test_conflicting_or_bad_schedules_are_refused_before_any_work(extra, named, tmp_path, image_folder):
    with pytest.raises(UsageError, match=named.replace("[", r"\[").replace("]", r"\]")):
        plan_run(*_args("builtin:efficientnet_lite0", image_folder, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_cdb_trainer_refuses_a_schedule_its_run_args_would_override(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), lr_scheduler_type="cosine", use_cpu=True, report_to="none")
    with pytest.raises(UsageError, match="--lr_scheduler_type 'cosine' conflicts with --lr_schedule multistep"):
        CDBTrainer(model=_tiny_vit(), args=args, run_args=RunArguments(lr_schedule="multistep"))


def test_cdb_trainer_flop_estimate_is_the_trainers_with_the_parameters_counted_once(tmp_path, monkeypatch):
    from transformers import Trainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    model = _tiny_vit()
    trainer = CDBTrainer(model=model, args=args)
    inputs = {"pixel_values": torch.zeros(4, 3, 16, 16), "labels": torch.zeros(4, dtype=torch.long)}
    expected = Trainer.floating_point_ops(trainer, inputs)
    counts = []
    count = model.num_parameters
    monkeypatch.setattr(model, "num_parameters", lambda **kwargs: counts.append(1) or count(**kwargs))
    assert [trainer.floating_point_ops(inputs) for _ in range(3)] == [expected] * 3
    assert len(counts) == 1
    assert trainer.floating_point_ops({"labels": inputs["labels"]}) == 0  # no main input: the Trainer's answer
