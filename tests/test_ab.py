"""The A/B runner: paired statistics, failed-run reporting, output files, and a tiny end-to-end run."""

from __future__ import annotations

import csv
import json
import math

import pytest
from safetensors.torch import load_file
from scipy import stats

import cdb_hf.ab
import cdb_hf.run
from cdb_hf import cli
from cdb_hf.ab import (
    ARMS,
    ArmRun,
    arm_plan,
    load_eval_curve,
    paired_difference,
    run_ab,
    summarize,
)
from cdb_hf.ab_report import write_results
from cdb_hf.errors import UsageError
from cdb_hf.preflight import plan_run

BASELINE = [0.80, 0.82, 0.79, 0.85]
CDB = [0.81, 0.84, 0.79, 0.86]


# ------------------------------------------------------------------------------------------- statistics


def test_paired_difference_matches_a_hand_computed_example():
    # d = [0.01, 0.02, 0.00, 0.01]: mean 0.01, sample std sqrt(0.0002 / 3), t(0.975, df=3) = 3.182446 (table).
    result = paired_difference(BASELINE, CDB)
    std = math.sqrt(0.0002 / 3)
    half_width = 3.182446 * std / 2.0
    assert result["n"] == 4
    assert result["mean"] == pytest.approx(0.01)
    assert result["std"] == pytest.approx(std)
    assert result["ci_low"] == pytest.approx(0.01 - half_width, abs=1e-7)
    assert result["ci_high"] == pytest.approx(0.01 + half_width, abs=1e-7)


def test_paired_difference_agrees_with_scipy_paired_t_test():
    reference = stats.ttest_rel(CDB, BASELINE)
    interval = reference.confidence_interval(0.90)
    result = paired_difference(BASELINE, CDB, confidence=0.90)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((interval.low, interval.high))
    assert result["p_value"] == pytest.approx(reference.pvalue)


def test_paired_difference_edge_cases():
    one = paired_difference([0.5], [0.6])
    assert one["mean"] == pytest.approx(0.1) and math.isnan(one["ci_low"]) and math.isnan(one["p_value"])
    constant = paired_difference([0.5, 0.6, 0.7], [0.6, 0.7, 0.8])
    assert constant["ci_low"] == pytest.approx(0.1) and constant["ci_high"] == pytest.approx(0.1)
    assert paired_difference([], [])["n"] == 0
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([0.1, 0.2], [0.1, 0.3], confidence=95)


def _runs_with_one_failure() -> list[ArmRun]:
    runs = []
    for seed, (base, cdb) in enumerate(zip(BASELINE, CDB)):
        runs.append(ArmRun(seed, "baseline", f"seed{seed}/baseline", metrics={"eval_accuracy": base,
                                                                              "eval_loss": 1.0 - base}))
        runs.append(ArmRun(seed, "cdb", f"seed{seed}/cdb", metrics={"eval_accuracy": cdb, "eval_loss": 1.0 - cdb}))
    runs.append(ArmRun(4, "baseline", "seed4/baseline", metrics={"eval_accuracy": 0.99, "eval_loss": 0.01}))
    runs.append(ArmRun(4, "cdb", "seed4/cdb", status="failed", error="RuntimeError: out of memory"))
    return runs


def test_summary_uses_complete_pairs_only_and_lists_failures():
    summary = summarize(_runs_with_one_failure())
    assert summary["complete_seeds"] == [0, 1, 2, 3]
    assert summary["incomplete_seeds"] == [4]
    assert summary["failed_runs"] == [{"seed": 4, "arm": "cdb", "error": "RuntimeError: out of memory"}]
    accuracy = summary["metrics"]["eval_accuracy"]
    # seed 4's lone baseline (0.99) must not leak into the baseline mean
    assert accuracy["baseline"]["mean"] == pytest.approx(sum(BASELINE) / 4)
    assert accuracy["baseline"]["std"] == pytest.approx(stats.tstd(BASELINE))
    assert accuracy["difference"]["ci_low"] == pytest.approx(paired_difference(BASELINE, CDB)["ci_low"])
    assert summary["metrics"]["train_runtime"]["difference"]["n"] == 0  # no run reported it


