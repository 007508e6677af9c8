"""The accelerate loop in one process: outputs, checkpoints, resume, trackers, refusals.

The two-process behaviour (identical selections and weights on every rank, the Trainer path against the
loop, an interrupted 2-rank job) is in test_distributed.py.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

import cdb_hf.accelerate_loop as loop
import cdb_hf.run
from cdb_hf.checks import check_supported_setup
from cdb_hf.cli import parse_args
from cdb_hf.core import ChannelDropBack
from cdb_hf.errors import UsageError
from cdb_hf.preflight import plan_run
from cdb_hf.run_dir import CHECKPOINT_RECORD
from cdb_hf.train_set import PerExampleSeeded


def train(model_dir, image_folder, output_dir, *extra: str) -> dict[str, float]:
    """A tiny accelerate-loop run, planned exactly as the CLI plans it."""
    return loop.train(plan_run(*loop_args(model_dir, image_folder, output_dir, *extra)))


def loop_args(model_dir, image_folder, output_dir, *extra: str):
    """The five argument dataclasses for a tiny accelerate-loop run, exactly as the CLI builds them."""
    return parse_args([
        "--trainer", "accelerate", "--model_name_or_path", str(model_dir),
        "--train_dir", str(image_folder / "train"), "--validation_dir", str(image_folder / "validation"),
        "--output_dir", str(output_dir), "--use_cpu", "--seed", "3", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "6", "--learning_rate", "0.01", "--report_to", "none",
        "--disable_tqdm", "true", "--cdb_layer_selection", "bernoulli", "--cdb_layer_rate", "0.7",
        "--cdb_mode", "exact", *extra])


@pytest.fixture
def selections(monkeypatch):
    """``{optimizer step: {layer: bool mask}}`` recorded from CDB's post-step hook of every run."""
    record: dict[int, dict[str, list[bool]]] = {}
    after_step = ChannelDropBack.after_step

    def spy(cdb, optimizer=None):
        after_step(cdb, optimizer)
        record[cdb.step - 1] = {name: mask.tolist() for name, mask in cdb.last_selection.items()}

    monkeypatch.setattr(ChannelDropBack, "after_step", spy)
    return record


