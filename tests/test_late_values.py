"""Every value is checked before any work, naming the flag: the refusals that used to come late (after an A/B
arm trained, as a MemoryError, as a TypeError traceback) and the settings that used to do nothing silently."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from test_cli import finetune_argv, run_quietly
from test_safety import make_previous_run, one_error_line, tree_hashes

from cdb_hf import cli
from cdb_hf.run_dir import read_run_marker

RECIPES = {
    # case: (recipe text, fragment of the one line)
    "output_dir: 123": ("output_dir: 123\n", "output_dir: 123 is not valid; it must be a string"),
    "seed: 1.5": ("seed: 1.5\n", "seed: 1.5 is not valid; it must be an integer"),
    "train_dir: [a, b]": ("train_dir: [a, b]\n", "train_dir: ['a', 'b'] is not valid; it must be a string"),
    "max_steps: true": ("max_steps: true\n", "max_steps: True is not valid; it must be an integer"),
    "a duplicate key": ("learning_rate: 0.1\nseed: 1\nlearning_rate: 0.01\n", "'learning_rate' is given twice"),
    "train_dir: ''": ("train_dir: ''\n", "--train_dir '' is empty"),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_a_recipe_value_of_the_wrong_type_is_one_line_naming_the_key(case, tmp_path, capsys, tiny_vit_dir,
                                                                     image_folder):
    text, expected = RECIPES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    argv = finetune_argv(tiny_vit_dir, image_folder, tmp_path / "out")
    for key in ("output_dir", "train_dir", "max_steps", "seed"):  # the recipe's value is the one under test
        if f"{key}:" in text:
            position = argv.index(f"--{key}")
            del argv[position:position + 2]

    code = cli.main([str(recipe), *argv])

    assert code == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_yaml_alias_bomb_is_refused_fast_with_a_short_message(tmp_path, capsys, tiny_vit_dir, image_folder):
    recipe = tmp_path / "bomb.yaml"
    # 9**7 list items from a few hundred bytes (anchors nested inside the one value: other keys are refused)
    recipe.write_text("lr_schedule: multistep\nlr_milestones: [" + ", ".join(
        ["&g [&f [&e [&d [&c [&b [&a [x, x, x, x, x, x, x, x, x]" + ", *a" * 8 + "]" + ", *b" * 8 + "]"
         + ", *c" * 8 + "]" + ", *d" * 8 + "]" + ", *e" * 8 + "]" + ", *f" * 8 + "]"] + ["*g"] * 8) + "]\n")
    started = time.time()

    code = cli.main([str(recipe), *finetune_argv(tiny_vit_dir, image_folder, tmp_path / "out")])

    assert code == 2
    line = one_error_line(capsys)
    assert "lr_milestones" in line and len(line) < 400, line
    assert time.time() - started < 20


FLAGS = {
    # case: (extra flags, fragment of the one line)
    "A/B seeds past 2**32 - 1": (["--ab_seeds", "2", "--seed", "4294967295"],
                                 "--ab_seeds 2 with --seed 4294967295 would use seeds up to 4294967296"),
    "a billion A/B seeds": (["--ab_seeds", "1000000000"], "--ab_seeds 1000000000 is not valid; it must be at most"),
    "a seed past 2**32 - 1": (["--seed", "4294967296"], "--seed 4294967296 is not valid"),
    "a 100000 px image size": (["--image_size", "100000"], "--image_size 100000 is not valid: one batch of 4"),
    "an empty --train_dir": (["--train_dir", ""], "--train_dir '' is empty"),
    "an empty --output_dir": (["--output_dir", " "], "--output_dir ' ' is empty"),
    "--max_steps -5": (["--max_steps", "-5"], "--max_steps -5 is not valid; it must be a positive integer"),
    "--max_steps 0": (["--max_steps", "0"], "--max_steps 0 is not valid"),
    "--num_train_epochs 1e300": (["--max_steps", "-1", "--num_train_epochs", "1e300"],
                                 "--num_train_epochs 1e+300 is not valid; it must be at most 100000"),
}


@pytest.mark.parametrize("case", list(FLAGS))
def test_values_that_failed_late_are_refused_first_and_the_previous_run_stays(case, tmp_path, capsys, tiny_vit_dir,
                                                                             image_folder):
    previous = make_previous_run(tmp_path / "out")
    before = tree_hashes(previous)
    extra, expected = FLAGS[case]

    code = cli.main(finetune_argv(tiny_vit_dir, image_folder, previous, "--overwrite_output_dir", "true", *extra))

    assert code == 2
    assert expected in one_error_line(capsys)
    assert tree_hashes(previous) == before and not list(tmp_path.glob(".out.*"))


def test_the_validation_folder_may_not_be_the_training_folder(tmp_path, capsys, tiny_vit_dir, image_folder):
    code = cli.main(finetune_argv(tiny_vit_dir, image_folder, tmp_path / "out", "--validation_dir",
                                  str(image_folder / "train" / ".." / "train")))
    assert code == 2
    assert "--validation_dir" in one_error_line(capsys) and not (tmp_path / "out").exists()


def test_a_symlinked_output_folder_over_an_old_run_is_replaced_through_the_link(tmp_path, tiny_vit_dir,
                                                                                 image_folder):
    target = make_previous_run(tmp_path / "runs" / "real")
    link = tmp_path / "out"
    os.symlink(target, link)

    code, printed = run_quietly(finetune_argv(tiny_vit_dir, image_folder, link, "--overwrite_output_dir", "true"))

    assert code == 0, printed
    assert link.is_symlink() and Path(os.readlink(link)) == target
    assert read_run_marker(target)["status"] == "complete" and (target / "model.safetensors").stat().st_size > 100
    assert not list((tmp_path / "runs").glob(".real.*")), "the replaced run goes once the new one completed"


# ------------------------------------------------------------------------------------------ resume guards
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_vit_dir, image_folder):
    """A complete 4-step CDB run (Trainer path) with checkpoints at steps 2 and 4."""
    output_dir = tmp_path_factory.mktemp("finished") / "out"
    code, printed = run_quietly(finetune_argv(tiny_vit_dir, image_folder, output_dir))
    assert code == 0, printed
    return output_dir


def test_resuming_from_a_run_folder_checks_its_newest_checkpoint(tmp_path, capsys, finished_run, tiny_vit_dir,
                                                                  image_folder):
    code = cli.main(finetune_argv(tiny_vit_dir, image_folder, tmp_path / "resumed", "--resume_from_checkpoint",
                                  str(finished_run), "--cdb_seed", "1"))
    assert code == 2
    line = one_error_line(capsys)
    assert f"{finished_run / 'checkpoint-4'}" in line and "seed: 0 in the checkpoint, 1 now" in line, line


def test_a_run_folder_without_checkpoints_is_not_taken_for_one(tmp_path, capsys, tiny_vit_dir, image_folder):
    run = make_previous_run(tmp_path / "old")
    import shutil

    shutil.rmtree(run / "checkpoint-2")
    code = cli.main(finetune_argv(tiny_vit_dir, image_folder, tmp_path / "resumed", "--resume_from_checkpoint",
                                  str(run)))
    assert code == 2
    assert "is a run folder with no complete checkpoint-N" in one_error_line(capsys)


def test_resume_notes_are_printed_and_recorded_and_the_given_save_steps_kept(tmp_path, caplog, finished_run,
                                                                             tiny_vit_dir, image_folder):
    import shutil

    checkpoint = Path(shutil.copytree(finished_run / "checkpoint-2", tmp_path / "plain" / "checkpoint-2"))
    for name in ("cdb_hf_checkpoint.json", "optimizer.pt"):  # a plain transformers checkpoint, its optimizer lost
        (checkpoint / name).unlink()

    code, printed = run_quietly(finetune_argv(tiny_vit_dir, image_folder, tmp_path / "resumed", "--save_steps", "1",
                                              "--resume_from_checkpoint", str(checkpoint)))

    assert code == 0, printed
    expected = f"{checkpoint} has no optimizer.pt: the resumed run starts the optimizer (its momentum) afresh"
    assert caplog.text.count(expected) == 1, caplog.text
    assert any(note.startswith(expected) for note in read_run_marker(tmp_path / "resumed")["notes"])
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


def test_an_unfinished_run_without_checkpoints_is_not_advised_to_resume(tmp_path, capsys, tiny_vit_dir,
                                                                         image_folder):
    from cdb_hf.run_dir import write_run_marker

    (tmp_path / "out").mkdir()
    write_run_marker(tmp_path / "out", status="running")  # what a SIGKILL before the first save leaves
    code = cli.main(finetune_argv(tiny_vit_dir, image_folder, tmp_path / "out"))
    assert code == 2
    line = one_error_line(capsys)
    assert "holds a 'running' run with no checkpoint" in line or "holds a running run with no checkpoint" in line
    assert "--resume_from_checkpoint" not in line


def test_an_interrupted_run_is_not_evaluated_as_if_finished(tmp_path, capsys, finished_run, image_folder):
    import shutil

    from cdb_hf.run_dir import write_run_marker

    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    write_run_marker(run, status="interrupted")
    code = cli.main(["--do_train", "false", "--model_name_or_path", str(run), "--validation_dir",
                     str(image_folder / "validation"), "--output_dir", str(tmp_path / "eval"), "--use_cpu", "true",
                     "--report_to", "none"])
    assert code == 2
    assert "did not complete (status 'interrupted')" in one_error_line(capsys)


# ------------------------------------------------------------------------------------------ silent no-ops
@pytest.mark.parametrize("extra,expected", [
    (["--cdb_layer_rate", "0"], "--cdb_layer_rate 0 (schedule 'constant') never selects a layer"),
    (["--cdb_channel_rate", "0.001", "--cdb_channel_sampling", "exact"], "drops round(rate x channels) = 0 channels"),
    (["--cdb_channel_rate", "1e-12"], "--cdb_channel_rate 1e-12 drops"),
])
def test_cdb_settings_that_do_nothing_are_warned_about_once(extra, expected, tmp_path, caplog, tiny_vit_dir,
                                                            image_folder):
    code, printed = run_quietly(finetune_argv(tiny_vit_dir, image_folder, tmp_path / "out", *extra, "--max_steps",
                                              "2"))
    assert code == 0, printed
    assert caplog.text.count(expected) == 1, caplog.text
    assert caplog.text.count("so ChannelDropBack does (almost) nothing") == 1


# ------------------------------------------------------------------------------------------ the user's files
@pytest.mark.parametrize("recorded", [True, False], ids=["files recorded at completion", "an older marker"])
def test_overwrite_refuses_to_delete_files_the_user_put_inside_an_old_run(recorded, tmp_path, capsys, finished_run,
                                                                          tiny_vit_dir, image_folder):
    import shutil

    run = Path(shutil.copytree(finished_run, tmp_path / "out"))
    if not recorded:
        marker = read_run_marker(run)
        marker.pop("files")
        (run / "cdb_hf_run.json").write_text(__import__("json").dumps(marker))
    (run / "NOTES.txt").write_text("why this run matters")
    (run / "analysis").mkdir()
    (run / "analysis" / "plot.py").write_text("print(1)")
    before = tree_hashes(run)

    code = cli.main(finetune_argv(tiny_vit_dir, image_folder, run, "--overwrite_output_dir", "true"))

    assert code == 2
    assert "would delete what cdb_hf did not write in" in (line := one_error_line(capsys))
    assert "NOTES.txt, analysis/;" in line, line
    assert tree_hashes(run) == before
