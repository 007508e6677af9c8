"""Two real gloo ranks on CPU, both training paths: identical selections and bitwise identical weights.

One ``accelerate launch`` of ``dist_worker.py`` with the shipped ``recipes/accelerate/cpu_2proc.yaml``
runs every scenario (process start-up dominates the cost here); the tests below read what each rank
recorded after every optimizer step. accelerate starts the ranks through torch's elastic launcher,
the machinery behind ``torchrun --nproc_per_node 2``. (``accelerate launch --cpu --num_processes 2``
would start processes that each think they are alone: the world size is asserted below.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cdb_hf.image_check import CACHE_ENV

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
CPU_CONFIG = REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"
CRASH_AFTER = 5  # between the checkpoints at steps 3 and 6: the resumed job restarts mid-epoch


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, tiny_vit_dir, image_folder) -> list[dict]:
    """Launch both ranks once; return ``[rank 0's record, rank 1's record]``."""
    workdir = tmp_path_factory.mktemp("two_ranks")
    # 15 training images -> 8 per rank (accelerate evens the shards), batches of 2, accumulation 2:
    # 2 optimizer steps per epoch, 6 in 3 epochs. The linear schedule's length comes from the run itself.
    common = ["--model_name_or_path", str(tiny_vit_dir), "--train_dir", str(image_folder / "train"),
              "--validation_dir", str(image_folder / "validation"), "--use_cpu", "--seed", "7",
              "--num_train_epochs", "3", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
              "--gradient_accumulation_steps", "2", "--learning_rate", "0.01", "--max_grad_norm", "0",
              "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "3", "--report_to", "none",
              "--disable_tqdm", "true", "--cdb_layer_selection", "bernoulli", "--cdb_layer_rate", "0.7",
              "--cdb_layer_rate_init", "0.3", "--cdb_schedule", "linear", "--cdb_channel_rate", "0.4",
              "--cdb_mode", "exact", "--cdb_seed", "11"]
    spec = {"common_args": common, "loop_args": [], "trainer_args": [], "crash_after": CRASH_AFTER,
            "train_batch_size": 2, "eval_args": eval_only_args(image_folder)}
    (workdir / "spec.json").write_text(json.dumps(spec))
    return launch_two_ranks(workdir, {CACHE_ENV: str(workdir / "image_check_cache")})  # a fresh verdict cache


def launch_two_ranks(workdir: Path, extra_env: dict[str, str] | None = None) -> list[dict]:
    """Run ``dist_worker.py`` on two gloo ranks over ``workdir/spec.json``; return each rank's record."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", **(extra_env or {})}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG),
               "--main_process_port", str(_free_port()), str(WORKER), str(workdir)]
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    written = [workdir / f"rank{rank}.json" for rank in range(2)]
    # torch 2.14's gloo sometimes aborts a rank at interpreter exit, after destroy_process_group and so after
    # the rank wrote its record: with exactly that signature and every record written, judge by the records.
    exit_abort = "terminate called without an active exception" in finished.stderr
    assert finished.returncode == 0 or (exit_abort and all(path.is_file() for path in written)), (
        f"accelerate launch failed:\n{finished.stdout[-4000:]}\n{finished.stderr[-6000:]}")
    records = [json.loads(path.read_text()) for path in written]
    for record in records:
        record["workdir"] = str(workdir)
    return records