def test_written_results_report_the_failed_run(tmp_path):
    runs = _runs_with_one_failure()
    runs[0].curve = [{"step": 1.0, "eval_accuracy": 0.5}, {"step": 2.0, "eval_accuracy": 0.8}]
    report = write_results(tmp_path, runs, summarize(runs))
    assert "1 run(s) FAILED" in report and "RuntimeError: out of memory" in report
    assert "| 4 |" in report and "FAILED" in report.split("| 4 |")[1].splitlines()[0]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["incomplete_seeds"] == [4]
    assert saved["summary"]["metrics"]["train_runtime"]["difference"]["mean"] is None  # NaN -> null
    assert [r["status"] for r in saved["runs"]].count("failed") == 1
    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 10 and rows[-1]["status"] == "failed" and "out of memory" in rows[-1]["error"]
    assert (tmp_path / "ab_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "report.md").read_text().strip() == report


def test_load_eval_curve_reads_both_training_paths(tmp_path):
    history = [{"loss": 2.0, "step": 1}, {"eval_accuracy": 0.5, "eval_loss": 1.5, "step": 2},
               {"eval/accuracy": 0.7, "eval/loss": 1.0, "step": 4}, {"eval_accuracy": 0.7, "step": 4}]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert load_eval_curve(tmp_path) == [{"step": 2.0, "eval_accuracy": 0.5, "eval_loss": 1.5},
                                         {"step": 4.0, "eval_accuracy": 0.7}]
    assert load_eval_curve(tmp_path / "missing") == []


# ------------------------------------------------------------------------------------------- running


def _args(tmp_path, *flags):
    return plan_run(*cli.parse_args(["--model_name_or_path", "unused", "--dataset_name", "unused",
                                     "--output_dir", str(tmp_path / "ab"), "--seed", "7", *flags]))


def test_arm_plans_pair_the_seeds(tmp_path):
    plan = _args(tmp_path, "--cdb", "false", "--ab_seeds", "3")
    base, cdb = arm_plan(plan, "baseline", 8), arm_plan(plan, "cdb", 8)
    assert base.training.seed == cdb.training.seed == 8
    assert (base.cdb.cdb, cdb.cdb.cdb, cdb.cdb.cdb_seed) == (False, True, 8)
    assert base.cdb_config is None and cdb.cdb_config.seed == 8
    assert base.training.output_dir == str(tmp_path / "ab" / "seed8" / "baseline")
    assert cdb.training.output_dir == str(tmp_path / "ab" / "seed8" / "cdb")
    assert base.run.ab_seeds == cdb.run.ab_seeds == 0 and plan.run.ab_seeds == 3
    assert plan.training.seed == 7 and plan.cdb.cdb is False  # the caller's plan is untouched
    with pytest.raises(ValueError, match="arm="):
        arm_plan(plan, "treatment", 8)


def test_run_ab_keeps_going_after_a_failure_and_reports_it(tmp_path, capsys):
    calls = []

    def fake_train(plan):
        calls.append((plan.training.seed, plan.cdb.cdb))
        if plan.training.seed == 8 and plan.cdb.cdb:
            raise RuntimeError("simulated crash")
        return {"eval_accuracy": 0.5 + 0.01 * plan.training.seed + (0.02 if plan.cdb.cdb else 0.0),
                "eval_loss": 1.0, "train_runtime": 3.0}

    result = run_ab(_args(tmp_path, "--ab_seeds", "3"), train_fn=fake_train)
    assert calls == [(7, False), (7, True), (8, False), (8, True), (9, False), (9, True)]
    assert result["complete_seeds"] == [7, 9] and result["incomplete_seeds"] == [8]
    assert result["failed_runs"][0]["error"] == "RuntimeError: simulated crash"
    assert result["metrics"]["eval_accuracy"]["difference"]["mean"] == pytest.approx(0.02)
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "simulated crash" in printed
    assert (tmp_path / "ab" / "results.json").is_file()


def test_run_ab_writes_and_prints_only_on_the_main_process(tmp_path, monkeypatch, capsys):
    waited = []

    class NotMainProcess:
        is_main_process = False

        def wait_for_everyone(self):
            waited.append(True)

    monkeypatch.setattr(cdb_hf.ab, "PartialState", NotMainProcess)
    monkeypatch.setattr(cdb_hf.run, "PartialState", NotMainProcess)
    result = run_ab(_args(tmp_path, "--ab_seeds", "2"),
                    train_fn=lambda plan: {"eval_accuracy": 0.5 + (0.1 if plan.cdb.cdb else 0.0)})
    assert waited == [True, True]  # the output folder opened by the main process, the report
    assert result["metrics"]["eval_accuracy"]["difference"]["mean"] == pytest.approx(0.1)
    assert "Verdict" in result["report"]
    root = tmp_path / "ab"
    for name in ("results.json", "results.csv", "report.md", "ab_plot.png"):
        assert not (root / name).exists(), name
    assert capsys.readouterr().out == ""


def test_run_ab_refuses_an_invalid_cdb_arm_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="channel_rate"):
        _args(tmp_path, "--ab_seeds", "2", "--cdb", "false", "--cdb_channel_rate", "1.5")
    assert not (tmp_path / "ab").exists()


