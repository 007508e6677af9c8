"""run_finetune.py end to end (in-process through cli.main), resume, forward consistency and every bad input."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, RepoUrl
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoImageProcessor

import cdb_hf.run
from cdb_hf import cli
from cdb_hf.core import ChannelDropBackConfig
from cdb_hf.run_dir import write_run_marker

HUB_TOKEN = "hf_notARealTokenButSecret123"
OUTPUT_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "cdb_config.json", "README.md",
                "all_results.json", "train_results.json", "eval_results.json", "trainer_state.json",
                "eval_per_class.csv", "eval_confusion_matrix.csv", "eval_confusion_matrix.png"}


def finetune_argv(model_dir, image_folder, output_dir, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--train_dir", str(image_folder / "train"),
            "--validation_dir", str(image_folder / "validation"), "--output_dir", str(output_dir),
            "--max_steps", "4", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
            "--learning_rate", "1e-3", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "2",
            "--report_to", "none", "--use_cpu", "true", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
            "--seed", "0", *extra]


def run_quietly(argv: list[str]) -> tuple[int, str]:
    """cli.main in-process; returns (exit code, everything printed)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = cli.main(argv)
    return code, printed.getvalue()


def final_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(output_dir) / "model.safetensors"))


def assert_same_weights(left_dir, right_dir) -> None:
    left, right = final_weights(left_dir), final_weights(right_dir)
    assert left.keys() == right.keys()
    different = [name for name in left if not torch.equal(left[name], right[name])]
    assert not different, f"weights differ: {different}"


def resume_from_half(run_dir, resumed_dir, argv_for) -> None:
    """What an interrupted run leaves (its first checkpoint), then resume it with the same flags."""
    resumed_dir.mkdir()
    shutil.copytree(run_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    code, printed = run_quietly(argv_for(resumed_dir) + ["--resume_from_checkpoint", "true"])
    assert code == 0, printed


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, tiny_vit_dir, image_folder):
    """One CDB fine-tuning of the tiny ViT, pushed to a Hub whose network boundary is replaced."""
    output_dir = tmp_path_factory.mktemp("vit") / "run"
    hub_calls: dict = {}
    trained: dict = {}

    def fake_create_repo(self, repo_id, **kwargs):
        hub_calls["create_repo"] = {"repo_id": repo_id, "token": self.token, **kwargs}
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        files = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
        uploaded = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        hub_calls["upload_folder"] = {"repo_id": repo_id, "token": self.token, "files": uploaded,
                                      "contents": {name: (Path(folder_path) / name).read_bytes() for name in uploaded}}

    real_save_outputs = cdb_hf.run.save_outputs

    def spy_save_outputs(output_dir, model, *args, **kwargs):
        trained["model"] = model
        return real_save_outputs(output_dir, model, *args, **kwargs)

    argv = finetune_argv(tiny_vit_dir, image_folder, output_dir, "--cdb_channel_rate", "0.5", "--push_to_hub",
                         "true", "--hub_model_id", "someone/tiny-vit-cdb", "--hub_token", HUB_TOKEN)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HfApi, "create_repo", fake_create_repo)
        patch.setattr(HfApi, "upload_folder", fake_upload_folder)
        patch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        patch.setattr(cdb_hf.run, "save_outputs", spy_save_outputs)
        code, printed = run_quietly(argv)
    assert code == 0, printed
    return SimpleNamespace(output_dir=output_dir, hub=hub_calls, model=trained["model"], printed=printed,
                           argv_for=lambda out: finetune_argv(tiny_vit_dir, image_folder, out, "--cdb_channel_rate",
                                                              "0.5"))


