"""Evaluate and predict without training (``--do_train false``, ``--do_predict``), and the per-class results.

One tiny accelerate-loop training (in-process) and one evaluation-only run (a real subprocess) carry the
end-to-end checks; the rest are pure functions and pre-flight refusals, which cost nothing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
from conftest import TINY_LABELS, make_image
from test_cli import run_quietly

from cdb_hf import evaluation, sources
from cdb_hf.eval_only import match_labels
from cdb_hf.hub import write_model_card
from cdb_hf.run_dir import read_run_marker

REPO = Path(__file__).resolve().parents[1]
PER_CLASS_FILES = {evaluation.PER_CLASS_CSV, evaluation.CONFUSION_MATRIX_CSV, evaluation.CONFUSION_MATRIX_PNG}


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def check_predictions(path: Path, expected_keys: list[str], labels: list[str]) -> None:
    """Header, one row per key, predicted = top-1, top-k labels distinct, probabilities descending, sum <= 1."""
    rows = read_csv(path)
    k = min(5, len(labels))
    assert rows[0] == [rows[0][0], "predicted_label"] + [f"top{r}_{what}" for r in range(1, k + 1)
                                                         for what in ("label", "probability")]
    assert [row[0] for row in rows[1:]] == expected_keys
    for row in rows[1:]:
        top_labels, probabilities = row[2::2], [float(p) for p in row[3::2]]
        assert row[1] == top_labels[0] and set(top_labels) <= set(labels)
        assert len(set(top_labels)) == k
        assert all(0 <= p <= 1 for p in probabilities) and probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) <= 1 + 1e-5


# ---------------------------------------------------------------------------------------------- pure functions
def test_confusion_matrix_and_per_class_accuracy_on_a_hand_made_example(tmp_path):
    labels = ["cat", "dog", "owl", "yak"]
    references = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    predictions = [0, 1, 0, 1, 1, 2, 0, 2, 1]
    matrix = evaluation.confusion_matrix(predictions, references, len(labels))
    assert matrix.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 1, 2, 0], [0, 0, 0, 0]]
    rows = evaluation.per_class_accuracy(matrix, labels)
    assert rows == [{"label": "cat", "support": 3, "correct": 2, "accuracy": 2 / 3},
                    {"label": "dog", "support": 2, "correct": 2, "accuracy": 1.0},
                    {"label": "owl", "support": 4, "correct": 2, "accuracy": 0.5},
                    {"label": "yak", "support": 0, "correct": 0, "accuracy": None}]  # no example: no accuracy

    evaluation.write_per_class_files(tmp_path, np.array(predictions), np.array(references), labels)
    assert read_csv(tmp_path / evaluation.PER_CLASS_CSV) == [
        ["label", "support", "correct", "accuracy"], ["cat", "3", "2", "0.666667"], ["dog", "2", "2", "1.000000"],
        ["owl", "4", "2", "0.500000"], ["yak", "0", "0", ""]]
    assert read_csv(tmp_path / evaluation.CONFUSION_MATRIX_CSV) == [
        ["true \\ predicted", *labels], ["cat", "2", "1", "0", "0"], ["dog", "0", "2", "0", "0"],
        ["owl", "1", "1", "2", "0"], ["yak", "0", "0", "0", "0"]]
    assert (tmp_path / evaluation.CONFUSION_MATRIX_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="outside 0..3"):
        evaluation.confusion_matrix([0, 4], [0, 1], 4)


def test_without_matplotlib_only_the_csv_files_are_written(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without cdb_hf[demo] looks like
    with caplog.at_level("INFO", logger="cdb_hf.evaluation"):
        evaluation.write_per_class_files(tmp_path, [0, 1], [0, 0], ["a", "b"])
    assert {p.name for p in tmp_path.iterdir()} == {evaluation.PER_CLASS_CSV, evaluation.CONFUSION_MATRIX_CSV}
    assert "matplotlib is not installed" in caplog.text


def test_predictions_csv_has_top_k_in_order(tmp_path):
    labels = ["a", "b", "c", "d", "e", "f", "g"]
    logits = np.array([[0.0, 3.0, 1.0, 2.0, -1.0, -2.0, -3.0], [5.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    evaluation.write_predictions_csv(tmp_path / "p.csv", "index", [0, 1], logits, labels)
    rows = read_csv(tmp_path / "p.csv")
    assert len(rows[0]) == 2 + 2 * 5, "k = min(5, classes)"
    assert rows[1][:2] == ["0", "b"] and rows[1][2::2] == ["b", "d", "c", "a", "e"]
    assert rows[2][2:6:2] == ["a", "b"], "ties: the lower class id first"
    expected = np.exp(logits[0]) / np.exp(logits[0]).sum()
    assert float(rows[1][3]) == pytest.approx(expected[1], abs=1e-6)
    check_predictions(tmp_path / "p.csv", ["0", "1"], labels)
    evaluation.write_predictions_csv(tmp_path / "q.csv", "index", [0, 1], logits, labels, true_labels=["b", ""])
    with_truth = read_csv(tmp_path / "q.csv")
    assert with_truth[0][:3] == ["index", "label", "predicted_label"]
    assert [row[1] for row in with_truth[1:]] == ["b", ""]
    assert [row[:1] + row[2:] for row in with_truth] == rows, "the rest is unchanged"
    with pytest.raises(ValueError, match="1 true labels for 2 rows"):
        evaluation.write_predictions_csv(tmp_path / "r.csv", "index", [0, 1], logits, labels, true_labels=["b"])


def test_labels_match_by_name_else_by_position_with_a_warning_else_one_error(caplog):
    model = ["blue", "green", "red"]
    with caplog.at_level("WARNING", logger="cdb_hf.eval_only"):
        assert match_labels(["green", "red"], model).tolist() == [1, 2], "a folder with fewer classes: by name"
        assert not caplog.records, "matching by name is silent"
        assert match_labels(["LABEL_0", "LABEL_1", "LABEL_2"], model).tolist() == [0, 1, 2], "same count: by position"
    (warning,) = caplog.records
    assert warning.levelname == "WARNING" and "matched by position" in warning.getMessage()
    assert "['LABEL_0', 'LABEL_1', 'LABEL_2']" in warning.getMessage() and "['blue', 'green', 'red']" in warning.getMessage()
    with pytest.raises(ValueError, match=r"\['cyan', 'pink'\] are not among the model's 3 classes"):
        match_labels(["blue", "cyan", "pink", "red"], model)


def test_model_card_lists_per_class_accuracy_up_to_twenty_classes(tmp_path):
    model_args = SimpleNamespace(model_name_or_path="some/local/model")
    data_args = SimpleNamespace(dataset_name=None, train_dir="data/train", dataset_config_name=None)
    few = evaluation.per_class_accuracy(evaluation.confusion_matrix([0, 1, 1], [0, 1, 0], 2), ["cat", "dog"])
    card = write_model_card(tmp_path / "few", model_args, data_args, None, {"eval_accuracy": 2 / 3}, per_class=few)
    assert "| class | examples | correct | accuracy |" in card
    assert "| cat | 2 | 1 | 0.5000 |" in card and "| dog | 1 | 1 | 1.0000 |" in card
    many_labels = [f"class{i}" for i in range(25)]
    many = evaluation.per_class_accuracy(np.eye(25, dtype=np.int64), many_labels)
    card = write_model_card(tmp_path / "many", model_args, data_args, None, {"eval_accuracy": 1.0}, per_class=many)
    assert "25 classes: see `eval_per_class.csv`" in card and "| class24 |" not in card


def test_predict_split_of_a_dataset_is_keyed_by_index_with_its_true_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = [make_image((200, 30, 30), "RGB", rng) for _ in range(7)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"img": images[:2], "label": [0, 1]}, features=features),
        "test": datasets.Dataset.from_dict({"img": images[2:5], "label": [-1, -1, -1]}, features=features),
        "validation": datasets.Dataset.from_dict({"img": images[5:], "label": [1, 0]}, features=features),
    }).save_to_disk(tmp_path / "ds")
    args = SimpleNamespace(predict_dir=None, predict_split_name="test", dataset_name=str(tmp_path / "ds"),
                           dataset_config_name=None, train_dir=None, image_column_name=None)
    key_name, keys, split, true_labels = sources.load_predict_images(args)
    assert (key_name, keys, split.column_names) == ("index", [0, 1, 2], ["image"])
    assert true_labels == ["", "", ""], "a hidden test set's -1 is no class"
    args.predict_split_name = "validation"
    assert sources.load_predict_images(args)[3] == ["y", "x"]
    args.predict_split_name = "nope"
    with pytest.raises(ValueError, match=r"--predict_split_name 'nope' is not a split .* \['test', 'train', 'valid"):
        sources.load_predict_images(args)


# ---------------------------------------------------------------------------------------------- pre-flight
@pytest.mark.parametrize("extra, message", [
    (["--resume_from_checkpoint", "true"], "--resume_from_checkpoint needs training, but --do_train is false"),
    (["--ab_seeds", "2"], "--ab_seeds needs training"),
    (["--push_to_hub"], "--push_to_hub needs training"),
    (["--lora_r", "4"], "--lora_r needs training"),
    (["--lora_alpha", "8"], "--lora_alpha needs training"),
    (["--lora_dropout", "0.1"], "--lora_dropout needs training"),
    (["--lora_target_modules", "query"], "--lora_target_modules needs training"),
    (["--lora_merge", "true"], "--lora_merge needs training"),
    (["--ab_extra_arm", "weight_decay=0.05"], "--ab_extra_arm needs training"),
    (["--do_predict"], "--do_predict needs exactly one of --predict_dir"),
    (["--predict_dir", "."], "--predict_dir needs --do_predict"),
])
def test_evaluation_only_refuses_what_needs_training(tmp_path, tiny_vit_dir, image_folder, extra, message):
    output_dir = tmp_path / "out"
    code, printed = run_quietly(["--do_train", "false", "--model_name_or_path", str(tiny_vit_dir),
                                 "--validation_dir", str(image_folder / "validation"), "--output_dir",
                                 str(output_dir), "--report_to", "none", *extra])
    assert code == 2 and printed.count("\n") == 1 and message in printed, printed
    assert printed.startswith("run_finetune.py: error: ") and not output_dir.exists()


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_vit_dir, image_folder):
    """A tiny accelerate-loop fine-tuning that also predicts the validation folder."""
    output_dir = tmp_path_factory.mktemp("evalx") / "trained"
    code, printed = run_quietly([
        "--trainer", "accelerate", "--model_name_or_path", str(tiny_vit_dir),
        "--train_dir", str(image_folder / "train"), "--validation_dir", str(image_folder / "validation"),
        "--output_dir", str(output_dir), "--max_steps", "4", "--per_device_train_batch_size", "5",
        "--learning_rate", "1e-2", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--seed", "0",
        "--do_predict", "--predict_dir", str(image_folder / "validation")])
    assert code == 0, printed
    return output_dir


def test_accelerate_training_writes_per_class_results_predictions_and_card_table(trained, image_folder):
    assert PER_CLASS_FILES <= {p.name for p in trained.iterdir()}
    rows = read_csv(trained / evaluation.PER_CLASS_CSV)
    assert [row[0] for row in rows[1:]] == TINY_LABELS and sum(int(row[1]) for row in rows[1:]) == 6
    accuracy = json.loads((trained / "eval_results.json").read_text())["eval_accuracy"]
    assert sum(int(row[2]) for row in rows[1:]) / 6 == pytest.approx(accuracy), "per-class agrees with the total"
    matrix = read_csv(trained / evaluation.CONFUSION_MATRIX_CSV)
    assert sum(int(cell) for row in matrix[1:] for cell in row[1:]) == 6
    validation = image_folder / "validation"
    check_predictions(trained / evaluation.PREDICTIONS_CSV,
                      sorted(p.relative_to(validation).as_posix() for p in validation.rglob("*.png")), TINY_LABELS)
    card = (trained / "README.md").read_text()
    assert "### Per-class accuracy (validation set)" in card and all(f"| {label} | 2 |" in card for label in TINY_LABELS)


def test_evaluation_only_leaves_the_training_run_untouched(trained, image_folder, tmp_path):
    before = tree_hashes(trained)
    output_dir = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, str(REPO / "run_finetune.py"), "--do_train", "false", "--model_name_or_path", str(trained),
         "--validation_dir", str(image_folder / "validation"), "--output_dir", str(output_dir), "--report_to", "none",
         "--use_cpu", "--disable_tqdm", "true", "--do_predict", "--predict_dir", str(image_folder)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert tree_hashes(trained) == before, "the evaluated run's files are unchanged"

    results = json.loads((output_dir / "eval_results.json").read_text())
    trained_results = json.loads((trained / "eval_results.json").read_text())
    assert results["eval_samples"] == 6 and 0 <= results["eval_accuracy"] <= 1
    assert results["eval_accuracy"] == pytest.approx(trained_results["eval_accuracy"])
    assert results["eval_loss"] == pytest.approx(trained_results["eval_loss"], rel=1e-4)
    assert PER_CLASS_FILES <= {p.name for p in output_dir.iterdir()}
    assert read_csv(output_dir / evaluation.PER_CLASS_CSV) == read_csv(trained / evaluation.PER_CLASS_CSV)
    assert not (output_dir / "model.safetensors").exists() and read_run_marker(output_dir)["kind"] == "eval"
    check_predictions(output_dir / evaluation.PREDICTIONS_CSV,
                      sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.png")),
                      TINY_LABELS)

    # An evaluation never replaces a training run, --overwrite_output_dir or not.
    code, printed = run_quietly(["--do_train", "false", "--model_name_or_path", str(output_dir.parent / "x"),
                                 "--validation_dir", str(image_folder / "validation"), "--output_dir", str(trained),
                                 "--overwrite_output_dir", "--report_to", "none"])
    assert code == 2 and "would replace the training run" in printed, printed
    assert tree_hashes(trained) == before
    evaluated = tree_hashes(output_dir)
    code, printed = run_quietly(["--do_train", "false", "--model_name_or_path", str(trained), "--validation_dir",
                                 str(image_folder / "validation"), "--output_dir", str(output_dir), "--report_to", "none"])
    assert code == 2 and "is not empty; --do_train false writes into a new folder" in printed, printed
    assert tree_hashes(output_dir) == evaluated


def test_predicting_a_labelled_split_lists_each_true_label_and_they_agree_with_the_evaluation(trained, tmp_path):
    """--predict_split_name on a split with class labels: predictions.csv has a `label` column, and counting
    label == predicted_label over the evaluated split gives the run's eval_accuracy."""
    rng = np.random.default_rng(1)
    colours = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}
    names = [name for name in TINY_LABELS for _ in range(3)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=TINY_LABELS)})
    split = datasets.Dataset.from_dict({"image": [make_image(colours[n], "RGB", rng) for n in names],
                                       "label": [TINY_LABELS.index(n) for n in names]}, features=features)
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(tmp_path / "ds")
    output_dir = tmp_path / "out"
    code, printed = run_quietly(["--do_train", "false", "--model_name_or_path", str(trained), "--dataset_name",
                                 str(tmp_path / "ds"), "--output_dir", str(output_dir), "--report_to", "none",
                                 "--use_cpu", "--disable_tqdm", "true", "--do_predict",
                                 "--predict_split_name", "validation"])
    assert code == 0, printed
    rows = read_csv(output_dir / evaluation.PREDICTIONS_CSV)
    assert rows[0][:3] == ["index", "label", "predicted_label"]
    assert [row[1] for row in rows[1:]] == names
    correct = sum(row[1] == row[2] for row in rows[1:])
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert results["eval_samples"] == len(names)
    assert correct / len(names) == pytest.approx(results["eval_accuracy"])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_trainer_paths_per_image_loss_is_the_trainers_own_loss_on_whole_batches(smoothing):
    """What the CLI's Trainer reports as eval_loss (recomputed per image from the gathered logits) equals the
    Trainer's own loss, label smoothing included, when no duplicate pads a batch."""
    import torch
    from transformers.trainer_pt_utils import LabelSmoother

    from cdb_hf.trainer_path import mean_loss_per_image

    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(12, 5, generator=generator) * 3, torch.randint(0, 5, (12,), generator=generator)
    if smoothing:
        expected = LabelSmoother(epsilon=smoothing)({"logits": logits}, labels).item()
    else:
        expected = torch.nn.functional.cross_entropy(logits, labels).item()
    assert mean_loss_per_image(logits.numpy(), labels.numpy(), smoothing) == pytest.approx(expected, rel=1e-6)
    assert mean_loss_per_image((logits.numpy(),), labels.numpy(), smoothing) == pytest.approx(expected, rel=1e-6)
