"""One rank of the two-process tests in test_distributed.py.

Start it with ``accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml tests/dist_worker.py DIR``
(what the test does) or ``torchrun --nproc_per_node 2 tests/dist_worker.py DIR``; ``DIR/spec.json`` holds
the run's flags.

Starting processes is the expensive part on a small CPU machine, so one launch runs every scenario and
each rank writes what it saw to ``<workdir>/rank<i>.json``; the test compares the ranks afterwards:

* ``accelerate``: the accelerate loop, uninterrupted;
* ``accelerate_resumed``: the same job crashed after optimizer step ``crash_after`` and resumed from the
  newest checkpoint in its output_dir (``--resume_from_checkpoint true``);
* ``trainer``: the transformers Trainer path with ChannelDropBackCallback;
* ``eval_only``: ``--do_train false`` (with ``--do_predict``) on the ``accelerate`` scenario's saved model,
  when ``spec.json`` has ``eval_args``: the metrics each rank returned (the files are read by the test).

A spy on ``ChannelDropBack.after_step`` (CDB's optimizer post-hook) records, after every optimizer step,
the step's selection (bool masks), its scheduled rate, and a hash of every trainable parameter; a spy on
both paths' ``collate_fn`` records every batch this rank loaded (labels and a hash of the pixels).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState

import cdb_hf.image_check
import cdb_hf.transforms
from cdb_hf.accelerate_loop import train as accelerate_train
from cdb_hf.cli import parse_args
from cdb_hf.core import ChannelDropBack
from cdb_hf.eval_only import evaluate_only
from cdb_hf.preflight import plan_run
from cdb_hf.trainer_path import train as trainer_train
from cdb_hf.transforms import collate_fn


class SimulatedCrash(Exception):
    """Raised on every rank after the same optimizer step, like a job killed between checkpoints."""


class StepSpy:
    """Wraps CDB's after_step hook to record each optimizer step, and to crash on request."""

    def __init__(self) -> None:
        self.steps: dict[int, dict] = {}
        self.crash_after: int | None = None
        self._after_step = ChannelDropBack.after_step
        spy = self

        def after_step(cdb: ChannelDropBack, optimizer=None) -> None:
            spy._after_step(cdb, optimizer)
            spy.record(cdb)
            if spy.crash_after is not None and cdb.step == spy.crash_after:
                raise SimulatedCrash(f"simulated crash after optimizer step {cdb.step}")

        ChannelDropBack.after_step = after_step

    def record(self, cdb: ChannelDropBack) -> None:
        digest = hashlib.sha256()
        for group in cdb._optimizer.param_groups:
            for param in group["params"]:
                digest.update(param.detach().cpu().contiguous().numpy().tobytes())
        self.steps[cdb.step - 1] = {
            "selection": {name: mask.cpu().tolist() for name, mask in cdb.last_selection.items()},
            "layer_rate": cdb.last_stats["layer_rate"],
            "weights_sha256": digest.hexdigest(),
        }

    def take(self) -> dict[str, dict]:
        steps, self.steps = self.steps, {}
        return {str(step): record for step, record in sorted(steps.items())}


class BatchSpy:
    """Records the batches a rank loads (both training paths collate through cdb_hf.transforms.collate_fn)."""

    def __init__(self) -> None:
        self.batches: list[dict] = []
        cdb_hf.transforms.collate_fn = self.collate  # what both paths' shared setup hands them

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate_fn(examples)
        pixels = hashlib.sha256(batch["pixel_values"].numpy().tobytes()).hexdigest()
        self.batches.append({"labels": batch["labels"].tolist(), "pixels_sha256": pixels})
        return batch

    def take(self) -> list[dict]:
        batches, self.batches = self.batches, []
        return batches


def file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def main(workdir: Path) -> None:
    spec = json.loads((workdir / "spec.json").read_text())
    state = PartialState(cpu=True)  # what --use_cpu makes the loop and the Trainer use: gloo ranks
    spy, batch_spy = StepSpy(), BatchSpy()
    results: dict = {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
                     "num_processes": state.num_processes, "process_index": state.process_index,
                     "distributed_type": str(state.distributed_type)}

    def run(train, name: str, extra: list[str]) -> Path:
        output_dir = workdir / name
        train(plan_run(*parse_args([*spec["common_args"], "--output_dir", str(output_dir), *extra])))
        return output_dir

    def train_batches() -> list[dict]:
        """The training batches loaded since the last call (evaluation batches have 4 examples here)."""
        return [batch for batch in batch_spy.take() if len(batch["labels"]) == spec["train_batch_size"]]

    # The image check's decodes in the first run (a fresh verdict cache): the main process checks first,
    # the other ranks then find every verdict cached.
    decodes: list[str] = []
    real_decode = cdb_hf.image_check.decode_error
    cdb_hf.image_check.decode_error = lambda source: decodes.append(str(source)) or real_decode(source)
    loop_args = ["--trainer", "accelerate", *spec["loop_args"]]
    output = run(accelerate_train, "accelerate", loop_args)
    cdb_hf.image_check.decode_error = real_decode
    results["accelerate"] = {"steps": spy.take(), "batches": train_batches(), "image_decodes": len(decodes),
                             "model_sha256": file_sha256(output / "model.safetensors")}

    spy.crash_after = spec["crash_after"]
    try:
        run(accelerate_train, "accelerate_resumed", loop_args)
        raise AssertionError("the simulated crash did not happen")
    except SimulatedCrash:
        pass
    spy.crash_after = None
    before_crash = spy.take()
    batch_spy.take()
    checkpoints = sorted(p.name for p in (workdir / "accelerate_resumed").glob("checkpoint-*"))
    output = run(accelerate_train, "accelerate_resumed", [*loop_args, "--resume_from_checkpoint", "true"])
    results["accelerate_resumed"] = {"before_crash": before_crash, "checkpoints_at_crash": checkpoints,
                                     "steps": spy.take(), "batches": train_batches(),
                                     "model_sha256": file_sha256(output / "model.safetensors")}

    output = run(trainer_train, "trainer", ["--trainer", "hf", *spec["trainer_args"]])
    results["trainer"] = {"steps": spy.take(), "batches": train_batches(),
                          "model_sha256": file_sha256(output / "model.safetensors")}

    if spec.get("eval_args"):
        flags = [*spec["eval_args"], "--model_name_or_path", str(workdir / "accelerate"),
                 "--output_dir", str(workdir / "eval_only")]
        results["eval_only"] = {"metrics": evaluate_only(plan_run(*parse_args(flags)))}

    # Written whole or not at all: the test judges the ranks by these files.
    record = workdir / f"rank{state.process_index}.json"
    record.with_suffix(".tmp").write_text(json.dumps(results, indent=1))
    record.with_suffix(".tmp").replace(record)
    state.wait_for_everyone()


if __name__ == "__main__":
    torch.set_num_threads(1)
    import datasets

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0.2  # 5 s at every end of a parquet stream (test_streaming.py)
    main(Path(sys.argv[1]))
    if dist.is_initialized():
        dist.destroy_process_group()
