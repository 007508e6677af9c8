"""RunSession, the faces' shared frame: start-up errors are bad input, a failure restores, the ending completes."""

from __future__ import annotations

import logging

import pytest

from cdb_hf import cli
from cdb_hf.errors import UsageError
from cdb_hf.preflight import plan_run
from cdb_hf.run import RunSession
from cdb_hf.run_dir import read_run_marker, write_run_marker


def _plan(output_dir, *flags):
    return plan_run(*cli.parse_args(["--model_name_or_path", "unused", "--dataset_name", "unused",
                                     "--output_dir", str(output_dir), *flags]))


def test_bad_input_before_ready_is_one_usage_error_and_nothing_is_written(tmp_path, caplog):
    output_dir = tmp_path / "out"
    with pytest.raises(UsageError, match="no such column") as raised:
        with RunSession(_plan(output_dir)):
            logging.getLogger("cdb_hf").warning("loading chatter")
            raise ValueError("no such   column")
    assert str(raised.value) == "no such column" and isinstance(raised.value.__cause__, ValueError)
    assert not output_dir.exists()
    assert "loading chatter" not in caplog.text  # held back, then dropped with the failure


def test_after_ready_errors_are_failures_and_the_run_is_marked_failed(tmp_path):
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match="late"):
        with RunSession(_plan(output_dir)) as session:
            session.open_run_dir()
            session.ready()
            assert session.started
            raise ValueError("late")
    assert read_run_marker(output_dir)["status"] == "failed"


def test_a_failed_replacement_puts_the_earlier_run_back(tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    write_run_marker(output_dir, status="complete")
    (output_dir / "results.json").write_text("{}")
    with pytest.raises(UsageError, match="^bad value; the previous run in .* was restored$"):
        with RunSession(_plan(output_dir, "--overwrite_output_dir")) as session:
            session.open_run_dir()
            assert not (output_dir / "results.json").exists()
            raise ValueError("bad value")  # before ready(): bad input, and the message says what was restored
    assert (output_dir / "results.json").read_text() == "{}"
    assert read_run_marker(output_dir)["status"] == "complete"


def test_complete_marks_the_run_of_its_kind(tmp_path):
    output_dir = tmp_path / "out"
    with RunSession(_plan(output_dir), kind="eval") as session:
        session.open_run_dir()
        session.ready()
        session.complete()
    marker = read_run_marker(output_dir)
    assert (marker["status"], marker["kind"]) == ("complete", "eval")