def eval_only_args(image_folder: Path) -> list[str]:
    """``--do_train false`` with a prediction over the 15 training images: 8 + 7 over two ranks, so the last
    batch is evened out with a duplicate that must not reach the results."""
    return ["--do_train", "false", "--do_predict", "--predict_dir", str(image_folder / "train"),
            "--validation_dir", str(image_folder / "validation"), "--use_cpu", "--per_device_eval_batch_size", "4",
            "--report_to", "none", "--disable_tqdm", "true"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_real_ranks(ranks):
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert [r["process_index"] for r in ranks] == [0, 1]
    assert all(r["distributed_type"] == "DistributedType.MULTI_CPU" for r in ranks)


def test_only_the_main_process_decodes_the_images_the_others_find_them_cached(ranks):
    """README, Corrupt images: the main process checks the images first; the other ranks only stat them."""
    assert ranks[0]["accelerate"]["image_decodes"] >= 15  # 15 training + 6 validation images, fresh cache
    assert ranks[1]["accelerate"]["image_decodes"] == 0


@pytest.mark.parametrize("scenario", ["accelerate", "accelerate_resumed", "trainer"])
def test_every_rank_makes_the_same_selection_and_weights_at_every_step(ranks, scenario):
    rank0, rank1 = (r[scenario]["steps"] for r in ranks)
    assert rank0.keys() == rank1.keys() and rank0, "both ranks recorded the same optimizer steps"
    for step in rank0:
        assert rank0[step]["selection"] == rank1[step]["selection"], f"{scenario}: step {step} selections differ"
        assert rank0[step]["weights_sha256"] == rank1[step]["weights_sha256"], f"{scenario}: step {step} weights"
    # Non-trivial: rows were actually dropped, and not the same ones every step.
    masks = [tuple(m) for record in rank0.values() for m in record["selection"].values()]
    assert any(not all(mask) for mask in masks) and len(set(masks)) > 1


@pytest.mark.parametrize("scenario", ["accelerate", "trainer"])
def test_each_rank_trains_on_its_own_shard(ranks, scenario):
    """Identical weights come from DDP's gradient averaging, not from both ranks seeing the same data."""
    rank0, rank1 = (r[scenario]["batches"] for r in ranks)
    assert len(rank0) == len(rank1) == 12  # 6 optimizer steps x 2 accumulated batches
    assert all(b0["pixels_sha256"] != b1["pixels_sha256"] for b0, b1 in zip(rank0, rank1))
    assert list(ranks[0][scenario]["steps"]) == [str(step) for step in range(6)]


def test_every_epoch_augments_anew(ranks):
    for rank in ranks:
        for path in ("accelerate", "trainer"):
            hashes = [b["pixels_sha256"] for b in rank[path]["batches"]]
            assert len(set(hashes)) == len(hashes), path


def test_both_paths_read_the_data_in_the_same_order(ranks):
    for rank in ranks:
        loop_labels = [b["labels"] for b in rank["accelerate"]["batches"]]
        assert loop_labels == [b["labels"] for b in rank["trainer"]["batches"]]


def test_trainer_and_accelerate_paths_select_the_same_rows_step_by_step(ranks):
    """Same seed, config, data order and no clipping: the same selections and scheduled rates."""
    for rank in ranks:
        loop, trainer = rank["accelerate"]["steps"], rank["trainer"]["steps"]
        for step in loop:
            assert loop[step]["selection"] == trainer[step]["selection"], f"step {step}"
            assert loop[step]["layer_rate"] == pytest.approx(trainer[step]["layer_rate"])
    rates = [record["layer_rate"] for record in ranks[0]["accelerate"]["steps"].values()]
    assert rates == sorted(rates) and rates[0] < rates[-1], "the linear schedule ramps over the run's 6 steps"


def test_interrupted_and_resumed_job_ends_with_the_uninterrupted_weights(ranks):
    for rank in ranks:
        resumed, uninterrupted = rank["accelerate_resumed"], rank["accelerate"]["steps"]
        assert list(resumed["before_crash"]) == [str(step) for step in range(CRASH_AFTER)]
        assert resumed["checkpoints_at_crash"] == ["checkpoint-3"]
        # Resumed from checkpoint-3 (mid-epoch): steps 3..5 again, then to the end.
        assert list(resumed["steps"]) == ["3", "4", "5"]
        for step, record in resumed["steps"].items():
            assert record == uninterrupted[step], f"step {step} differs after resuming"
        # It skipped exactly the 6 batches that steps 0-2 consumed, and augmented the rest identically.
        assert resumed["batches"] == rank["accelerate"]["batches"][6:]
    rank0 = ranks[0]
    assert rank0["accelerate_resumed"]["model_sha256"] == rank0["accelerate"]["model_sha256"] is not None


def test_evaluation_only_on_two_ranks_equals_one_process(ranks, image_folder, tmp_path):
    """--do_train false under accelerate launch: every image counted and predicted once, the same metrics and
    predictions as one process, one set of files."""
    from cdb_hf import cli

    workdir = Path(ranks[0]["workdir"])
    single = tmp_path / "single"
    code = cli.main([*eval_only_args(image_folder), "--model_name_or_path", str(workdir / "accelerate"),
                     "--output_dir", str(single)])
    assert code == 0
    expected = json.loads((single / "eval_results.json").read_text())
    assert expected["eval_samples"] == 6
    for rank in ranks:
        metrics = rank["eval_only"]["metrics"]
        assert metrics["eval_accuracy"] == expected["eval_accuracy"]
        assert metrics["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)
    written = json.loads((workdir / "eval_only" / "eval_results.json").read_text())
    assert written["eval_samples"] == 6 and written["eval_accuracy"] == expected["eval_accuracy"]

    def predictions(folder: Path) -> list[list[str]]:
        return [line.split(",") for line in (folder / "predictions.csv").read_text().splitlines()]

    two_ranks, one = predictions(workdir / "eval_only"), predictions(single)
    assert len(two_ranks) == len(one) == 16  # header + each of the 15 images once
    assert [row[:2] for row in two_ranks] == [row[:2] for row in one]  # same files, same predicted classes
    assert [float(row[3]) for row in two_ranks[1:]] == pytest.approx([float(row[3]) for row in one[1:]], abs=1e-5)


@pytest.mark.parametrize("scenario", ["trainer", "accelerate"])
def test_final_evaluation_on_two_ranks_counts_each_image_once_on_both_paths(ranks, image_folder, tmp_path, scenario):
    """The 6 validation images in batches of 4 over two ranks: the last batch is evened out with duplicates.
    Both paths' eval_loss and eval_accuracy equal a one-process evaluation of the saved model (the Trainer
    path's own loss would repeat each batch's mean, duplicates included)."""
    from cdb_hf import cli

    run = Path(ranks[0]["workdir"]) / scenario
    single = tmp_path / "single"
    code = cli.main(["--do_train", "false", "--model_name_or_path", str(run), "--validation_dir",
                     str(image_folder / "validation"), "--use_cpu", "--per_device_eval_batch_size", "4",
                     "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(single)])
    assert code == 0
    expected = json.loads((single / "eval_results.json").read_text())
    got = json.loads((run / "eval_results.json").read_text())
    assert expected["eval_samples"] == 6
    assert got["eval_accuracy"] == expected["eval_accuracy"]
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)