def test_bad_input_found_in_the_first_arm_stops_the_comparison_and_restores_the_previous_one(tmp_path):
    from cdb_hf.run_dir import write_run_marker

    root = tmp_path / "ab"
    root.mkdir()
    write_run_marker(root, status="complete", kind="ab")
    (root / "report.md").write_text("the previous comparison")

    def bad_data(plan):
        raise UsageError("the training images are unreadable")

    with pytest.raises(UsageError, match="unreadable.*previous run .* was restored"):
        run_ab(_args(tmp_path, "--ab_seeds", "2", "--overwrite_output_dir", "true"), train_fn=bad_data)
    assert (root / "report.md").read_text() == "the previous comparison"


def _tiny_flags(tiny_vit_dir, image_folder, output_dir):
    return ["--model_name_or_path", str(tiny_vit_dir), "--train_dir", str(image_folder / "train"),
            "--validation_dir", str(image_folder / "validation"), "--output_dir", str(output_dir),
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
            "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "no", "--report_to", "none",
            "--disable_tqdm", "true", "--log_level", "error", "--do_train", "--do_eval", "--learning_rate", "0.05"]


def test_cli_ab_end_to_end_on_a_tiny_model(tiny_vit_dir, image_folder, tmp_path, capsys):
    output_dir = tmp_path / "ab"
    argv = _tiny_flags(tiny_vit_dir, image_folder, output_dir) + [
        "--ab_seeds", "2", "--cdb_layer_selection", "bernoulli", "--cdb_layer_rate", "1.0", "--cdb_channel_rate",
        "0.5"]
    assert cli.main(argv) == 0
    assert "A/B: baseline vs ChannelDropBack" in capsys.readouterr().out
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["summary"]["complete_seeds"] == [42, 43] and saved["summary"]["failed_runs"] == []
    assert saved["summary"]["metrics"]["eval_accuracy"]["difference"]["n"] == 2
    for seed in (42, 43):
        for arm in ARMS:
            assert (output_dir / f"seed{seed}" / arm / "model.safetensors").is_file()
    runs = {(r["seed"], r["arm"]): r for r in saved["runs"]}
    assert [p["step"] for p in runs[(42, "cdb")]["curve"]] == [1.0, 2.0]
    # CDB did something: the two arms of a pair end with different weights
    base = load_file(output_dir / "seed42" / "baseline" / "model.safetensors")
    cdb = load_file(output_dir / "seed42" / "cdb" / "model.safetensors")
    assert any(not base[key].equal(cdb[key]) for key in base)
    assert (output_dir / "ab_plot.png").is_file() and (output_dir / "results.csv").is_file()


def test_paired_arms_differ_only_by_cdb(tiny_vit_dir, image_folder, tmp_path):
    """With CDB applied on no step, the CDB arm must reproduce the baseline bitwise: same split, head
    initialisation, data order and augmentation - so any real difference is CDB's."""
    output_dir = tmp_path / "ab"
    argv = _tiny_flags(tiny_vit_dir, image_folder, output_dir) + ["--ab_seeds", "1", "--cdb_step_rate", "0.0",
                                                                 "--eval_strategy", "no"]
    assert cli.main(argv) == 0
    base = load_file(output_dir / "seed42" / "baseline" / "model.safetensors")
    cdb = load_file(output_dir / "seed42" / "cdb" / "model.safetensors")
    assert base.keys() == cdb.keys() and all(base[key].equal(cdb[key]) for key in base)
    pristine = load_file(tiny_vit_dir / "model.safetensors")
    assert any(not base[key].equal(pristine[key]) for key in base if key in pristine)  # it did train


