"""Nothing lost, nothing silent: hostile and unlucky input, as a user would meet it.

Every case checks what must survive by content hash (the training data, the model folder, the previous
run), the exit code, and that the user sees one line. The two training paths are both covered wherever
they differ: divergence, resume guards, checkpoints killed mid-save, damaged checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import finetune_argv, run_quietly
from transformers import ViTForImageClassification

from cdb_hf import cli
from cdb_hf.run_dir import CHECKPOINT_RECORD, RUN_MARKER, read_checkpoint_record, write_run_marker

REPO = Path(__file__).resolve().parents[1]
PATHS = ("hf", "accelerate")


def tree_hashes(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (what must survive, byte for byte)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def argv_for(trainer: str, model_dir, images, output_dir, *extra: str) -> list[str]:
    return finetune_argv(model_dir, images, output_dir, "--trainer", trainer, *extra)


def one_error_line(capsys, prefix: str = "run_finetune.py: error: ") -> str:
    """The one line the user sees on stderr (a usage error; a failed run has ``run_finetune.py: `` only)."""
    error = capsys.readouterr().err
    assert "Traceback" not in error, error
    lines = error.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), error
    return lines[0]


def make_previous_run(folder: Path) -> Path:
    """An earlier, complete cdb_hf run (marker, weights, a checkpoint)."""
    (folder / "checkpoint-2").mkdir(parents=True)
    write_run_marker(folder, status="complete")
    (folder / "model.safetensors").write_bytes(b"weights of an earlier run")
    (folder / "checkpoint-2" / "model.safetensors").write_bytes(b"checkpoint of an earlier run")
    return folder


@pytest.fixture
def images(tmp_path, image_folder) -> Path:
    """A private copy of the image folder (train/ and validation/), free to be pointed at."""
    return Path(shutil.copytree(image_folder, tmp_path / "images"))


# ------------------------------------------------------------------------------------------ output dir
OUTPUT_DIRS = {
    # case: (output_dir as a function of (tmp_path, images, model), expected fragment of the one line)
    "the training folder": (lambda tmp, images, model: images / "train", "is --train_dir"),
    "the folder holding train/ and validation/": (lambda tmp, images, model: images, "contains --train_dir"),
    "a folder inside the training data": (lambda tmp, images, model: images / "train" / "red",
                                          "lies inside --train_dir"),
    "the model folder": (lambda tmp, images, model: model, "is --model_name_or_path"),
    "a folder of unrelated files": (lambda tmp, images, model: tmp / "documents",
                                    "holds files that are not a cdb_hf run"),
    "the filesystem root": (lambda tmp, images, model: Path("/"), "is the filesystem root"),
    "the home directory": (lambda tmp, images, model: tmp / "home", "is your home directory"),
    "a git work tree's root": (lambda tmp, images, model: tmp / "repo", "is the root of a git work tree"),
}


@pytest.mark.parametrize("case", list(OUTPUT_DIRS))
def test_overwrite_never_touches_what_is_not_a_previous_run(case, tmp_path, images, tiny_vit_dir, capsys,
                                                            monkeypatch):
    model = Path(shutil.copytree(tiny_vit_dir, tmp_path / "model"))
    for folder, content in (("documents", "my thesis"), ("home", None), ("repo", "code")):
        (tmp_path / folder).mkdir()
        if content:
            (tmp_path / folder / "notes.txt").write_text(content)
    (tmp_path / "repo" / ".git").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    output_dir, expected = OUTPUT_DIRS[case]
    output_dir = output_dir(tmp_path, images, model)
    before = tree_hashes(tmp_path)

    code = cli.main(finetune_argv(model, images, output_dir, "--overwrite_output_dir", "true"))

    assert code == 2
    assert expected in one_error_line(capsys)
    assert tree_hashes(tmp_path) == before


# ---------------------------------------------------------------------------------------- late values
LATE_VALUES = {
    "learning rate nan": (["--learning_rate", "nan"], "--learning_rate nan is not valid"),
    "negative learning rate": (["--learning_rate", "-1"], "--learning_rate -1.0 is not valid"),
    "batch size 0": (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0 is not valid"),
    "epochs nan": (["--max_steps", "-1", "--num_train_epochs", "nan"], "--num_train_epochs nan is not valid"),
    "epochs inf": (["--max_steps", "-1", "--num_train_epochs", "inf"], "--num_train_epochs inf is not valid"),
    "epochs 0": (["--max_steps", "-1", "--num_train_epochs", "0"], "--num_train_epochs 0.0 gives a run of no"),
    "epochs -2": (["--max_steps", "-1", "--num_train_epochs", "-2"], "--num_train_epochs -2.0 gives a run of no"),
    "cdb rate nan": (["--cdb_layer_rate", "nan"], "layer_rate"),
    "save steps 0": (["--save_steps", "0"], "--save_steps 0.0 is not valid"),
}


@pytest.mark.parametrize("case", list(LATE_VALUES))
def test_values_rejected_late_elsewhere_are_rejected_first_and_the_previous_run_stays(case, tmp_path, capsys,
                                                                                      tiny_vit_dir, image_folder):
    previous = make_previous_run(tmp_path / "out")
    before = tree_hashes(previous)
    extra, expected = LATE_VALUES[case]

    code = cli.main(finetune_argv(tiny_vit_dir, image_folder, previous, *extra, "--overwrite_output_dir", "true"))

    assert code == 2
    assert expected in one_error_line(capsys)
    assert tree_hashes(previous) == before and not list(tmp_path.glob(".out.*"))


# ------------------------------------------------------------------------------------------ divergence
@pytest.fixture
def loss_becomes_nan_from_step(monkeypatch):
    """Make the tiny ViT's training loss NaN from the given optimizer step on (1-based)."""
    forward = ViTForImageClassification.forward
    start = {}
    calls = {"training": 0}

    def poisoned(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        if self.training:
            calls["training"] += 1
            if calls["training"] >= start["step"]:
                output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(ViTForImageClassification, "forward", poisoned)
    return lambda step: start.update(step=step)


@pytest.mark.parametrize("trainer", PATHS)
def test_a_diverged_run_fails_in_one_line_keeps_the_last_good_checkpoint_and_saves_no_model(
        trainer, tmp_path, capsys, tiny_vit_dir, image_folder, loss_becomes_nan_from_step):
    loss_becomes_nan_from_step(5)
    output_dir = tmp_path / "out"

    code = cli.main(argv_for(trainer, tiny_vit_dir, image_folder, output_dir, "--max_steps", "6"))

    assert code == 1
    line = one_error_line(capsys, prefix="run_finetune.py: training diverged")
    assert "training diverged by optimizer step 6" in line and "lower --learning_rate" in line, line
    assert f"the last good checkpoint is {output_dir / 'checkpoint-4'}" in line, line
    assert not (output_dir / "model.safetensors").exists() and not (output_dir / "README.md").exists()
    assert not (output_dir / "all_results.json").exists()
    assert json.loads((output_dir / RUN_MARKER).read_text())["status"] == "failed"
    assert read_checkpoint_record(output_dir / "checkpoint-4")[0] is not None
    weights = load_file(output_dir / "checkpoint-4" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert not (output_dir / "checkpoint-6").exists(), "no checkpoint of the diverged weights"


@pytest.mark.parametrize("trainer", PATHS)
def test_a_real_divergence_restores_the_run_it_was_replacing(trainer, tmp_path, capsys, tiny_vit_dir,
                                                             image_folder):
    previous = make_previous_run(tmp_path / "out")
    before = tree_hashes(previous)

    code = cli.main(argv_for(trainer, tiny_vit_dir, image_folder, previous, "--learning_rate", "1e6",
                             "--max_grad_norm", "0", "--overwrite_output_dir", "true"))

    assert code == 1
    line = one_error_line(capsys, prefix="run_finetune.py: training diverged")
    assert "training diverged" in line and f"the previous run in {str(previous)!r} was restored" in line, line
    assert tree_hashes(previous) == before
    assert not list(tmp_path.glob(".out.failed-*")), "a failed attempt with no checkpoint is not kept"


@pytest.mark.parametrize("trainer", PATHS)
def test_a_failed_replacement_keeps_its_checkpoints_beside_the_restored_run(trainer, tmp_path, capsys,
                                                                           tiny_vit_dir, image_folder,
                                                                           loss_becomes_nan_from_step):
    """README, "Nothing lost": the failed run's checkpoints stay beside the restored one, in .<name>.failed-*."""
    previous = make_previous_run(tmp_path / "out")
    before = tree_hashes(previous)
    loss_becomes_nan_from_step(5)

    code = cli.main(argv_for(trainer, tiny_vit_dir, image_folder, previous, "--max_steps", "6",
                             "--overwrite_output_dir", "true"))

    assert code == 1
    line = one_error_line(capsys, prefix="run_finetune.py: training diverged")
    assert tree_hashes(previous) == before
    failed = list(tmp_path.glob(".out.failed-*"))
    assert len(failed) == 1, sorted(p.name for p in tmp_path.iterdir())
    assert str(failed[0]) in line, line
    assert json.loads((failed[0] / RUN_MARKER).read_text())["status"] == "failed"
    record, problem = read_checkpoint_record(failed[0] / "checkpoint-4")
    assert record is not None and record["step"] == 4, problem
    weights = load_file(failed[0] / "checkpoint-4" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_results_files_are_strict_json(tmp_path, tiny_vit_dir, image_folder):
    code, printed = run_quietly(finetune_argv(tiny_vit_dir, image_folder, tmp_path / "out", "--max_steps", "2"))
    assert code == 0, printed

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    for name in ("all_results.json", "train_results.json", "eval_results.json", RUN_MARKER,
                 f"checkpoint-2/{CHECKPOINT_RECORD}"):
        values = json.loads((tmp_path / "out" / name).read_text(), parse_constant=refuse)
        assert values


def test_a_non_finite_metric_is_written_as_null_never_as_bare_nan(tmp_path):
    from cdb_hf.hub import save_outputs

    class Tiny(torch.nn.Module):
        def save_pretrained(self, folder, **kwargs):
            (Path(folder) / "model.safetensors").write_bytes(b"weights")

    save_outputs(str(tmp_path), Tiny(), None, None, {"eval_loss": float("nan"), "train_loss": float("inf"),
                                                     "eval_accuracy": 0.5})
    for name in ("all_results.json", "eval_results.json", "train_results.json"):
        text = (tmp_path / name).read_text()
        assert "NaN" not in text and "Infinity" not in text
    assert json.loads((tmp_path / "all_results.json").read_text()) == {"eval_loss": None, "train_loss": None,
                                                                      "eval_accuracy": 0.5}


# ------------------------------------------------------------------------------------------ resume guard


CHANGED_SETTINGS = {
    "seed": (["--cdb_seed", "1"], "seed: 0 in the checkpoint, 1 now"),
    "channel rate": (["--cdb_channel_rate", "0.5"], "channel_rate: 0.3 in the checkpoint, 0.5 now"),
    "cdb off": (["--cdb", "false"], "cdb: true in the checkpoint, false now"),
}


@pytest.mark.parametrize("trainer", PATHS)
@pytest.mark.parametrize("change", list(CHANGED_SETTINGS))
def test_resuming_with_other_cdb_settings_is_refused_naming_both_values(change, trainer, tmp_path, capsys,
                                                                       saved_runs, tiny_vit_dir, image_folder):
    extra, expected = CHANGED_SETTINGS[change]
    checkpoint = saved_runs[trainer] / "checkpoint-2"
    before = tree_hashes(saved_runs[trainer])

    code = cli.main(argv_for(trainer, tiny_vit_dir, image_folder, tmp_path / "resumed", "--max_steps", "6",
                             "--resume_from_checkpoint", str(checkpoint), *extra))

    assert code == 2
    line = one_error_line(capsys)
    assert expected in line and "--resume_allow_cdb_changes" in line, line
    assert tree_hashes(saved_runs[trainer]) == before and not (tmp_path / "resumed").exists()


@pytest.mark.parametrize("trainer", PATHS)
def test_resume_allow_cdb_changes_goes_ahead_and_says_so(trainer, tmp_path, saved_runs, tiny_vit_dir,
                                                        image_folder, caplog):
    code, printed = run_quietly(argv_for(trainer, tiny_vit_dir, image_folder, tmp_path / "resumed", "--max_steps",
                                         "6", "--resume_from_checkpoint", str(saved_runs[trainer] / "checkpoint-2"),
                                         "--cdb_seed", "1", "--resume_allow_cdb_changes", "true"))
    assert code == 0, printed
    assert "seed: 0 in the checkpoint, 1 now" in caplog.text and "resuming anyway" in caplog.text
    assert (tmp_path / "resumed" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def saved_linear_runs(tmp_path_factory, tiny_vit_dir, image_folder):
    """Per path: a 4-step run with --cdb_schedule linear (a setting that depends on the run's length)."""
    runs = {}
    for trainer in PATHS:
        output_dir = tmp_path_factory.mktemp(f"linear_{trainer}") / "out"
        code, printed = run_quietly(argv_for(trainer, tiny_vit_dir, image_folder, output_dir, "--max_steps", "4",
                                             "--cdb_schedule", "linear"))
        assert code == 0, printed
        runs[trainer] = output_dir
    return runs


@pytest.mark.parametrize("trainer", PATHS)
def test_resuming_a_run_length_dependent_schedule_with_another_length_is_refused_once_training_starts(
        trainer, tmp_path, capsys, saved_linear_runs, tiny_vit_dir, image_folder):
    """The run-sized settings (a linear schedule's total steps) are only known once training starts: that
    in-training check must refuse, as pre-flight does for the user-level settings."""
    checkpoint = saved_linear_runs[trainer] / "checkpoint-2"
    before = tree_hashes(saved_linear_runs[trainer])

    code = cli.main(argv_for(trainer, tiny_vit_dir, image_folder, tmp_path / "resumed", "--max_steps", "8",
                             "--cdb_schedule", "linear", "--resume_from_checkpoint", str(checkpoint)))

    assert code == 2
    line = one_error_line(capsys)
    assert "other ChannelDropBack settings" in line and "--resume_allow_cdb_changes" in line, line
    assert "in the checkpoint" in line and "8 now" in line, line
    assert tree_hashes(saved_linear_runs[trainer]) == before
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    assert not list((tmp_path / "resumed").glob("checkpoint-*"))


# ---------------------------------------------------------------------------------- killed while saving
KILL_POINTS = {
    # (path, where the process dies during the save of checkpoint-4, the second save)
    ("hf", "model saved, optimizer not"): "transformers.trainer:Trainer._save_optimizer_and_scheduler",
    ("hf", "everything but the trainer state"): "transformers.trainer_callback:TrainerState.save_to_json",
    ("hf", "everything but the record"): "cdb_hf.trainer_path:write_checkpoint_record",
    ("hf", "record written, older checkpoint not yet rotated"): "cdb_hf.trainer_path:rotate_checkpoints",
    ("accelerate", "model saved, optimizer not"): "accelerate.accelerator:save_accelerator_state",
    ("accelerate", "everything but the record"): "cdb_hf.accelerate_loop:write_checkpoint_record",
}


@pytest.mark.parametrize("trainer,point", list(KILL_POINTS))
def test_a_run_killed_while_saving_resumes_to_the_uninterrupted_weights(trainer, point, tmp_path, saved_runs,
                                                                        tiny_vit_dir, image_folder, caplog):
    output_dir = tmp_path / "out"
    argv = argv_for(trainer, tiny_vit_dir, image_folder, output_dir, "--max_steps", "6", "--save_total_limit", "1")
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "kill_worker.py"), KILL_POINTS[trainer, point],
                             "2", *argv], capture_output=True, text=True, timeout=240, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO),
                                                                              os.environ.get("PYTHONPATH", "")])})
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert (output_dir / "checkpoint-4").is_dir()
    complete = [p.name for p in output_dir.glob("checkpoint-*") if read_checkpoint_record(p)[0] is not None]
    assert complete, "a kill while saving must leave a complete checkpoint to resume from"

    code, printed = run_quietly(argv + ["--resume_from_checkpoint", "true"])

    assert code == 0, printed
    if "checkpoint-4" not in complete:
        assert f"skipped incomplete checkpoint {output_dir / 'checkpoint-4'}" in caplog.text, caplog.text
    straight = load_file(saved_runs[trainer] / "model.safetensors")
    resumed = load_file(output_dir / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert [p.name for p in output_dir.glob("checkpoint-*")] == ["checkpoint-6"]


# ------------------------------------------------------------------------------------- hostile checkpoints
def loop_state(record: dict, **changes) -> dict:
    record = json.loads(json.dumps(record))
    record["loop"].update(changes)
    return record


@pytest.mark.parametrize("changes,expected", [
    ({"completed_steps": 1e30}, "completed_steps=1e+30 is not an integer >= 0"),
    ({"completed_steps": True}, "completed_steps=True is not an integer >= 0"),
    ({"completed_steps": 40}, "completed_steps=40 is beyond this run's 6 optimizer steps"),
    ({"log_history": "junk"}, "log_history is not a list"),
    ({"log_history": [{"loss": "NaN", "step": [1]}]}, "log_history holds a value that is neither"),
])
def test_the_loop_does_not_trust_its_checkpoint_state(changes, expected, tmp_path, capsys, saved_runs,
                                                      tiny_vit_dir, image_folder):
    checkpoint = Path(shutil.copytree(saved_runs["accelerate"] / "checkpoint-2", tmp_path / "ckpt" / "checkpoint-2"))
    record = json.loads((checkpoint / CHECKPOINT_RECORD).read_text())
    (checkpoint / CHECKPOINT_RECORD).write_text(json.dumps(loop_state(record, **changes)))

    code = cli.main(argv_for("accelerate", tiny_vit_dir, image_folder, tmp_path / "resumed", "--max_steps", "6",
                             "--resume_from_checkpoint", str(checkpoint)))

    assert code == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "resumed").exists()