@pytest.fixture(scope="module")
def convnext_run(tmp_path_factory, tiny_convnext_dir, image_folder):
    """The tiny ConvNeXt through a YAML recipe whose values the command line partly overrides."""
    root = tmp_path_factory.mktemp("convnext")
    recipe = root / "recipe.yaml"
    recipe.write_text("learning_rate: 0.002\nmax_steps: 50\ncdb_mode: exact\ncdb_channel_rate: 0.25\n"
                      "cdb_layer_selection: bernoulli\ncdb_layer_rate: 0.5\n")

    def argv_for(out):
        return [str(recipe)] + finetune_argv(tiny_convnext_dir, image_folder, out)

    # finetune_argv sets --max_steps 4 and --learning_rate 1e-3: both override the recipe.
    code, printed = run_quietly(argv_for(root / "run"))
    assert code == 0, printed
    return SimpleNamespace(output_dir=root / "run", argv_for=argv_for, printed=printed)


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory, tiny_timm_dir, image_folder):
    """A timm checkpoint (TimmWrapper) saved the way timm's Hub repos are."""
    root = tmp_path_factory.mktemp("timm")

    def argv_for(out):
        return finetune_argv(tiny_timm_dir, image_folder, out, "--cdb_channel_rate", "0.5")

    # The Trainer path's --do_predict is checked on this run (test_trainer_path_predicts_an_image_folder).
    code, printed = run_quietly(argv_for(root / "run") + ["--do_predict", "--predict_dir", str(image_folder / "train")])
    assert code == 0, printed
    return SimpleNamespace(output_dir=root / "run", argv_for=argv_for, printed=printed)


# ---------------------------------------------------------------------------------------------- parsing
def test_parse_args_reads_a_recipe_and_flags_override_it(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"model_name_or_path": "google/vit-base-patch16-224-in21k", "learning_rate": 0.5,
                                  "cdb_channel_rate": 0.4, "cdb_include": ["*attention*"], "output_dir": "out"}))
    model_args, data_args, cdb_args, run_args, training_args = cli.parse_args(
        [str(recipe), "--learning_rate", "1e-4", "--cdb", "false", "--train_dir", "images"])
    assert model_args.model_name_or_path == "google/vit-base-patch16-224-in21k"
    assert training_args.learning_rate == 1e-4 and training_args.output_dir == "out"
    assert cdb_args.cdb_channel_rate == 0.4 and cdb_args.cdb_include == ["*attention*"]
    assert cdb_args.to_config() is None and data_args.train_dir == "images" and run_args.trainer == "hf"

    recipe.write_text(json.dumps({"learning_rat": 0.1}))
    with pytest.raises(ValueError, match="unknown key.*learning_rat"):
        cli.parse_args([str(recipe)])


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("run_name", ["vit_run", "convnext_run", "timm_run"])
def test_end_to_end_writes_every_output(request, run_name):
    run = request.getfixturevalue(run_name)
    output_dir = run.output_dir
    # timm keeps its preprocessing in config.json (TimmWrapperImageProcessor writes no file of its own).
    expected = OUTPUT_FILES - {"preprocessor_config.json"} if run_name == "timm_run" else OUTPUT_FILES
    assert expected <= {p.name for p in output_dir.iterdir()}
    # The saved processor prepares an image exactly as the checkpoint's own did (the run saves what it used).
    source = request.getfixturevalue({"vit_run": "tiny_vit_dir", "convnext_run": "tiny_convnext_dir",
                                      "timm_run": "tiny_timm_dir"}[run_name])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (21, 27, 3), dtype=np.uint8))
    saved, original = AutoImageProcessor.from_pretrained(output_dir), AutoImageProcessor.from_pretrained(source)
    assert type(saved) is type(original)
    assert torch.equal(saved(image, return_tensors="pt")["pixel_values"],
                       original(image, return_tensors="pt")["pixel_values"])
    results = json.loads((output_dir / "all_results.json").read_text())
    assert {"train_loss", "eval_loss", "eval_accuracy"} <= results.keys()
    assert "eval_top5_accuracy" not in results, "3 classes: no top-5 accuracy"
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == state["max_steps"] == 4
    train_logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert train_logs and all("cdb/applied" in entry and "cdb/keep_fraction" in entry for entry in train_logs)
    assert AutoConfig.from_pretrained(output_dir).id2label == {0: "blue", 1: "green", 2: "red"}
    cdb_config = ChannelDropBackConfig.from_dict(json.loads((output_dir / "cdb_config.json").read_text()))
    if run_name == "convnext_run":  # recipe values, except where a flag overrode them
        assert (cdb_config.mode, cdb_config.channel_rate, cdb_config.layer_selection) == ("exact", 0.25, "bernoulli")
        assert "learning_rate: 0.001" in (output_dir / "README.md").read_text()
    else:
        assert cdb_config == ChannelDropBackConfig(channel_rate=0.5)
    assert "Traceback" not in run.printed