def test_cli_exit_code_is_1_when_an_ab_run_failed(tmp_path, monkeypatch, capsys):
    import cdb_hf.ab

    def run_ab_with_a_failure(plan):
        return run_ab(plan, train_fn=lambda arm: (_ for _ in ()).throw(RuntimeError("boom"))
                      if arm.cdb.cdb else {"eval_accuracy": 0.5, "eval_loss": 1.0})

    monkeypatch.setattr(cdb_hf.ab, "run_ab", run_ab_with_a_failure)
    (tmp_path / "images").mkdir()
    argv = ["--model_name_or_path", "any", "--train_dir", str(tmp_path / "images"), "--output_dir",
            str(tmp_path / "ab"), "--ab_seeds", "2"]
    assert cli.main(argv) == 1
    assert "2 A/B run(s) failed" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ extra arm


def test_extra_arm_is_parsed_typed_and_trained_on_the_same_seeds(tmp_path):
    plan = _args(tmp_path, "--ab_seeds", "2", "--ab_extra_arm", "weight_decay=0.05, label_smoothing_factor=0.1")
    assert plan.extra_arm == {"weight_decay": 0.05, "label_smoothing_factor": 0.1}
    extra = arm_plan(plan, "extra", 8)
    assert (extra.training.seed, extra.cdb.cdb, extra.cdb_config) == (8, False, None)
    assert (extra.training.weight_decay, extra.training.label_smoothing_factor) == (0.05, 0.1)
    assert extra.training.output_dir == str(tmp_path / "ab" / "seed8" / "extra")
    assert plan.training.weight_decay == 0.0 and arm_plan(plan, "baseline", 8).training.weight_decay == 0.0

    seen = []

    def fake_train(arm_run_plan):
        seen.append((arm_run_plan.training.seed, arm_run_plan.cdb.cdb, arm_run_plan.training.weight_decay))
        bonus = 0.02 if arm_run_plan.cdb.cdb else 0.01 if arm_run_plan.training.weight_decay else 0.0
        return {"eval_accuracy": 0.5 + 0.01 * arm_run_plan.training.seed + bonus, "eval_loss": 1.0}

    result = run_ab(plan, train_fn=fake_train, print_report=False)
    assert seen == [(7, False, 0.0), (7, True, 0.0), (7, False, 0.05),
                    (8, False, 0.0), (8, True, 0.0), (8, False, 0.05)]
    accuracy = result["metrics"]["eval_accuracy"]
    assert accuracy["difference"]["mean"] == pytest.approx(0.02)
    assert accuracy["extra_difference"]["mean"] == pytest.approx(0.01)
    assert "weight_decay=0.05" in result["report"] and result["report"].count("Verdict") == 1
    assert "vs weight_decay=0.05" in result["report"].splitlines()[0] + result["report"]
    rows = list(csv.DictReader((tmp_path / "ab" / "results.csv").open()))
    assert sorted({row["arm"] for row in rows}) == ["baseline", "cdb", "extra"]


@pytest.mark.parametrize("spec, message", [
    ("weight_decay", "name=value"),
    ("no_such_field=1", "not a TrainingArguments value"),
    ("seed=3", "not a TrainingArguments value"),
    ("cdb_channel_rate=0.1", "not a TrainingArguments value"),
    ("weight_decay=abc", "takes a float"),
    ("learning_rate=-1", "--ab_extra_arm 'learning_rate=-1': .*learning_rate"),
    ("weight_decay=nan", "--ab_extra_arm 'weight_decay=nan': .*weight_decay"),
])
def test_extra_arm_refuses_bad_specs_before_any_work(tmp_path, spec, message):
    with pytest.raises(UsageError, match=message):
        _args(tmp_path, "--ab_seeds", "2", "--ab_extra_arm", spec)
    assert not (tmp_path / "ab").exists()


def test_extra_arm_needs_an_ab_comparison(tmp_path):
    with pytest.raises(UsageError, match="needs --ab_seeds"):
        _args(tmp_path, "--ab_extra_arm", "weight_decay=0.05")
