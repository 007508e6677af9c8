"""The run folder's lifecycle and the checkpoint records, as functions (no training): fast enough to run
against every mutant of cdb_hf/run_dir.py and of the resume checks (``make mutants``).

The end-to-end promises (a real run replaced, diverged, killed while saving) are in test_safety.py.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from cdb_hf.errors import UsageError
from cdb_hf.resume import check_resume_matches, loop_state_error
from cdb_hf.run_dir import (
    CHECKPOINT_RECORD,
    RUN_MARKER,
    RunDirectory,
    checkpoint_step,
    find_checkpoints,
    foreign_entries,
    is_finite_number,
    read_checkpoint_record,
    read_run_marker,
    set_aside_runs,
    write_checkpoint_record,
    write_json_atomic,
    write_results_json,
    write_run_marker,
)
from cdb_hf.version import __version__


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def previous_run(folder: Path) -> Path:
    (folder / "checkpoint-2").mkdir(parents=True)
    write_run_marker(folder, status="complete")
    (folder / "model.safetensors").write_bytes(b"earlier weights")
    return folder


# ------------------------------------------------------------------------------------------ strict JSON
def test_json_is_written_whole_and_strict(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"b": 1, "a": [1.5, "x"]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1.5, "x"], "b": 1}
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "a.json", {"loss": math.nan})
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1.5, "x"], "b": 1}, "a refused write keeps the file"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"], "no temporary file is left behind"
    write_results_json(tmp_path / "r.json", {"loss": math.inf, "nested": [math.nan, 2.0], "pair": (1, -math.inf)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"loss": None, "nested": [None, 2.0], "pair": [1, None]}


def test_is_finite_number():
    assert [is_finite_number(v) for v in (0, 1.5, -3, math.nan, math.inf, True, "1", None)] == \
        [True, True, True, False, False, False, False, False]


# ------------------------------------------------------------------------------------------ run marker
def test_the_marker_keeps_its_start_and_what_it_replaces(tmp_path):
    assert read_run_marker(tmp_path) is None
    write_run_marker(tmp_path, status="running", kind="eval", replaces=".x.previous-1")
    first = read_run_marker(tmp_path)
    assert (first["tool"], first["kind"], first["status"], first["replaces"]) == ("cdb_hf", "eval", "running",
                                                                                 ".x.previous-1")
    write_run_marker(tmp_path, status="complete", kind="eval")
    second = read_run_marker(tmp_path)
    assert second["status"] == "complete" and second["replaces"] == ".x.previous-1"
    assert second["started"] == first["started"]
    (tmp_path / RUN_MARKER).write_text("[1, 2]")
    assert read_run_marker(tmp_path) is None, "not an object: not a marker"
    (tmp_path / RUN_MARKER).write_text('{"tool": "cdb_hf", "status": NaN}')
    assert read_run_marker(tmp_path) is None, "not strict JSON: not a marker"
    (tmp_path / RUN_MARKER).write_text('{"tool": "other", "status": "complete"}')
    assert read_run_marker(tmp_path) is None, "another tool's marker"


def test_the_marker_records_tool_version_kind_start_and_notes(tmp_path):
    write_run_marker(tmp_path, status="running")
    marker = read_run_marker(tmp_path)
    started = marker.pop("started")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", started), started
    assert marker == {"tool": "cdb_hf", "version": __version__, "kind": "run", "status": "running",
                      "replaces": None, "notes": []}
    write_json_atomic(tmp_path / RUN_MARKER, {**read_run_marker(tmp_path), "started": "2020-01-01T00:00:00"})
    write_run_marker(tmp_path, status="running", notes=["--output_dir was empty"])
    write_run_marker(tmp_path, status="complete")
    marker = read_run_marker(tmp_path)
    assert marker["started"] == "2020-01-01T00:00:00", "the start of the run, kept by every later write"
    assert marker["notes"] == ["--output_dir was empty"], "notes are kept until replaced"
    write_run_marker(tmp_path, status="complete", notes=[])
    assert read_run_marker(tmp_path)["notes"] == []


def test_json_files_are_indented_with_sorted_keys(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"b": 1, "a": [1.5]})
    assert (tmp_path / "a.json").read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'


# ------------------------------------------------------------------------------------------ RunDirectory
def test_a_bad_mode_is_refused():
    with pytest.raises(ValueError, match="mode='again' is not valid; choose 'fresh', 'resume' or 'replace'"):
        RunDirectory("x", "again")


def test_a_fresh_run_is_marked_running_then_complete(tmp_path):
    out = tmp_path / "new" / "parents" / "out"
    run = RunDirectory(out, "fresh")
    run.open(notes=["a note"])
    marker = read_run_marker(out)
    assert (marker["status"], marker["kind"], marker["replaces"], marker["notes"]) == ("running", "run", None,
                                                                                     ["a note"])
    (out / "model.safetensors").write_bytes(b"w")
    run.complete()
    marker = read_run_marker(out)
    assert (marker["status"], marker["kind"], marker["files"]) == ("complete", "run", ["model.safetensors"])
    assert run.backup is None and [p.name for p in out.parent.iterdir()] == ["out"]

    evaluation = RunDirectory(tmp_path / "eval", "fresh", kind="eval")
    evaluation.open()
    assert read_run_marker(tmp_path / "eval")["kind"] == "eval"
    evaluation.complete()
    assert read_run_marker(tmp_path / "eval")["kind"] == "eval"


def test_a_resumed_run_opens_in_place(tmp_path):
    before = tree(previous_run(tmp_path / "out"))
    RunDirectory(tmp_path / "out", "resume").open(notes=["resumed"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "nothing set aside"
    after = tree(tmp_path / "out")
    assert {name: data for name, data in after.items() if name != RUN_MARKER} == \
        {name: data for name, data in before.items() if name != RUN_MARKER}
    assert read_run_marker(tmp_path / "out")["notes"] == ["resumed"]


def test_a_replacement_sets_the_previous_run_aside_and_deletes_it_only_when_complete(tmp_path):
    before = tree(previous_run(tmp_path / "out"))
    run = RunDirectory(tmp_path / "out", "replace")
    run.open()
    (aside,) = set_aside_runs(tmp_path / "out")
    assert re.fullmatch(r"\.out\.previous-\d{8}-\d{6}-[0-9a-f]{6}", aside.name), "sorts by time: newest first"
    assert tree(aside) == before
    assert read_run_marker(tmp_path / "out")["replaces"] == aside.name
    assert [p.name for p in (tmp_path / "out").iterdir()] == [RUN_MARKER], "the new run starts empty"
    run.complete()
    assert not aside.exists() and set_aside_runs(tmp_path / "out") == []
    marker = read_run_marker(tmp_path / "out")
    assert marker["status"] == "complete" and marker["replaces"] is None


def test_a_failed_replacement_restores_the_previous_run_and_keeps_only_checkpoints(tmp_path):
    before = tree(previous_run(tmp_path / "out"))
    run = RunDirectory(tmp_path / "out", "replace")
    run.open()
    (tmp_path / "out" / "stray.txt").write_text("no checkpoint")
    assert run.fail() is None, "an attempt without checkpoints is not kept"
    assert tree(tmp_path / "out") == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    run = RunDirectory(tmp_path / "out", "replace")
    run.open()
    (tmp_path / "out" / "checkpoint-4").mkdir()
    (tmp_path / "out" / "checkpoint-4" / "model.safetensors").write_bytes(b"new")
    kept = run.fail()
    assert run.backup is None, "the previous run is back: nothing is set aside any more"
    assert tree(tmp_path / "out") == before
    assert kept is not None and kept.parent == tmp_path and kept.name.startswith(".out.failed-")
    assert (kept / "checkpoint-4" / "model.safetensors").read_bytes() == b"new"
    assert read_run_marker(kept)["status"] == "failed"
    assert set_aside_runs(tmp_path / "out") == [], "a failed attempt is not a run to restore"


def test_failing_twice_leaves_the_restored_previous_run_as_it_was(tmp_path):
    """A second fail() (an error handler that runs twice) must not mark the restored previous run as failed."""
    before = tree(previous_run(tmp_path / "out"))
    run = RunDirectory(tmp_path / "out", "replace")
    run.open()
    (tmp_path / "out" / "checkpoint-4").mkdir()
    kept = run.fail()
    assert run.fail() is None
    assert tree(tmp_path / "out") == before and read_run_marker(kept)["status"] == "failed"


def test_a_failed_fresh_run_is_marked_failed_and_kept(tmp_path):
    run = RunDirectory(tmp_path / "out", "fresh", kind="eval")
    run.open()
    (tmp_path / "out" / "checkpoint-2").mkdir()
    assert run.fail() is None
    marker = read_run_marker(tmp_path / "out")
    assert (marker["status"], marker["kind"]) == ("failed", "eval") and (tmp_path / "out" / "checkpoint-2").is_dir()



def test_completing_a_resumed_replacement_deletes_the_whole_chain_and_nothing_else(tmp_path):
    """A replacement killed, resumed and killed again leaves a chain of set-aside runs: all go on success,
    but a sibling that is not a run of ours (no marker) stops the walk and stays."""
    out = tmp_path / "out"
    older = previous_run(tmp_path / ".out.previous-20260101-000000-aaaaaa")
    old = previous_run(tmp_path / ".out.previous-20260102-000000-bbbbbb")
    write_run_marker(old, status="running", replaces=older.name)
    out.mkdir()
    write_run_marker(out, status="running", replaces=old.name)
    assert set_aside_runs(out) == [old, older], "newest first"
    unrelated = tmp_path / ".out.previous-20260103-000000-cccccc"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    RunDirectory(out, "resume").complete()
    assert not old.exists() and not older.exists()
    assert (unrelated / "notes.txt").read_text() == "mine"
    assert read_run_marker(out)["replaces"] is None

    write_run_marker(out, status="running", replaces=unrelated.name)  # names a folder that is not a run of ours
    RunDirectory(out, "resume").complete()
    marker = read_run_marker(out)
    assert (unrelated / "notes.txt").read_text() == "mine"
    assert marker["replaces"] is None and marker["files"] == [], "the run is completed all the same"


def test_completing_never_follows_a_recorded_name_out_of_the_parent_folder(tmp_path):
    victim = previous_run(tmp_path / "victim")
    (tmp_path / ".out.previous-1").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    write_run_marker(out, status="running", replaces=".out.previous-1/../victim")
    RunDirectory(out, "resume").complete()
    assert read_run_marker(victim)["status"] == "complete" and (victim / "model.safetensors").is_file()


def test_an_interrupted_replacement_stays_in_place_and_names_the_run_it_replaces(tmp_path):
    """A preemption stop keeps the new run where it is (to be resumed) and the earlier run set aside."""
    out = tmp_path / "out"
    before = tree(previous_run(out))
    run = RunDirectory(out, "replace", kind="eval")
    run.open()
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "model.safetensors").write_bytes(b"new")
    aside = run.interrupt()
    assert aside is not None and set_aside_runs(out) == [aside] and tree(aside) == before
    assert run.backup is None, "the earlier run is no longer this process's to restore"
    marker = read_run_marker(out)
    assert (marker["status"], marker["kind"], marker["replaces"]) == ("interrupted", "eval", aside.name)
    assert (out / "checkpoint-3" / "model.safetensors").read_bytes() == b"new"

    fresh = RunDirectory(tmp_path / "new", "fresh")
    fresh.open()
    assert fresh.interrupt() is None and read_run_marker(tmp_path / "new")["status"] == "interrupted"
    aside.rename(tmp_path / "elsewhere")
    assert RunDirectory(out, "resume").interrupt() is None, "the set-aside run is gone: nothing to name"
    write_run_marker(out, status="running", replaces="elsewhere")
    assert RunDirectory(out, "resume").interrupt() is None, "only a set-aside sibling of this run is named"


def test_foreign_entries_are_judged_by_the_recorded_list_or_else_by_the_tool_outputs(tmp_path):
    out = tmp_path / "out"
    run = RunDirectory(out, "fresh")
    run.open()
    (out / "model.safetensors").write_bytes(b"w")
    (out / "runs").mkdir()
    run.complete()
    assert read_run_marker(out)["files"] == ["model.safetensors", "runs"]
    assert foreign_entries(out) == []
    (out / "notes.txt").write_text("mine")
    (out / "analysis").mkdir()
    (out / "predictions.csv").write_text("not written by that run")
    assert foreign_entries(out) == ["analysis/", "notes.txt", "predictions.csv"], "the recorded list decides"

    for files in (None, "model.safetensors", [1]):  # no list (an older or unfinished run), or a malformed one
        marker = read_run_marker(out)
        write_json_atomic(out / RUN_MARKER, {**marker, "files": files})
        for name in ("model-00001-of-00002.safetensors", "seed1000", "checkpoint-12", ".x.json.tmp-1a2b"):
            (out / name).mkdir(exist_ok=True)
        assert foreign_entries(out) == ["analysis/", "notes.txt"], files


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_names_and_order(tmp_path):
    assert [checkpoint_step(n) for n in ("checkpoint-12", "checkpoint-0", "checkpoint-x", "ckpt-3",
                                         "checkpoint-12.tmp")] == [12, 0, None, None, None]
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-9", "checkpoint-x", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-11").write_text("a file, not a checkpoint")
    assert [p.name for p in find_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-9", "checkpoint-2"]
    assert find_checkpoints(tmp_path / "missing") == []


def _checkpoint(tmp_path: Path, step: int = 4) -> Path:
    folder = tmp_path / f"checkpoint-{step}"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"12345")
    (folder / "sub" / "optimizer.pt").write_bytes(b"123")
    (folder / ".hidden").write_bytes(b"not listed")
    (folder / "empty.txt").write_bytes(b"")  # a file of 0 bytes is complete too
    write_checkpoint_record(folder, trainer="hf", step=step, cdb={"seed": 0, "total": 8},
                            extra={"loop": {"completed_steps": step}})
    return folder


def test_a_complete_checkpoint_reads_back_its_record(tmp_path):
    folder = _checkpoint(tmp_path)
    record, why = read_checkpoint_record(folder)
    assert why is None
    assert record == {"trainer": "hf", "step": 4, "cdb": {"seed": 0, "total": 8},
                      "files": {"empty.txt": 0, "model.safetensors": 5, "sub/optimizer.pt": 3},
                      "loop": {"completed_steps": 4}}
    assert read_checkpoint_record(_checkpoint(tmp_path, step=0))[1] is None, "a checkpoint of step 0 is one"


@pytest.mark.parametrize("damage, why", [
    (lambda f: (f / CHECKPOINT_RECORD).unlink(), f"its {CHECKPOINT_RECORD} is missing (the save was cut short)"),
    (lambda f: (f / CHECKPOINT_RECORD).write_text("{"), f"its {CHECKPOINT_RECORD} is unreadable"),
    (lambda f: (f / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda f: (f / "sub" / "optimizer.pt").write_bytes(b"12"), "sub/optimizer.pt has 2 bytes where 3 were written"),
    (lambda f: _edit(f, step=5), f"its {CHECKPOINT_RECORD} says step 5, its name step 4"),
    (lambda f: _edit(f, step=True), "has no valid 'step'/'trainer'"),
    (lambda f: _edit(f, step=-1), "has no valid 'step'/'trainer'"),
    (lambda f: _edit(f, trainer="deepspeed"), "has no valid 'step'/'trainer'"),
    (lambda f: _edit(f, cdb=[1]), "has a malformed 'cdb'"),
    (lambda f: _edit(f, cdb_run="x"), "has a malformed 'cdb_run'"),
    (lambda f: _edit(f, files={}), "lists no files"),
    (lambda f: _edit(f, files=["model.safetensors"]), "lists no files"),
    (lambda f: _edit(f, files={"model.safetensors": 5.0}), "model.safetensors has 5 bytes where 5.0 were written"),
])
def test_an_incomplete_or_damaged_checkpoint_is_named_with_the_reason(damage, why, tmp_path):
    folder = _checkpoint(tmp_path)
    damage(folder)
    record, reason = read_checkpoint_record(folder)
    assert record is None and why in reason, reason


def _edit(folder: Path, **changes) -> None:
    record = json.loads((folder / CHECKPOINT_RECORD).read_text())
    (folder / CHECKPOINT_RECORD).write_text(json.dumps({**record, **changes}))


def test_an_accelerate_checkpoint_reads_back_too(tmp_path):
    folder = _checkpoint(tmp_path)
    _edit(folder, trainer="accelerate")
    assert read_checkpoint_record(folder)[0]["trainer"] == "accelerate"


def test_a_checkpoint_folder_of_another_name_is_judged_by_its_record_alone(tmp_path):
    folder = _checkpoint(tmp_path)
    renamed = folder.rename(tmp_path / "my-backup")
    assert read_checkpoint_record(renamed)[1] is None


# ------------------------------------------------------------------------------------------ resume checks
def _record(**cdb) -> dict:
    return {"cdb": cdb or None}


@pytest.mark.parametrize("saved, now, expected", [
    ({"seed": 0, "schedule_total_steps": 6}, {"seed": 0, "schedule_total_steps": 8},
     "schedule_total_steps: 6 in the checkpoint, 8 now"),
    ({"seed": 0}, {"seed": 0, "rate": 0.5}, "rate: None in the checkpoint, 0.5 now"),
    ({"seed": 0}, None, "cdb: true in the checkpoint, false now"),
    (None, {"seed": 0}, "cdb: false in the checkpoint, true now"),
])
def test_resume_refuses_other_settings_naming_each_difference(saved, now, expected, caplog):
    record = {"cdb": saved}
    with pytest.raises(UsageError) as refused:
        check_resume_matches(record, now, SimpleNamespace(resume_allow_cdb_changes=False), "ckpt-2")
    message = str(refused.value)
    assert message.startswith("--resume_from_checkpoint 'ckpt-2' was saved with other ChannelDropBack settings (")
    assert expected in message and message.endswith("or pass --resume_allow_cdb_changes true")
    with caplog.at_level("WARNING", logger="cdb_hf.resume"):
        check_resume_matches(record, now, SimpleNamespace(resume_allow_cdb_changes=True), "ckpt-2")
    assert expected in caplog.text and "resuming anyway because of --resume_allow_cdb_changes" in caplog.text


def test_resume_with_the_same_settings_or_no_record_goes_ahead_silently(caplog):
    strict = SimpleNamespace(resume_allow_cdb_changes=False)
    with caplog.at_level("WARNING", logger="cdb_hf.resume"):
        check_resume_matches({"cdb": {"seed": 0, "b": [1]}}, {"b": [1], "seed": 0}, strict, "c")
        check_resume_matches({"cdb": None}, None, strict, "c")
        check_resume_matches(None, {"seed": 0}, strict, "c")  # not a checkpoint of ours: nothing known
        check_resume_matches({"cdb": {"seed": 0}}, {"seed": 0}, object(), "c")
    assert caplog.text == ""
    with pytest.raises(UsageError, match="seed: 0 in the checkpoint, 1 now"):
        check_resume_matches({"cdb": {"seed": 0}}, {"seed": 1}, object(), "c")
    with pytest.raises(UsageError, match=r"\(rate: 0.1 in the checkpoint, 0.2 now; seed: 0 in the checkpoint, 1 now\)"):
        check_resume_matches({"cdb": {"seed": 0, "rate": 0.1}}, {"seed": 1, "rate": 0.2}, strict, "c")


def test_resume_compares_one_record_first_without_then_with_the_run_sized_fields():
    """Pre-flight (sized=False) compares the record before the run's length is known: the fields the run fills
    in are left to the faces' comparison of the same record once it is sized. A checkpoint of cdb_hf 0.1 kept
    its sized settings under 'cdb_run', beside the unsized 'cdb': that one is what it is compared with."""
    strict = SimpleNamespace(resume_allow_cdb_changes=False)
    record = {"cdb": {"seed": 0, "schedule_total_steps": 6, "schedule_steps_per_epoch": 3}}
    unsized = {"seed": 0, "schedule_total_steps": None, "schedule_steps_per_epoch": None}
    check_resume_matches(record, unsized, strict, "c", sized=False)
    with pytest.raises(UsageError, match="schedule_total_steps: 6 in the checkpoint, None now"):
        check_resume_matches(record, unsized, strict, "c")
    with pytest.raises(UsageError, match="seed: 0 in the checkpoint, 1 now"):
        check_resume_matches(record, {**unsized, "seed": 1}, strict, "c", sized=False)
    old = {"cdb": {"seed": 0, "schedule_total_steps": None}, "cdb_run": {"seed": 0, "schedule_total_steps": 6}}
    check_resume_matches(old, {"seed": 0, "schedule_total_steps": 6}, strict, "c")
    with pytest.raises(UsageError, match="schedule_total_steps: 6 in the checkpoint, 8 now"):
        check_resume_matches(old, {"seed": 0, "schedule_total_steps": 8}, strict, "c")


@pytest.mark.parametrize("state, max_steps, problem", [
    ([], None, "it is not an object"),
    ({"log_history": []}, None, "completed_steps=None is not an integer >= 0"),
    ({"completed_steps": -1, "log_history": []}, None, "completed_steps=-1 is not an integer >= 0"),
    ({"completed_steps": 2.0, "log_history": []}, None, "completed_steps=2.0 is not an integer >= 0"),
    ({"completed_steps": False, "log_history": []}, None, "completed_steps=False is not an integer >= 0"),
    ({"completed_steps": 7, "log_history": []}, 6, "completed_steps=7 is beyond this run's 6 optimizer steps"),
    ({"completed_steps": 2}, None, "log_history is not a list"),
    ({"completed_steps": 2, "log_history": [1]}, None, "log_history holds an entry that is not an object"),
    ({"completed_steps": 2, "log_history": [{1: 2}]}, None, "log_history holds an entry that is not an object"),
    ({"completed_steps": 2, "log_history": [{"loss": math.nan}]}, None,
     "log_history holds a value that is neither a finite number nor a string"),
    ({"completed_steps": 2, "log_history": [{"loss": [1]}]}, None,
     "log_history holds a value that is neither a finite number nor a string"),
])
def test_a_loop_state_is_checked_field_by_field(state, max_steps, problem):
    assert loop_state_error("ckpt", state, max_steps) == problem


def test_a_good_loop_state_passes():
    state = {"completed_steps": 6, "log_history": [{"loss": 0.5, "step": 2, "note": "x", "lr": None}]}
    assert loop_state_error("ckpt", state, 6) is None
    assert loop_state_error("ckpt", {"completed_steps": 0, "log_history": []}) is None
