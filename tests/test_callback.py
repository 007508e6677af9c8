"""ChannelDropBackCallback inside a plain transformers Trainer, built the way the transformers docs build one."""

from __future__ import annotations

import glob
import json
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from cdb_hf import ChannelDropBack, ChannelDropBackCallback, ChannelDropBackConfig, add_channel_drop_back
from cdb_hf.trainer import CDBTrainer, ResumeSafeTrainer

NUM_LABELS = 3


class RandomImages(torch.utils.data.Dataset):
    """32 fixed random 16x16 images with labels: enough for a few optimizer steps."""

    def __init__(self, size: int = 32) -> None:
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(size, 3, 16, 16, generator=generator)
        self.labels = torch.randint(0, NUM_LABELS, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


def tiny_model(kind: str):
    torch.manual_seed(0)
    if kind == "vit":
        return ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=64,
                                                   num_labels=NUM_LABELS))
    return ConvNextForImageClassification(ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1],
                                                         num_stages=2, num_labels=NUM_LABELS))


def training_args(output_dir, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                  weight_decay=0.1, report_to="none", use_cpu=True, dataloader_num_workers=0, logging_steps=2,
                  save_strategy="no", disable_tqdm=True, seed=0)
    values.update(overrides)
    return TrainingArguments(**values)


