"""Preemption as a scheduler sends it: SIGTERM/SIGUSR1 at chosen points of a real subprocess run, on both paths,
then a resume that must end bitwise equal to the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import assert_same_weights, run_quietly
from test_overlap import start_worker
from test_safety import PATHS, argv_for, make_previous_run, tree_hashes

from cdb_hf.run_dir import RUN_MARKER, read_checkpoint_record, read_run_marker
from cdb_hf.run_lock import lock_path

REPO = Path(__file__).resolve().parents[1]


SIGNAL_POINTS = {
    # (path, where): (hooked callable, its call that gets the signal, the signal, the step the run stops after)
    ("hf", "mid-epoch"): ("cdb_hf.run:DivergenceGuard.observe", 3, "SIGTERM", 3),
    ("hf", "mid-save"): ("cdb_hf.trainer_path:write_checkpoint_record", 1, "SIGUSR1", 3),
    ("accelerate", "mid-epoch"): ("cdb_hf.run:DivergenceGuard.observe", 3, "SIGUSR1", 3),
    ("accelerate", "mid-save"): ("cdb_hf.accelerate_loop:write_checkpoint_record", 1, "SIGTERM", 2),  # saved: stop
}


@pytest.mark.parametrize("trainer,where", list(SIGNAL_POINTS))
def test_a_preempted_run_saves_stops_and_resumes_to_the_uninterrupted_weights(trainer, where, tmp_path,
                                                                              saved_runs, tiny_vit_dir,
                                                                              image_folder):
    target, nth, sig, step = SIGNAL_POINTS[trainer, where]
    output_dir = tmp_path / "out"
    argv = argv_for(trainer, tiny_vit_dir, image_folder, output_dir, "--max_steps", "6")

    stopped = start_worker(target, nth, sig, argv, tmp_path)
    _, err = stopped.communicate(timeout=240)

    assert stopped.returncode == 128 + getattr(signal, sig), err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last == (f"run_finetune.py: stopped by {sig} after optimizer step {step}: {output_dir}/checkpoint-{step} "
                    "is complete and the run is marked interrupted; to continue, run the same command with "
                    "--resume_from_checkpoint true"), err[-3000:]
    assert read_checkpoint_record(output_dir / f"checkpoint-{step}")[0] is not None
    assert read_run_marker(output_dir)["status"] == "interrupted"
    assert not (output_dir / "model.safetensors").exists() and not lock_path(output_dir).exists()

    code, printed = run_quietly(argv + ["--resume_from_checkpoint", "true"])

    assert code == 0, printed
    assert_same_weights(saved_runs[trainer], output_dir)
    assert read_run_marker(output_dir)["status"] == "complete"


@pytest.mark.parametrize("trainer", PATHS)
def test_a_preempted_replacement_names_the_earlier_run_and_completes_when_continued(trainer, tmp_path,
                                                                                    saved_runs, tiny_vit_dir,
                                                                                    image_folder):
    output_dir = make_previous_run(tmp_path / "out")
    previous = tree_hashes(output_dir)
    argv = argv_for(trainer, tiny_vit_dir, image_folder, output_dir, "--max_steps", "6")

    stopped = start_worker("cdb_hf.run:DivergenceGuard.observe", 2, "SIGTERM", argv + ["--overwrite_output_dir",
                                                                                       "true"], tmp_path)
    _, err = stopped.communicate(timeout=240)

    assert stopped.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    aside = list(tmp_path.glob(".out.previous-*"))
    assert len(aside) == 1 and tree_hashes(aside[0]) == previous
    assert "--resume_from_checkpoint true (instead of --overwrite_output_dir)" in last, last
    assert f"the earlier run it replaces is kept in {str(aside[0])!r} until the continued run completes" in last

    code, printed = run_quietly(argv + ["--resume_from_checkpoint", "true"])

    assert code == 0, printed
    assert_same_weights(saved_runs[trainer], output_dir)
    assert not aside[0].exists(), "the replacement completed: the run it replaced goes"
    assert json.loads((output_dir / RUN_MARKER).read_text())["replaces"] is None


@pytest.mark.parametrize("trainer", PATHS)
def test_a_signal_before_the_first_step_stops_at_once_and_puts_the_replaced_run_back(trainer, tmp_path,
                                                                                     tiny_vit_dir, image_folder):
    output_dir = make_previous_run(tmp_path / "out")
    previous = tree_hashes(output_dir)
    argv = argv_for(trainer, tiny_vit_dir, image_folder, output_dir, "--overwrite_output_dir", "true")

    # the folder is replaced by now; the training steps are about to start
    stopped = start_worker("cdb_hf.preemption:Preemption.training_steps", 1, "SIGTERM", argv, tmp_path)
    _, err = stopped.communicate(timeout=240)

    assert stopped.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == ("run_finetune.py: stopped by SIGTERM outside training, before a "
                                            "checkpoint could be written; nothing to continue from: run the command "
                                            "again"), err[-3000:]
    assert tree_hashes(output_dir) == previous
    assert not list(tmp_path.glob(".out.*"))


_FLAG_GROUP_SCRIPT = r"""
import sys, tempfile
import torch
import torch.distributed as dist
from cdb_hf.preemption import Preemption

dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
made = []
new_group = dist.new_group
dist.new_group = lambda **kwargs: made.append(kwargs) or new_group(**kwargs)
if sys.argv[1] == "nccl":  # what a GPU job's default group is: the flags must not be reduced over it
    dist.get_backend = lambda group=None: "nccl"
state = Preemption()
reduced = []
all_reduce = dist.all_reduce
dist.all_reduce = lambda tensor, **kwargs: reduced.append((tensor.device.type, kwargs["group"])) or all_reduce(tensor, **kwargs)
answers = [state.due(2)]
state.signum = 15
answers += [state.due(2), state.due(2), state.due(2)]
print(answers, state.signum, made, [(device, group is None) for device, group in reduced])
dist.destroy_process_group()
"""


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_the_ranks_flags_are_reduced_on_the_cpu_over_gloo(backend):
    """The flag read at every step is a CPU tensor reduced over gloo, so reading it never waits on a GPU's
    queue: over the default group when it is gloo, else over a gloo group made once. A signal noted at one
    step is agreed one step later."""
    done = subprocess.run([sys.executable, "-c", _FLAG_GROUP_SCRIPT, backend], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("[False, False, True, True] 15 "), line
    if backend == "gloo":
        assert "[] [('cpu', True), ('cpu', True), ('cpu', True), ('cpu', True)]" in line
    else:
        assert "[{'backend': 'gloo'}] [('cpu', False), ('cpu', False), ('cpu', False), ('cpu', False)]" in line
