"""Runs that overlap: one live run per output folder; preemption under accelerate launch and in an A/B run.

Every run here is a real subprocess (``tests/hook_worker.py``) held or signalled at a point the test
chooses, on the tiny ViT and the generated image folder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import run_quietly
from test_safety import argv_for, make_previous_run, one_error_line, tree_hashes

from cdb_hf import cli
from cdb_hf.run_dir import read_checkpoint_record, read_run_marker
from cdb_hf.run_lock import RunLock, lock_path, read_lock

REPO = Path(__file__).resolve().parents[1]


def start_worker(target: str, nth: int, action: str, argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                        os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "hook_worker.py"), target, str(nth), action, *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the worker ended early ({process.returncode}): {process.stderr.read()[-3000:]}")
        assert time.time() < deadline, "the worker never reached its hook"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------ one live run
OVERLAPS = {
    # case: (the first run replaces an earlier run, the second run's extra flags)
    "a fresh run, then one with --overwrite_output_dir": (False, ["--overwrite_output_dir", "true"]),
    "a replacing run, then one without --overwrite_output_dir": (True, []),
}


@pytest.mark.parametrize("case", list(OVERLAPS))
def test_a_second_run_into_a_live_runs_folder_is_refused_and_the_live_run_finishes_untouched(
        case, tmp_path, tiny_vit_dir, image_folder, capsys):
    replaces, second_flags = OVERLAPS[case]
    output_dir = tmp_path / "out"
    first_flags = []
    if replaces:
        make_previous_run(output_dir)
        first_flags = ["--overwrite_output_dir", "true"]
    argv = argv_for("hf", tiny_vit_dir, image_folder, output_dir, *first_flags)
    go = tmp_path / "go"
    first = start_worker("cdb_hf.run:DivergenceGuard.observe", 2, f"wait:{go}", argv, tmp_path)
    try:
        wait_for(Path(f"{go}.ready"), first)
        during = tree_hashes(output_dir)

        code = cli.main(argv_for("hf", tiny_vit_dir, image_folder, output_dir, *second_flags))

        assert code == 2
        line = one_error_line(capsys)
        assert f"is in use by a live run (host {socket.gethostname()}, pid {first.pid}, started " in line, line
        assert tree_hashes(output_dir) == during
    finally:
        go.touch()
        out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-3000:]
    assert read_run_marker(output_dir)["status"] == "complete"
    assert (output_dir / "model.safetensors").is_file()
    assert not lock_path(output_dir).exists(), "the lock outlived its run"
    assert not list(tmp_path.glob(".out.previous-*")), "the replaced run is deleted once the new one completed"


def test_a_lock_left_by_a_dead_process_is_taken_over_and_said_so(tmp_path, tiny_vit_dir, image_folder, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    output_dir = tmp_path / "out"
    lock_path(output_dir).write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid,
                                                 "started": "2026-01-01T00:00:00", "token": "old"}))

    code, printed = run_quietly(argv_for("hf", tiny_vit_dir, image_folder, output_dir))

    assert code == 0, printed
    assert f"was left by a run that is gone (host {socket.gethostname()}, pid {gone.pid}" in caplog.text
    assert "its process is gone" in caplog.text
    assert any("its process is gone" in note for note in read_run_marker(output_dir)["notes"])
    assert not lock_path(output_dir).exists()


def test_a_lock_from_another_host_is_live_while_its_heartbeat_beats_and_stale_after(tmp_path, monkeypatch):
    output_dir = tmp_path / "out"
    path = lock_path(output_dir)
    path.write_text(json.dumps({"host": "node-17", "pid": 1, "started": "2026-01-01T00:00:00", "token": "t"}))
    monkeypatch.setenv("CDB_HF_LOCK_STALE_SECONDS", "60")
    assert read_lock(output_dir).stale_reason() is None
    with pytest.raises(RuntimeError, match="host node-17, pid 1"):
        RunLock(output_dir).acquire()

    os.utime(path, (time.time() - 120, time.time() - 120))
    assert "heartbeat stopped" in read_lock(output_dir).stale_reason()
    lock = RunLock(output_dir)
    lock.acquire()
    assert lock.taken_over.host == "node-17" and read_lock(output_dir).pid == os.getpid()
    lock.release()
    assert not path.exists()


def test_the_heartbeat_keeps_a_long_run_live(tmp_path, monkeypatch):
    monkeypatch.setenv("CDB_HF_LOCK_STALE_SECONDS", "1")
    monkeypatch.setenv("CDB_HF_LOCK_HEARTBEAT_SECONDS", "0.1")
    lock = RunLock(tmp_path / "out")
    lock.acquire()
    try:
        time.sleep(1.5)
        holder = read_lock(tmp_path / "out")
        assert holder.heartbeat_age < 1 and holder.stale_reason() is None
    finally:
        lock.release()


# One path in the suite (a launch costs ~30 s here); the Trainer path's stop goes through the same
# Preemption.due (with args.world_size) and passes the same test with "hf".
@pytest.mark.parametrize("trainer", ["accelerate"])
def test_under_accelerate_launch_all_ranks_share_the_lock_and_stop_together_at_one_ranks_signal(
        trainer, tmp_path, tiny_vit_dir, image_folder):
    """Two gloo ranks: rank 1 alone gets SIGTERM mid-run; both stop after the same step, with one complete
    checkpoint and one line (rank 0's). That the run starts at all shows rank 1 took rank 0's lock for its own."""
    from test_distributed import CPU_CONFIG, _free_port

    output_dir = tmp_path / "out"
    argv = argv_for(trainer, tiny_vit_dir, image_folder, output_dir, "--max_steps", "6", "--save_steps", "100",
                    "--per_device_train_batch_size", "2")
    env = {**os.environ, "HOOK_RANK": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    launched = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG),
                               "--main_process_port", str(_free_port()), str(REPO / "tests" / "hook_worker.py"),
                               "cdb_hf.run:DivergenceGuard.observe", "2", "SIGTERM", *argv],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    assert launched.returncode != 0, launched.stderr[-3000:]
    lines = [line for line in launched.stderr.splitlines() if line.startswith("run_finetune.py: stopped by SIGTERM")]
    assert len(lines) == 1, launched.stderr[-5000:]
    checkpoints = [p.name for p in output_dir.glob("checkpoint-*")]
    assert len(checkpoints) == 1 and f"after optimizer step {checkpoints[0].split('-')[1]}:" in lines[0], lines
    assert read_checkpoint_record(output_dir / checkpoints[0])[0] is not None
    assert read_run_marker(output_dir)["status"] == "interrupted" and not lock_path(output_dir).exists()


def test_overwriting_a_replacement_says_it_deletes_the_run_that_one_set_aside(tmp_path, caplog, tiny_vit_dir,
                                                                             image_folder):
    """What a killed replacement leaves: its folder (marked running, no checkpoint) naming the earlier run it set
    aside. Overwriting it says that both go when the new run completes, and then both go."""
    from cdb_hf.run_dir import write_run_marker

    aside = make_previous_run(tmp_path / ".out.previous-20260101-000000-abcdef")
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    write_run_marker(output_dir, status="running", replaces=aside.name)

    code, printed = run_quietly(argv_for("hf", tiny_vit_dir, image_folder, output_dir, "--overwrite_output_dir",
                                         "true"))

    assert code == 0, printed
    assert (f"was itself replacing an earlier run, kept in {str(aside)!r}; both are deleted when this run completes"
            in caplog.text)
    assert not aside.exists() and read_run_marker(output_dir)["status"] == "complete"


def test_a_preempted_ab_comparison_does_not_advise_a_resume(tmp_path, tiny_vit_dir, image_folder):
    output_dir = tmp_path / "ab"
    argv = argv_for("hf", tiny_vit_dir, image_folder, output_dir, "--ab_seeds", "2", "--max_steps", "2")
    stopped = start_worker("cdb_hf.run:DivergenceGuard.observe", 3, "SIGTERM", argv, tmp_path)
    _, err = stopped.communicate(timeout=240)
    assert stopped.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("run_finetune.py: stopped by SIGTERM after optimizer step 1 during the A/B comparison in"), last
    assert "--resume_from_checkpoint" not in last and "run it again into a new --output_dir" in last
    assert read_run_marker(output_dir)["status"] == "interrupted"
    assert read_run_marker(output_dir / "seed0" / "baseline")["status"] == "complete"
    assert read_run_marker(output_dir / "seed0" / "cdb")["status"] == "interrupted"