def run(model, args, callbacks=(), trainer_class=Trainer, resume=None):
    trainer = trainer_class(model=model, args=args, train_dataset=RandomImages(), callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def weights(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_bitwise_equal(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    different = [name for name in left if not torch.equal(left[name], right[name])]
    assert not different, f"tensors differ: {different}"


class RowChecker(TrainerCallback):
    """Snapshots the weights before each optimizer step and checks the dropped rows afterwards."""

    def __init__(self, cdb_callback: ChannelDropBackCallback) -> None:
        self.cdb_callback = cdb_callback
        self.checked_steps: list[int] = []
        self.selections: dict[int, dict[str, torch.Tensor]] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.before = weights(model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        cdb = self.cdb_callback.cdb
        selection = cdb.last_selection
        self.selections[state.global_step] = {name: mask.clone() for name, mask in selection.items()}
        assert selection, "layer_rate=1 selects a layer every step"
        after = weights(model)
        for name, keep in selection.items():
            dropped = ~keep
            assert dropped.any(), "channel_sampling='exact' with rate 0.5 drops rows"
            assert torch.equal(after[name][dropped], self.before[name][dropped]), f"{name}: dropped rows moved"
            assert not torch.equal(after[name][keep], self.before[name][keep]), f"{name}: kept rows frozen"
        untouched = [n for n in cdb.layers if n not in selection]
        assert any(not torch.equal(after[n], self.before[n]) for n in untouched), "other layers must train"
        self.checked_steps.append(state.global_step)


def test_rate_zero_equals_a_run_without_the_callback(tmp_path):
    baseline = run(tiny_model("convnext"), training_args(tmp_path / "a"))
    rate_zero = ChannelDropBackCallback(ChannelDropBackConfig(layer_rate=0.0))
    with_callback = run(tiny_model("convnext"), training_args(tmp_path / "b"), [rate_zero])
    assert rate_zero.cdb.step == 4, "the callback ran and counted every optimizer step"
    assert_bitwise_equal(weights(baseline.model), weights(with_callback.model))


def test_exact_mode_freezes_the_selected_rows_once_per_optimizer_step(tmp_path):
    config = ChannelDropBackConfig(layer_selection="single", layer_rate=1.0, channel_rate=0.5,
                                   channel_sampling="exact", mode="exact", seed=3)
    callback = ChannelDropBackCallback(config)
    checker = RowChecker(callback)
    args = training_args(tmp_path, max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer = run(tiny_model("vit"), args, [callback, checker])

    assert checker.checked_steps == [0, 1, 2], "one selection per optimizer step, not per micro-batch"
    assert callback.cdb.step == trainer.state.global_step == 3
    # Each step's selection is the core's pure function of (seed, step): a fresh core draws the same rows.
    reference = ChannelDropBack(tiny_model("vit"), config)
    for step, selection in checker.selections.items():
        drawn = {sel.name: sel for sel in reference._draw(step)}
        assert drawn.keys() == selection.keys()
        for name, keep in selection.items():
            expected = torch.ones_like(keep).index_fill_(0, drawn[name].dropped, False)
            assert torch.equal(keep, expected)


def tensorboard_tags(folder) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = glob.glob(os.path.join(folder, "runs", "**", "events.out.tfevents.*"), recursive=True)
    assert event_files
    tags = set()
    for event_file in event_files:
        accumulator = EventAccumulator(event_file)
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


@pytest.mark.parametrize("how", ["add_channel_drop_back", "CDBTrainer"])
def test_stats_reach_log_history_and_tensorboard(tmp_path, how):
    config = ChannelDropBackConfig(layer_selection="bernoulli", layer_rate=0.5, schedule="linear",
                                   layer_rate_init=0.0)
    args = training_args(tmp_path, report_to=["tensorboard"], logging_steps=2, max_steps=4)
    if how == "add_channel_drop_back":
        trainer = Trainer(model=tiny_model("convnext"), args=args, train_dataset=RandomImages())
        callback = add_channel_drop_back(trainer, config)
    else:
        callback = ChannelDropBackCallback(config)
        trainer = CDBTrainer(model=tiny_model("convnext"), args=args, train_dataset=RandomImages(),
                             callbacks=[callback])
    trainer.train()

    assert callback.cdb.config.schedule_total_steps == 4, "the schedule spans the Trainer's max_steps"
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(train_logs) == 2
    for entry in train_logs:
        assert {"cdb/applied", "cdb/layers", "cdb/keep_fraction", "cdb/layer_rate"} <= entry.keys()
        assert 0.0 <= entry["cdb/applied"] <= 1.0 and 0.0 < entry["cdb/keep_fraction"] <= 1.0
    # linear ramp 0 -> 0.5 over 4 steps: the last step of each window is step 1 (0.125) and step 3 (0.375)
    assert [entry["cdb/layer_rate"] for entry in train_logs] == [0.125, 0.375]

    tags = tensorboard_tags(tmp_path)
    for stat in ("applied", "layers", "keep_fraction", "layer_rate"):
        assert any(tag.endswith(f"cdb/{stat}") for tag in tags), f"cdb/{stat} missing from {sorted(tags)}"


def test_a_plain_callbacks_entry_reaches_log_history_and_says_it_misses_the_trackers(tmp_path, caplog):
    """callbacks=[...] applies CDB and logs its statistics; the integrations ran before it, and it says so."""
    callback = ChannelDropBackCallback(ChannelDropBackConfig(layer_selection="bernoulli", layer_rate=0.5))
    args = training_args(tmp_path, report_to=["tensorboard"], logging_steps=2, max_steps=4)
    with caplog.at_level("WARNING", logger="cdb_hf.callback"):
        trainer = run(tiny_model("convnext"), args, [callback])
    assert all("cdb/applied" in entry for entry in trainer.state.log_history if "loss" in entry)
    assert not any("cdb/" in tag for tag in tensorboard_tags(tmp_path))
    assert "add_channel_drop_back" in caplog.text


@pytest.mark.parametrize(("kind", "trainer_class", "restore_callback_states"), [
    ("convnext", Trainer, False),  # the default TrainingArguments
    ("convnext", Trainer, True),  # the Trainer replaces the callback by one rebuilt from its exported state
    ("vit", ResumeSafeTrainer, False),  # transformers 5.24's own Trainer loses ViT weights on resume
])
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, kind, trainer_class, restore_callback_states):
    config = ChannelDropBackConfig(layer_selection="bernoulli", layer_rate=0.7, mode="exact", seed=5)
    args = training_args(tmp_path / "run", max_steps=6, save_strategy="steps", save_steps=3,
                         restore_callback_states_from_checkpoint=restore_callback_states)
    straight = run(tiny_model(kind), args, [ChannelDropBackCallback(config)], trainer_class)

    saved = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())
    exported = saved["stateful_callbacks"]["ChannelDropBackCallback"]
    assert exported["attributes"]["cdb_step"] == 3 and exported["args"]["config"]["seed"] == 5

    # A fresh process would rebuild everything from scratch: so does the resumed run.
    resumed = run(tiny_model(kind), args, [ChannelDropBackCallback(config)], trainer_class,
                  resume=str(tmp_path / "run" / "checkpoint-3"))
    [active] = [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, ChannelDropBackCallback)]
    assert active.cdb.step == 6 and active.cdb.config.seed == 5
    assert_bitwise_equal(weights(straight.model), weights(resumed.model))


def test_resume_safe_trainer_loads_every_weight_of_the_best_checkpoint(tmp_path):
    args = training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, eval_strategy="steps",
                         eval_steps=2, load_best_model_at_end=True, metric_for_best_model="first_is_best",
                         greater_is_better=True, per_device_eval_batch_size=8)
    evaluations = []

    def first_is_best(prediction) -> dict[str, float]:  # makes the earlier checkpoint the best one
        evaluations.append(None)
        return {"first_is_best": 1.0 / len(evaluations)}

    trainer = ResumeSafeTrainer(model=tiny_model("vit"), args=args, train_dataset=RandomImages(),
                                eval_dataset=RandomImages(8), compute_metrics=first_is_best,
                                callbacks=[ChannelDropBackCallback()])
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2"), "the final weights must be replaced"
    best = ViTForImageClassification.from_pretrained(trainer.state.best_model_checkpoint)
    assert_bitwise_equal(weights(trainer.model), weights(best))


def test_refuses_deepspeed_and_fsdp(tmp_path):
    args = training_args(tmp_path)
    callback = ChannelDropBackCallback()
    state, control = TrainerState(), TrainerControl()
    with pytest.raises(ValueError, match="DeepSpeed"):
        callback.on_init_end(SimpleNamespace(deepspeed="ds_config.json", fsdp=None), state, control)
    with pytest.raises(ValueError, match="FSDP"):
        callback.on_train_begin(SimpleNamespace(deepspeed=None, fsdp=["full_shard"]), state, control,
                                model=tiny_model("convnext"), optimizer=None)
    # A real Trainer refuses at construction, before any work.
    args.deepspeed = "ds_config.json"  # TrainingArguments itself would import deepspeed, absent here
    with pytest.raises(ValueError, match="DeepSpeed runs the optimizer step inside backward"):
        Trainer(model=tiny_model("convnext"), args=args, train_dataset=RandomImages(), callbacks=[callback])


def test_refuses_an_fsdp_sharded_model(tmp_path):
    """FSDP2 (fully_shard) in a one-process gloo group: refused at on_train_begin, never silently masked."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = tiny_model("convnext")
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters())
        with pytest.raises(ValueError, match="does not support FSDP-sharded models"):
            ChannelDropBackCallback().on_train_begin(SimpleNamespace(deepspeed=None, fsdp=None), TrainerState(),
                                                     TrainerControl(), model=model, optimizer=optimizer)
    finally:
        dist.destroy_process_group()


def test_refuses_to_continue_when_its_hooks_did_not_run(tmp_path):
    callback = ChannelDropBackCallback()

    class DetachCDB(TrainerCallback):  # what replacing the optimizer mid-training amounts to
        def on_step_begin(self, args, state, control, **kwargs):
            callback._handle.remove()

    with pytest.raises(RuntimeError, match="hooks did not run"):
        run(tiny_model("convnext"), training_args(tmp_path), [callback, DetachCDB()])


def test_epoch_schedule_takes_its_length_from_the_trainer(tmp_path):
    """schedule_unit='epochs': 32 images / batch 4 = 8 steps per epoch; 2 epochs; the official 30/60 % steps."""
    config = ChannelDropBackConfig(schedule="step", layer_rate_init=0.0, layer_rate=1.0, schedule_unit="epochs")
    callback = ChannelDropBackCallback(config)
    rates = []

    class RecordRate(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            rates.append(callback.cdb.last_stats["layer_rate"])

    run(tiny_model("convnext"), training_args(tmp_path, max_steps=-1, num_train_epochs=2), [callback, RecordRate()])
    assert callback.cdb.config.schedule_steps_per_epoch == 8 and callback.cdb.config.schedule_total_steps == 16
    # Progress moves at epoch boundaries only: epoch 0 (0 %) then epoch 1 (50 %: layer_rate / 2).
    assert rates == [0.0] * 8 + [0.5] * 8


def test_epoch_schedule_on_a_dataset_without_length_is_refused(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from (RandomImages()[i] for i in range(32))

    config = ChannelDropBackConfig(schedule="step", layer_rate=1.0, schedule_unit="epochs")
    trainer = Trainer(model=tiny_model("convnext"), args=training_args(tmp_path), train_dataset=Stream(),
                      callbacks=[ChannelDropBackCallback(config)])
    with pytest.raises(ValueError, match="set schedule_steps_per_epoch"):
        trainer.train()