def test_a_run_writes_the_shared_outputs_checkpoints_and_tracker_logs(tmp_path, tiny_vit_dir, image_folder,
                                                                      monkeypatch, selections):
    from huggingface_hub import constants as hub_constants
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForImageClassification

    pushed = []
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)  # pushing is mocked below, never networked
    monkeypatch.setattr(cdb_hf.run, "push_outputs",
                        lambda output_dir, args: pushed.append((Path(output_dir), sorted(os.listdir(output_dir)))))
    output_dir = tmp_path / "out"
    # 15 images in batches of 4 with accumulation 2: 2 optimizer steps per epoch.
    metrics = train(
        tiny_vit_dir, image_folder, output_dir, "--max_steps", "4", "--gradient_accumulation_steps", "2",
        "--logging_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2", "--save_steps", "2",
        "--save_total_limit", "1", "--report_to", "tensorboard", "--cdb_schedule", "linear",
        "--push_to_hub", "--hub_model_id", "someone/tiny-cdb", "--hub_token", "hf_notARealToken")

    assert sorted(selections) == [0, 1, 2, 3]
    assert {"train_loss", "train_runtime", "eval_loss", "eval_accuracy", "epoch"} <= metrics.keys()
    assert metrics["epoch"] == 2.0 and np.isfinite(metrics["train_loss"]) and 0 <= metrics["eval_accuracy"] <= 1

    # The same files as the Trainer path, written by cdb_hf.hub, then pushed once.
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "cdb_config.json",
                 "all_results.json", "train_results.json", "eval_results.json", "trainer_state.json", "README.md"):
        assert (output_dir / name).is_file(), name
    cdb_config = json.loads((output_dir / "cdb_config.json").read_text())
    assert cdb_config["schedule"] == "linear" and cdb_config["schedule_total_steps"] == 4, "filled from the run"
    assert "ChannelDropBack" in (output_dir / "README.md").read_text()
    assert json.loads((output_dir / "all_results.json").read_text())["eval_accuracy"] == metrics["eval_accuracy"]
    assert pushed == [(output_dir, sorted(os.listdir(output_dir)))] and "README.md" in pushed[0][1]
    model = AutoModelForImageClassification.from_pretrained(output_dir)
    assert model.config.id2label == {0: "blue", 1: "green", 2: "red"}

    # save_total_limit=1 keeps the newest checkpoint: an accelerate save_state folder with CDB's step in it.
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-4"]
    checkpoint = output_dir / "checkpoint-4"
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", CHECKPOINT_RECORD} <= set(os.listdir(checkpoint))
    # The loop's own state is plain JSON, never a pickle that resuming would have to unpickle.
    assert not list(checkpoint.glob("custom_checkpoint_*")), "no register_for_checkpointing pickles"
    record = json.loads((checkpoint / CHECKPOINT_RECORD).read_text())
    loop_state = record["loop"]
    assert loop_state["completed_steps"] == 4 and [entry["step"] for entry in loop_state["log_history"]] == [2, 2, 4, 4]
    assert record["cdb"]["schedule"] == "linear" and record["cdb"]["schedule_total_steps"] == 4  # sized: one record
    assert "cdb_run" not in record

    # Trainer-style log history (what the model card reads) with CDB's statistics in every training log.
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    train_logs = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in train_logs] == [2, 4]
    for entry in train_logs:
        assert {"cdb/applied", "cdb/layers", "cdb/keep_fraction", "cdb/layer_rate", "learning_rate"} <= entry.keys()
    assert [entry["step"] for entry in history if "eval_accuracy" in entry] == [2, 4, 4]  # 2 periodic + final

    tags = set()
    for event_file in glob.glob(str(output_dir / "runs" / "**" / "events.out.tfevents.*"), recursive=True):
        accumulator = EventAccumulator(event_file)
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    expected = {"cdb/applied", "cdb/layers", "cdb/keep_fraction", "cdb/layer_rate", "train/loss", "eval/accuracy"}
    assert expected <= tags, sorted(tags)


def test_resume_from_an_epoch_checkpoint_reaches_the_uninterrupted_weights(tmp_path, tiny_convnext_dir,
                                                                          image_folder, selections):
    common = ("--num_train_epochs", "3", "--save_strategy", "epoch", "--logging_steps", "1", "--cdb_channel_rate", "0.5")
    train(tiny_convnext_dir, image_folder, tmp_path / "straight", *common)
    straight = dict(selections)
    assert sorted(straight) == list(range(12))  # 4 batches per epoch, 3 epochs

    selections.clear()
    checkpoint = tmp_path / "straight" / "checkpoint-4"  # the end of epoch 1: a fresh process resumes from it
    train(tiny_convnext_dir, image_folder, tmp_path / "resumed", *common, "--resume_from_checkpoint", str(checkpoint))
    assert sorted(selections) == list(range(4, 12)), "the resumed run starts at optimizer step 4"
    assert all(selections[step] == straight[step] for step in selections)
    straight_weights = load_file(tmp_path / "straight" / "model.safetensors")
    resumed_weights = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(straight_weights[k], resumed_weights[k]) for k in straight_weights)
    # The log history continues the checkpoint's: the resumed run's model card covers the whole run.
    history = json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == list(range(1, 13))