def test_rate_zero_equals_a_run_without_cdb(tmp_path, tiny_convnext_dir, image_folder):
    def argv(out, *extra):
        return finetune_argv(tiny_convnext_dir, image_folder, out, "--save_strategy", "no", "--max_steps", "3",
                             *extra)

    code, printed = run_quietly(argv(tmp_path / "baseline", "--cdb", "false"))
    assert code == 0, printed
    code, printed = run_quietly(argv(tmp_path / "rate0", "--cdb_layer_rate", "0"))
    assert code == 0, printed
    assert not (tmp_path / "baseline" / "cdb_config.json").exists()
    assert "without** ChannelDropBack" in (tmp_path / "baseline" / "README.md").read_text()
    assert_same_weights(tmp_path / "baseline", tmp_path / "rate0")
    logged = json.loads((tmp_path / "rate0" / "trainer_state.json").read_text())["log_history"][0]
    assert logged["cdb/applied"] == 0.0


@pytest.mark.parametrize("run_name", ["vit_run", "convnext_run", "timm_run"])
def test_resume_from_half_way_ends_bitwise_equal(request, tmp_path, run_name):
    run = request.getfixturevalue(run_name)
    resume_from_half(run.output_dir, tmp_path / "resumed", run.argv_for)
    assert_same_weights(run.output_dir, tmp_path / "resumed")


def test_saved_model_loads_without_cdb_hf_and_gives_the_same_logits(tmp_path, vit_run):
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(pixels, tmp_path / "pixels.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForImageClassification\n"
        "torch.set_num_threads(1)\n"
        "model = AutoModelForImageClassification.from_pretrained(sys.argv[1]).eval()\n"
        "with torch.no_grad():\n"
        "    logits = model(pixel_values=torch.load(sys.argv[2], weights_only=True)).logits\n"
        "assert not any(name.split('.')[0] == 'cdb_hf' for name in sys.modules), 'cdb_hf was imported'\n"
        "torch.save(logits, sys.argv[3])\n"
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script, str(vit_run.output_dir), str(tmp_path / "pixels.pt"),
                    str(tmp_path / "logits.pt")], check=True, cwd=tmp_path, env=environment, timeout=120)
    fresh_logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    model = vit_run.model.eval()
    with torch.no_grad():
        trained_logits = model(pixel_values=pixels).logits
    torch.testing.assert_close(fresh_logits, trained_logits, rtol=0, atol=1e-6)


