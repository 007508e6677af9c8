"""`make demo` (python -m cdb_hf.demo): a reduced-budget smoke run, its outputs, and its input checks."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from cdb_hf import builtin, cli
from cdb_hf.demo import (
    BENCHMARK_RESULTS,
    benchmark_verdict,
    build_argv,
    main,
    prepare_base_checkpoint,
    recipe_path,
)

QUICK = ["--image_size", "32", "--max_steps", "2", "--max_train_samples", "16", "--max_eval_samples", "16",
         "--eval_strategy", "steps", "--eval_steps", "1"]


def test_base_checkpoint_is_the_builtin_weights_at_a_smaller_size():
    path = prepare_base_checkpoint(32)
    assert prepare_base_checkpoint(32) == path  # exported once
    assert json.loads((path / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 32, 32]
    source = builtin.builtin_model_dir("builtin:efficientnet_lite0")
    original, derived = load_file(source / "model.safetensors"), load_file(path / "model.safetensors")
    assert original.keys() == derived.keys() and all(original[k].equal(derived[k]) for k in original)
    with pytest.raises(ValueError, match="image_size"):
        prepare_base_checkpoint(8)


def test_demo_runs_its_recipe_at_32_px_unless_told_otherwise(tmp_path):
    """The demo reads the benchmark recipe; it changes the resolution and, for the quick run, the seeds."""
    import yaml

    recipe = yaml.safe_load(recipe_path().read_text())
    model_args, data_args, _, run_args, training_args = cli.parse_args(build_argv(tmp_path, []))
    assert (model_args.model_name_or_path, model_args.image_size) == (recipe["model_name_or_path"], 32)
    assert data_args.dataset_name == recipe["dataset_name"] and run_args.ab_seeds == 1
    assert training_args.learning_rate == recipe["learning_rate"]
    assert cli.parse_args(build_argv(tmp_path, ["--image_size", "64"]))[0].image_size == 64
    benchmark = cli.parse_args(build_argv(tmp_path, ["--ab_seeds", "10"]))
    assert benchmark[3].ab_seeds == 10


def test_demo_smoke_run(tmp_path, capsys):
    output_dir = tmp_path / "demo"
    assert main(["--output_dir", str(output_dir), *QUICK]) == 0
    printed = capsys.readouterr().out
    for row in ("validation accuracy (%)", "validation loss", "training time (s)"):
        assert row in printed
    assert benchmark_verdict() in printed  # the 10-seed verdict sits under the one-seed table
    results = json.loads((output_dir / "results.json").read_text())
    assert results["summary"]["complete_seeds"] == [0] and results["summary"]["failed_runs"] == []
    table_line = next(line for line in printed.splitlines() if line.startswith("validation accuracy"))
    accuracy = results["summary"]["metrics"]["eval_accuracy"]
    assert f"{100 * accuracy['baseline']['mean']:.2f}" in table_line
    assert f"{100 * accuracy['cdb']['mean']:.2f}" in table_line
    for arm in ("baseline", "cdb"):
        run_dir = output_dir / "seed0" / arm
        assert (run_dir / "model.safetensors").is_file()
        config = json.loads((run_dir / "config.json").read_text())
        assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]  # the model remembers its resolution
        assert config["model_args"].get("img_size") is None  # a CNN: only the preprocessing changed
    assert (output_dir / "seed0" / "cdb" / "cdb_config.json").is_file()
    assert not (output_dir / "seed0" / "baseline" / "cdb_config.json").exists()
    curve = next(r["curve"] for r in results["runs"] if r["arm"] == "cdb")
    assert [point["step"] for point in curve] == [1.0, 2.0]
    assert (output_dir / "ab_plot.png").read_bytes()[:4] == b"\x89PNG"

    # Bad input is refused before the previous results are touched ...
    before = (output_dir / "results.json").read_bytes()
    assert main(["--output_dir", str(output_dir), *QUICK, "--cdb_channel_rate", "1.5"]) == 2
    assert "channel_rate" in capsys.readouterr().err
    assert (output_dir / "results.json").read_bytes() == before
    # ... and an earlier demo's results are what a rerun replaces, leaving nothing of them beside it.
    assert main(["--output_dir", str(output_dir), *QUICK, "--seed", "1"]) == 0
    assert json.loads((output_dir / "results.json").read_text())["summary"]["complete_seeds"] == [1]
    assert not (output_dir / "seed0").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    output_dir = tmp_path / "mine"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("keep me")
    assert main(["--output_dir", str(output_dir), *QUICK]) == 2
    assert "holds files that are not a cdb_hf run" in capsys.readouterr().err
    assert (output_dir / "notes.txt").read_text() == "keep me"


def test_the_verdict_is_read_from_the_benchmark_results_not_typed_in(tmp_path):
    """The verdict line carries whatever the benchmark's results.json says, and says when it is missing."""
    shipped = json.loads((BENCHMARK_RESULTS / "results.json").read_text())["summary"]
    difference = shipped["metrics"]["eval_accuracy"]["difference"]
    line = benchmark_verdict()
    assert f"{100 * difference['ci_low']:+.2f}" in line and f"{100 * difference['ci_high']:+.2f}" in line
    assert f"{len(shipped['complete_seeds'])} paired seeds" in line and "--ab_seeds 10" in line

    forged = {"summary": {"complete_seeds": [7, 8, 9], "metrics": {"eval_accuracy": {"difference": {
        "mean": 0.0123, "ci_low": 0.0045, "ci_high": 0.0201, "p_value": 0.01}}}}}
    folder = tmp_path / "bench" / "results" / "study"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(forged))
    line = benchmark_verdict(folder)
    assert "+1.23 points" in line and "[+0.45, +2.01]" in line and "3 paired seeds 7-9" in line
    assert "a detectable difference" in line
    assert "not shipped" in benchmark_verdict(tmp_path / "missing")