def test_overwrite_output_dir_removes_the_previous_run_before_training(tmp_path, tiny_vit_dir, image_folder,
                                                                        selections):
    output_dir = tmp_path / "out"
    train(tiny_vit_dir, image_folder, output_dir, "--max_steps", "2", "--save_steps", "1", "--report_to", "tensorboard")
    assert (output_dir / "cdb_config.json").is_file() and (output_dir / "checkpoint-2").is_dir()

    # A baseline written over it: no stale CDB config, checkpoints or tracker logs of the CDB run remain.
    train(tiny_vit_dir, image_folder, output_dir, "--max_steps", "1", "--save_strategy", "no", "--cdb", "false",
          "--overwrite_output_dir", "true")
    assert not list(output_dir.glob("checkpoint-*")) and not (output_dir / "runs").exists()
    assert not (output_dir / "cdb_config.json").exists()
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 1


def _fake_loop_checkpoint(checkpoint: Path, record) -> None:
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    (checkpoint / CHECKPOINT_RECORD).write_text(record if isinstance(record, str) else json.dumps(record))


def test_a_checkpoint_with_a_malformed_or_mismatched_loop_state_is_refused_before_any_work(tmp_path, tiny_vit_dir,
                                                                                           image_folder, monkeypatch):
    checkpoint = tmp_path / "out" / "checkpoint-2"
    monkeypatch.setattr(cdb_hf.run.sources, "load_image_datasets",
                        lambda *a, **k: pytest.fail("work started before the error"))
    _fake_loop_checkpoint(checkpoint, "not json")
    with pytest.raises(UsageError, match="no complete checkpoint-N folder.*cdb_hf_checkpoint.json is unreadable"):
        train(tiny_vit_dir, image_folder, tmp_path / "out", "--resume_from_checkpoint", "latest")
    record = {"trainer": "accelerate", "step": 2, "cdb": None, "files": {"model.safetensors": 7},
              "loop": {"completed_steps": 2, "log_history": []}}
    _fake_loop_checkpoint(checkpoint, record)
    with pytest.raises(UsageError, match="cdb: false in the checkpoint, true now"):
        train(tiny_vit_dir, image_folder, tmp_path / "out", "--resume_from_checkpoint", "latest")


def test_baseline_under_bf16_autocast(tmp_path, tiny_vit_dir, image_folder, selections):
    output_dir = tmp_path / "baseline"
    metrics = train(tiny_vit_dir, image_folder, output_dir, "--max_steps", "2", "--bf16", "--logging_steps", "1",
                    "--cdb", "false")
    assert not selections and not (output_dir / "cdb_config.json").exists()
    assert np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["eval_loss"])
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2]
    assert not any(key.startswith("cdb/") for entry in history for key in entry)