def test_trainer_path_predicts_an_image_folder(timm_run, image_folder):
    with open(timm_run.output_dir / "predictions.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    train = image_folder / "train"
    assert rows[0] == ["file", "predicted_label", "top1_label", "top1_probability", "top2_label", "top2_probability",
                       "top3_label", "top3_probability"]
    assert [row[0] for row in rows[1:]] == sorted(p.relative_to(train).as_posix() for p in train.rglob("*.png"))
    assert all(row[1] == row[2] and 0.999 <= sum(float(p) for p in row[3::2]) <= 1.00001 for row in rows[1:])


def test_push_to_hub_uploads_the_run_with_its_model_card(vit_run):
    hub = vit_run.hub
    assert hub["create_repo"]["repo_id"] == "someone/tiny-vit-cdb" and hub["create_repo"]["exist_ok"]
    upload = hub["upload_folder"]
    assert upload["repo_id"] == "someone/tiny-vit-cdb"
    assert upload["token"] == hub["create_repo"]["token"] == HUB_TOKEN, "the user's token is used ..."
    assert set(upload["files"]) == OUTPUT_FILES, "... every output, and no intermediate checkpoint"
    for name, content in upload["contents"].items():
        assert HUB_TOKEN.encode() not in content, f"token leaked into {name}"
    assert HUB_TOKEN not in vit_run.printed, "... and the token is never logged"

    card = upload["contents"]["README.md"].decode()
    eval_accuracy = json.loads(upload["contents"]["all_results.json"])["eval_accuracy"]
    assert str(vit_run.argv_for("x")[1]) in card, "base model"
    assert "train" in card and "image-classification" in card, "dataset and task"
    assert "- channel_rate: 0.5" in card and "- mode: grad" in card, "CDB hyperparameters"
    assert f"| eval_accuracy | {eval_accuracy:.4f} |" in card, "final metrics"
    assert "needs no extra code" in card and "AutoModelForImageClassification" in card


# ---------------------------------------------------------------------------------------------- bad input
def make_dataset_without_image_column(root: Path) -> list[str]:
    import datasets

    path = root / "texts"
    datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1]}).save_to_disk(str(path))
    return ["--dataset_name", str(path)]


def make_dataset_with_float_labels(root: Path) -> list[str]:
    import datasets
    import numpy as np

    path = root / "floats"
    images = [np.full((8, 8, 3), value, dtype=np.uint8) for value in (0, 80, 160, 240)]
    features = datasets.Features({"image": datasets.Image(), "score": datasets.Value("float32")})
    datasets.Dataset.from_dict({"image": images, "score": [0.1, 0.2, 0.3, 0.4]}, features=features).save_to_disk(
        str(path))
    return ["--dataset_name", str(path), "--label_column_name", "score"]


def copy_folder_with(image_folder: Path, root: Path, edit) -> list[str]:
    copy = root / "images"
    shutil.copytree(image_folder, copy)
    edit(copy)
    return ["--train_dir", str(copy / "train"), "--validation_dir", str(copy / "validation")]


def empty_validation(folder: Path) -> None:
    shutil.rmtree(folder / "validation")
    (folder / "validation").mkdir()


def unknown_validation_class(folder: Path) -> None:
    shutil.copytree(folder / "validation" / "red", folder / "validation" / "purple")


def corrupt_image(folder: Path) -> None:
    (folder / "train" / "green" / "broken.png").write_bytes(b"\x89PNG but not really an image")


