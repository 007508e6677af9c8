"""--streaming: a local parquet stream end to end on both faces, resume, corrupt images, refusals."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import IMAGE_FOLDER_CLASSES, make_image
from test_cli import assert_same_weights, finetune_argv, run_quietly

from cdb_hf import streaming
from cdb_hf.arguments import DataArguments

TRAIN_PER_CLASS, VALIDATION_PER_CLASS = 8, 2


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet_dataset(root: Path, corrupt: dict[str, int] | None = None, train_shards: int = 2) -> Path:
    """``root/data/{train,validation}-*.parquet``: images as PNG bytes, labels as a ClassLabel (3 colours).

    ``corrupt``: {split: example index} whose bytes are cut short (the header survives, the pixels do not).
    """
    names = sorted(IMAGE_FOLDER_CLASSES)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    rng = np.random.default_rng(0)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, per_class, shards in (("train", TRAIN_PER_CLASS, train_shards), ("validation", VALIDATION_PER_CLASS, 1)):
        images, labels = [], []
        for index in range(per_class * len(names)):
            label = index % len(names)
            data = png_bytes(make_image(IMAGE_FOLDER_CLASSES[names[label]], "RGB", rng))
            if corrupt and corrupt.get(split) == index:
                data = data[: len(data) // 2]
            images.append({"bytes": data, "path": f"{split}_{index:03d}.png"})
            labels.append(label)
        table = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        for shard in range(shards):
            table.shard(shards, shard, contiguous=True).to_parquet(
                str(root / "data" / f"{split}-{shard:05d}-of-{shards:05d}.parquet"))
    return root


@pytest.fixture(scope="module")
def parquet_dataset(tmp_path_factory) -> Path:
    return write_parquet_dataset(tmp_path_factory.mktemp("parquet"))


def stream_argv(model_dir, dataset_dir, output_dir, *extra: str) -> list[str]:
    argv = finetune_argv(model_dir, Path("unused"), output_dir, "--streaming", "true", "--shuffle_buffer_size", "8",
                         *extra)
    at = argv.index("--train_dir")
    return argv[:at] + ["--dataset_name", str(dataset_dir)] + argv[at + 4:]


@pytest.mark.parametrize("trainer", ["hf", "accelerate"])
def test_a_parquet_stream_trains_and_evaluates_end_to_end_and_resumes_bitwise(tmp_path, tiny_vit_dir, parquet_dataset,
                                                                            trainer):
    def argv(out):
        return stream_argv(tiny_vit_dir, parquet_dataset, out, "--trainer", trainer, "--max_steps", "8",
                           "--save_steps", "4")

    code, printed = run_quietly(argv(tmp_path / "straight"))
    assert code == 0, printed
    results = json.loads((tmp_path / "straight" / "all_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and np.isfinite(results["eval_loss"])
    assert json.loads((tmp_path / "straight" / "trainer_state.json").read_text())["global_step"] == 8
    # 8 steps of 4 examples = 32 > 24 training examples: the stream went round once and went on.
    state = json.loads((tmp_path / "straight" / "checkpoint-4" / "cdb_hf_stream_rank0.json").read_text())
    assert state["raw_position"] == 16 and state["skipped_positions"] == []
    # An interrupted run leaves its first checkpoint; the resumed one continues the same stream to the same weights.
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    code, printed = run_quietly(argv(tmp_path / "resumed") + ["--resume_from_checkpoint", "true"])
    assert code == 0, printed
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")