@pytest.mark.parametrize(("extra", "error", "match"), [
    (("--optim", "adamw_bnb_8bit"), ValueError, "optim='adamw_bnb_8bit' is not supported by the accelerate loop"),
    (("--report_to", "codecarbon"), ValueError, r"report_to=\['codecarbon'\]"),
    (("--resume_from_checkpoint", "true"), UsageError, "no complete checkpoint-N folder"),
    (("--resume_from_checkpoint", "/nonexistent/checkpoint-7"), UsageError, "checkpoint-7"),
    (("--cdb_channel_rate", "1.5"), ValueError, "channel_rate=1.5"),
    (("--label_smoothing_factor", "0.1"), ValueError, "label_smoothing_factor=0.1 is not supported"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, tiny_vit_dir, image_folder, monkeypatch, extra, error,
                                              match):
    monkeypatch.setattr(cdb_hf.run.sources, "load_image_datasets",
                        lambda *a, **k: pytest.fail("work started before the error"))
    with pytest.raises(error, match=match):
        train(tiny_vit_dir, image_folder, tmp_path / "out", *extra)
    assert not (tmp_path / "out").exists()


def test_a_trainer_checkpoint_is_refused_as_a_resume_point(tmp_path, tiny_vit_dir, image_folder, monkeypatch):
    trainer_checkpoint = tmp_path / "out" / "checkpoint-2"
    _fake_loop_checkpoint(trainer_checkpoint, {"trainer": "hf", "step": 2, "cdb": None,
                                               "files": {"model.safetensors": 7}})
    monkeypatch.setattr(cdb_hf.run.sources, "load_image_datasets",
                        lambda *a, **k: pytest.fail("work started before the error"))
    with pytest.raises(ValueError, match=r"was written by the Trainer \(--trainer hf\); resume it with --trainer hf"):
        train(tiny_vit_dir, image_folder, tmp_path / "out", "--resume_from_checkpoint", "latest")
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-2"]


@pytest.mark.parametrize(("variable", "match"), [("ACCELERATE_USE_FSDP", "does not support FSDP"),
                                                 ("ACCELERATE_USE_DEEPSPEED", "does not support DeepSpeed")])
def test_fsdp_and_deepspeed_launches_are_refused(variable, match, monkeypatch):
    """`accelerate launch` with an FSDP or DeepSpeed config sets these; the one refusal reads them."""
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ValueError, match=match):
        check_supported_setup(SimpleNamespace(deepspeed=None, fsdp=None))
    monkeypatch.delenv(variable)
    check_supported_setup(SimpleNamespace(deepspeed=None, fsdp=None))


def test_an_fsdp_accelerate_config_is_refused_before_any_work(tmp_path, tiny_vit_dir, image_folder, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config file
    monkeypatch.setattr(cdb_hf.run.sources, "load_image_datasets",
                        lambda *a, **k: pytest.fail("work started before the error"))
    with pytest.raises(ValueError, match="FSDP"):
        train(tiny_vit_dir, image_folder, tmp_path / "out")


class _RandomDraws(torch.utils.data.Dataset):
    """Each item is what an augmentation would draw from the three global RNGs."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[float, float, float]:
        return torch.rand(()).item(), random.random(), float(np.random.rand())


def test_per_example_seeding_is_order_free_and_leaves_the_global_rngs_alone():
    dataset = PerExampleSeeded(_RandomDraws(), seed=1)
    torch.manual_seed(0)
    expected_next = torch.rand(()).item()
    torch.manual_seed(0)
    forward = [dataset[i] for i in range(4)]
    assert torch.rand(()).item() == expected_next, "the global torch RNG is where it was"
    backward = [dataset[i] for i in reversed(range(4))][::-1]
    assert forward == backward, "an example's draws do not depend on what was fetched before"
    assert len(set(forward)) == 4
    dataset.set_epoch(1)
    assert all(dataset[i] != forward[i] for i in range(4)), "a new epoch, new augmentations"
    assert pickle.loads(pickle.dumps(dataset))[2] == dataset[2], "dataloader workers see the same seeds"


@pytest.mark.parametrize(("name", "processes", "machines"), [
    ("single_gpu", 1, 1), ("multi_gpu", 8, 1), ("multi_node", 16, 2), ("cpu_2proc", 2, 1)])
def test_shipped_accelerate_configs_load_as_plain_ddp(name, processes, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / f"{name}.yaml"))
    assert (config.num_processes, config.num_machines) == (processes, machines)
    assert config.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU)  # never FSDP/DeepSpeed
    assert not config.use_cpu, "accelerate's CPU launcher would start processes that each think they are alone"


def test_the_loop_gives_its_process_group_the_ddp_timeout(tmp_path, monkeypatch, tiny_vit_dir, image_folder):
    """``--ddp_timeout`` bounds the loop's barriers as it does the Trainer's (a first image check may be long)."""
    seen = {}

    class Stop(Exception):
        pass

    def recording_accelerator(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(loop, "Accelerator", recording_accelerator)
    plan = plan_run(*parse_args(["--model_name_or_path", str(tiny_vit_dir), "--train_dir", str(image_folder / "train"),
                                 "--output_dir", str(tmp_path / "out"), "--trainer", "accelerate", "--use_cpu",
                                 "--report_to", "none", "--ddp_timeout", "4321"]))
    with pytest.raises(Stop):
        loop.train(plan)
    (handler,) = seen["kwargs_handlers"]
    assert handler.timeout.total_seconds() == 4321