BAD_INPUTS = {
    # name: (extra flags or a function of (tmp_path, image_folder) giving data flags, expected message fragment)
    "unknown model id": (["--model_name_or_path", "nobody/no-such-model"], "Hub is unreachable"),
    "missing local model": (["--model_name_or_path", "./no/such/checkpoint"], "no such directory"),
    "no image column": (lambda root, images: make_dataset_without_image_column(root), "has no image column"),
    "label column of floats": (lambda root, images: make_dataset_with_float_labels(root), "expected a ClassLabel"),
    "missing train split": (lambda root, images: ["--train_dir", str(root / "nowhere")], "does not exist"),
    "empty validation split": (lambda root, images: copy_folder_with(images, root, empty_validation),
                               "has no class sub-folders"),
    "label mismatch": (lambda root, images: copy_folder_with(images, root, unknown_validation_class),
                       "has classes that --train_dir"),
    "corrupt image": (lambda root, images: copy_folder_with(images, root, corrupt_image), "not readable images"),
    "cdb rate out of range": (["--cdb_channel_rate", "1.5"], "channel_rate=1.5 is out of range"),
    "unknown cdb mode": (["--cdb_mode", "sideways"], "invalid choice: 'sideways'"),
    "unknown augmentation": (["--train_augmentation", "rotate"], "invalid choice: 'rotate'"),
    "extra arm without ab": (["--ab_extra_arm", "weight_decay=0.1"], "needs --ab_seeds"),
    "include matches nothing": (["--cdb_include", "*no_such_layer*"], "include pattern '*no_such_layer*' matches no"),
    "exclude matches nothing": (["--cdb_exclude", "*no_such_layer*"], "exclude pattern '*no_such_layer*' matches no"),
    "missing resume checkpoint": (["--resume_from_checkpoint", "/no/such/checkpoint-7"], "not a checkpoint folder"),
    "deepspeed": (["--deepspeed", "ds_config.json"], "does not support DeepSpeed"),
    "fsdp": (["--fsdp", "full_shard"], "does not support FSDP"),
    "batch eval metrics": (["--batch_eval_metrics", "true"], "--batch_eval_metrics true is not supported"),
}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def make_previous_run(folder: Path) -> Path:
    """What an earlier cdb_hf run leaves: its marker and its files."""
    folder.mkdir()
    write_run_marker(folder, status="complete")
    (folder / "model.safetensors").write_bytes(b"weights of an earlier run")
    return folder


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_in_one_line_and_leaves_the_output_dir_untouched(case, tmp_path, capsys, tiny_vit_dir,
                                                                          image_folder):
    extra, expected = BAD_INPUTS[case]
    if callable(extra):
        data_flags = extra(tmp_path, image_folder)
        argv = finetune_argv(tiny_vit_dir, image_folder, tmp_path / "out")
        for flag in ("--train_dir", "--validation_dir"):  # the case's data replaces the good image folder
            index = argv.index(flag)
            del argv[index:index + 2]
        argv += data_flags
    else:
        argv = finetune_argv(tiny_vit_dir, image_folder, tmp_path / "out") + extra
    previous_run = make_previous_run(tmp_path / "out")
    before = snapshot(previous_run)

    code = cli.main(argv + ["--overwrite_output_dir", "true"])

    error = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in error
    last_line = error.strip().splitlines()[-1]
    assert last_line.startswith("run_finetune.py: error: ") and expected in last_line, error
    assert snapshot(previous_run) == before


def test_an_output_dir_holding_another_run_is_refused(tmp_path, capsys, tiny_vit_dir, image_folder):
    previous_run = make_previous_run(tmp_path / "out")
    before = snapshot(previous_run)
    assert cli.main(finetune_argv(tiny_vit_dir, image_folder, previous_run)) == 2
    error = capsys.readouterr().err
    assert error.strip() == (f"run_finetune.py: error: output_dir {str(previous_run)!r} already holds a different "
                             "run; pass --overwrite_output_dir to write over it, --resume_from_checkpoint true to "
                             "continue it, or choose another --output_dir")
    assert snapshot(previous_run) == before


def test_overwrite_output_dir_replaces_a_previous_cdb_run_with_a_baseline(tmp_path, tiny_vit_dir, image_folder):
    output_dir = tmp_path / "out"
    code, printed = run_quietly(finetune_argv(tiny_vit_dir, image_folder, output_dir, "--max_steps", "2"))
    assert code == 0, printed
    assert (output_dir / "cdb_config.json").is_file() and (output_dir / "checkpoint-2").is_dir()

    code, printed = run_quietly(finetune_argv(tiny_vit_dir, image_folder, output_dir, "--max_steps", "1",
                                              "--save_strategy", "no", "--cdb", "false",
                                              "--overwrite_output_dir", "true"))
    assert code == 0, printed
    assert not list(output_dir.glob("checkpoint-*")), "stale checkpoints would be resumed or rotated"
    assert not (output_dir / "cdb_config.json").exists(), "a stale CDB config would label the baseline a CDB run"
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 1


def test_run_finetune_script_reports_bad_input_in_one_line(tmp_path):
    """The real script, in a fresh process: exit code 2 and exactly one line on stderr."""
    script = Path(__file__).resolve().parents[1] / "run_finetune.py"
    result = subprocess.run([sys.executable, str(script), "--model_name_or_path", "nobody/no-such-model",
                             "--train_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                             "--cdb_layer_rate", "2"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["run_finetune.py: error: layer_rate=2.0 is out of range; it must be a "
                                          "number in [0, 1]"]
    assert not (tmp_path / "out").exists()