def other_models_weights(checkpoint: Path) -> None:
    weights = load_file(checkpoint / "model.safetensors")
    save_file({f"other.{name}": tensor for name, tensor in weights.items()}, checkpoint / "model.safetensors")
    record = json.loads((checkpoint / CHECKPOINT_RECORD).read_text())  # a record that agrees with the files
    record["files"]["model.safetensors"] = (checkpoint / "model.safetensors").stat().st_size
    (checkpoint / CHECKPOINT_RECORD).write_text(json.dumps(record))


def unsafe_optimizer_pickle(checkpoint: Path) -> None:
    import collections

    target = checkpoint / "optimizer.pt"
    torch.save({"state": collections.OrderedDict(), "hostile": collections.Counter("pickle")}, target)
    record = json.loads((checkpoint / CHECKPOINT_RECORD).read_text())
    record["files"]["optimizer.pt"] = target.stat().st_size
    (checkpoint / CHECKPOINT_RECORD).write_text(json.dumps(record))


DAMAGES = {
    "empty weights": (lambda c: (c / "model.safetensors").write_bytes(b""), "its model weights cannot be loaded"),
    "truncated weights": (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:200]),
                          "its model weights cannot be loaded"),
    "another model's weights": (other_models_weights, "does not hold this model's weights"),
    "garbage trainer state": (lambda c: (c / "trainer_state.json").write_text("{not json"), "trainer_state.json"),
    "a pickle weights_only refuses": (unsafe_optimizer_pickle, "optimizer"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_refused_in_one_line_without_unsafe_advice(damage, tmp_path, capsys, saved_runs,
                                                                           tiny_vit_dir, image_folder):
    checkpoint = Path(shutil.copytree(saved_runs["hf"] / "checkpoint-2", tmp_path / "ckpt" / "checkpoint-2"))
    edit, expected = DAMAGES[damage]
    edit(checkpoint)

    code = cli.main(argv_for("hf", tiny_vit_dir, image_folder, tmp_path / "resumed", "--max_steps", "6",
                             "--resume_from_checkpoint", str(checkpoint)))

    assert code == 2
    line = one_error_line(capsys)
    assert expected in line and "weights_only=False" not in line, line
    assert not (tmp_path / "resumed" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------- what the user sees
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_flag(flag):
    result = subprocess.run([sys.executable, str(REPO / "run_finetune.py"), flag], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for option in ("--cdb_channel_rate", "--cdb_layer_selection", "--overwrite_output_dir",
                   "--resume_allow_cdb_changes", "--learning_rate", "--train_dir"):
        assert option in result.stdout


def test_an_error_found_after_the_model_loads_is_still_one_line(tmp_path, tiny_vit_dir, image_folder):
    """The start-up logs are held back until training starts, so a late refusal prints only itself."""
    result = subprocess.run([sys.executable, str(REPO / "run_finetune.py"),
                             *finetune_argv(tiny_vit_dir, image_folder, tmp_path / "out"),
                             "--cdb_include", "*no_such_layer*", "--log_level", "info"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "include pattern '*no_such_layer*' matches no" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_validation_class_unseen_in_training_is_warned_about(caplog):
    import datasets

    from cdb_hf.run import _warn_about_unseen_classes

    features = datasets.Features({"label": datasets.ClassLabel(names=["blue", "green", "red"])})
    split = {"train": datasets.Dataset.from_dict({"label": [0, 1, 0, 1]}, features=features),
             "validation": datasets.Dataset.from_dict({"label": [0, 2, 2]}, features=features)}
    with caplog.at_level("WARNING", logger="cdb_hf"):
        _warn_about_unseen_classes(datasets.DatasetDict(split), ["blue", "green", "red"])
    assert "class(es) with no training example: ['red']" in caplog.text

    caplog.clear()
    split["validation"] = split["train"]
    with caplog.at_level("WARNING", logger="cdb_hf"):
        _warn_about_unseen_classes(datasets.DatasetDict(split), ["blue", "green", "red"])
    assert "no training example" not in caplog.text
