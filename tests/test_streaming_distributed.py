"""--streaming on two gloo ranks: disjoint parts, identical CDB masks, bitwise resume, one count per evaluated image.

One ``accelerate launch`` of ``dist_worker.py`` (see test_distributed.py) runs the loop, the loop crashed after
step 5 and resumed, and the Trainer path, all streaming the parquet fixture of test_streaming.py. Its own file,
so that pytest-xdist can run it beside the single-process streaming tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import run_quietly
from test_streaming import write_parquet_dataset


@pytest.fixture(scope="module")
def parquet_dataset(tmp_path_factory) -> Path:
    return write_parquet_dataset(tmp_path_factory.mktemp("parquet"))


@pytest.fixture(scope="module")
def stream_ranks(tmp_path_factory, tiny_vit_dir, parquet_dataset) -> list[dict]:
    """dist_worker.py's scenarios (loop, loop crashed after step 5 and resumed, Trainer) on two gloo ranks,
    streaming the parquet fixture: 6 optimizer steps of 2 x 2 accumulated examples per rank."""
    from test_distributed import launch_two_ranks

    workdir = tmp_path_factory.mktemp("two_stream_ranks")
    common = ["--model_name_or_path", str(tiny_vit_dir), "--dataset_name", str(parquet_dataset), "--streaming",
              "true", "--shuffle_buffer_size", "4", "--use_cpu", "--seed", "7", "--max_steps", "6",
              "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
              "--gradient_accumulation_steps", "2", "--learning_rate", "0.01", "--max_grad_norm", "0",
              "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "3", "--report_to", "none",
              "--disable_tqdm", "true", "--cdb_layer_selection", "bernoulli", "--cdb_layer_rate", "0.7",
              "--cdb_channel_rate", "0.4", "--cdb_mode", "exact", "--cdb_seed", "11"]
    spec = {"common_args": common, "loop_args": [], "trainer_args": [], "crash_after": 5, "train_batch_size": 2}
    (workdir / "spec.json").write_text(json.dumps(spec))
    return launch_two_ranks(workdir)


def test_two_streaming_ranks_select_alike_read_apart_and_resume_bitwise(stream_ranks):
    assert [r["num_processes"] for r in stream_ranks] == [2, 2]
    for scenario in ("accelerate", "accelerate_resumed", "trainer"):
        rank0, rank1 = (r[scenario]["steps"] for r in stream_ranks)
        assert rank0.keys() == rank1.keys() and rank0
        for step in rank0:  # DDP is only right if every rank masks the same rows
            assert rank0[step]["selection"] == rank1[step]["selection"], f"{scenario}: step {step}"
            assert rank0[step]["weights_sha256"] == rank1[step]["weights_sha256"], f"{scenario}: step {step}"
    for scenario in ("accelerate", "trainer"):
        # 6 steps x 2 micro-batches (a loader over an endless stream collates one more ahead): no slice dropped
        batches0, batches1 = (r[scenario]["batches"][:12] for r in stream_ranks)
        assert len(batches0) == len(batches1) == 12
        assert all(b0["pixels_sha256"] != b1["pixels_sha256"] for b0, b1 in zip(batches0, batches1))
    for rank in stream_ranks:
        # Both faces read the same stream in the same order, and the resumed job continues it exactly.
        assert [b["labels"] for b in rank["accelerate"]["batches"][:12]] == \
            [b["labels"] for b in rank["trainer"]["batches"][:12]]
        resumed = rank["accelerate_resumed"]
        assert resumed["checkpoints_at_crash"] == ["checkpoint-3"] and list(resumed["steps"]) == ["3", "4", "5"]
        assert all(resumed["steps"][s] == rank["accelerate"]["steps"][s] for s in resumed["steps"])
        assert resumed["batches"][:6] == rank["accelerate"]["batches"][6:12]
    assert stream_ranks[0]["accelerate_resumed"]["model_sha256"] == stream_ranks[0]["accelerate"]["model_sha256"]


@pytest.mark.parametrize("scenario", ["trainer", "accelerate"])
def test_a_streamed_evaluation_on_two_ranks_counts_each_image_once(stream_ranks, parquet_dataset, tmp_path, scenario):
    """6 validation images in batches of 4 on two ranks: the padded last batch must not reach the metrics; both
    faces equal a one-process, map-style evaluation of the saved model."""
    run = Path(stream_ranks[0]["workdir"]) / scenario
    code, printed = run_quietly(["--do_train", "false", "--model_name_or_path", str(run), "--dataset_name",
                                 str(parquet_dataset), "--eval_split_name", "validation", "--use_cpu", "true",
                                 "--per_device_eval_batch_size", "4", "--report_to", "none", "--disable_tqdm", "true",
                                 "--output_dir", str(tmp_path / "single")])
    assert code == 0, printed
    expected = json.loads((tmp_path / "single" / "eval_results.json").read_text())
    got = json.loads((run / "eval_results.json").read_text())
    assert expected["eval_samples"] == 6
    assert got["eval_accuracy"] == expected["eval_accuracy"]
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)
