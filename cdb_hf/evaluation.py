"""Per-class results and predictions as plain files: pure functions over predictions, labels and names.

Both training paths and the evaluation-only run (``--do_train false``) hand their final predictions here,
so every run writes the same files:

* ``eval_per_class.csv`` — one row per class: support (examples of the class), correct, accuracy (the
  class's recall; empty when the class has no example);
* ``eval_confusion_matrix.csv`` — rows are true classes, columns predicted classes, cells counts;
* ``eval_confusion_matrix.png`` — the same as a picture, when matplotlib is installed (``cdb_hf[demo]``);
* ``predictions.csv`` (``--do_predict``) — per image: its file or index, its true label when the predicted
  split has class labels, the predicted label, then the top-k labels with their probabilities
  (k = min(5, number of classes)).

Nothing here needs torch or transformers: arrays in, files out.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CONFUSION_MATRIX_CSV", "CONFUSION_MATRIX_PNG", "FinalEvaluation", "PER_CLASS_CSV", "PREDICTIONS_CSV",
           "confusion_matrix", "per_class_accuracy", "softmax", "top_k", "write_confusion_matrix_png", "write_per_class_files",
           "write_predictions_csv"]

logger = logging.getLogger(__name__)

PER_CLASS_CSV = "eval_per_class.csv"
CONFUSION_MATRIX_CSV = "eval_confusion_matrix.csv"
CONFUSION_MATRIX_PNG = "eval_confusion_matrix.png"
PREDICTIONS_CSV = "predictions.csv"
#: Beyond this many classes a picture of the matrix is unreadable: the CSV is written, the PNG is not.
MAX_PLOTTED_CLASSES = 50


@dataclass
class FinalEvaluation:
    """The final evaluation's class ids (predicted, true) and, with ``--do_predict``, the predict set's logits:
    what :func:`cdb_hf.run.write_evaluation_files` turns into the per-class files and ``predictions.csv``."""

    predictions: Any = None
    references: Any = None
    predict_logits: Any = None


def _ids(values: Any, num_labels: int, what: str) -> np.ndarray:
    ids = np.asarray(values).reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what} must be integer class ids, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    outside = ids[(ids < 0) | (ids >= num_labels)]
    if outside.size:
        raise ValueError(f"{what} holds class id(s) {sorted(set(outside.tolist()))[:5]} outside 0..{num_labels - 1}")
    return ids


def confusion_matrix(predictions: Any, references: Any, num_labels: int) -> np.ndarray:
    """``(num_labels, num_labels)`` int64 counts: row = true class, column = predicted class."""
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    predictions = _ids(predictions, num_labels, "predictions")
    references = _ids(references, num_labels, "references")
    if predictions.shape != references.shape:
        raise ValueError(f"{predictions.size} predictions for {references.size} references")
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(matrix, (references, predictions), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray, labels: Sequence[str]) -> list[dict[str, Any]]:
    """One row per class from a confusion matrix: ``label``, ``support``, ``correct``, ``accuracy``.

    ``accuracy`` is correct / support (the class's recall), None for a class with no example: a zero
    there would read as "always wrong".
    """
    matrix = np.asarray(matrix)
    if matrix.shape != (len(labels), len(labels)):
        raise ValueError(f"a {matrix.shape} confusion matrix does not fit {len(labels)} labels")
    rows = []
    for index, label in enumerate(labels):
        support, correct = int(matrix[index].sum()), int(matrix[index, index])
        rows.append({"label": str(label), "support": support, "correct": correct,
                     "accuracy": correct / support if support else None})
    return rows


def write_per_class_files(output_dir: str | os.PathLike, predictions: Any, references: Any,
                          labels: Sequence[str]) -> list[dict[str, Any]]:
    """Write the per-class CSV, the confusion-matrix CSV and (matplotlib permitting) its PNG; return the rows.

    ``predictions``/``references`` are class ids over ``labels`` (the model's classes, in id order).
    """
    output_dir = Path(output_dir)
    matrix = confusion_matrix(predictions, references, len(labels))
    rows = per_class_accuracy(matrix, labels)
    with open(output_dir / PER_CLASS_CSV, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "support", "correct", "accuracy"])
        for row in rows:
            accuracy = "" if row["accuracy"] is None else f"{row['accuracy']:.6f}"
            writer.writerow([row["label"], row["support"], row["correct"], accuracy])
    with open(output_dir / CONFUSION_MATRIX_CSV, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *labels])
        for label, counts in zip(labels, matrix.tolist()):
            writer.writerow([label, *counts])
    write_confusion_matrix_png(output_dir / CONFUSION_MATRIX_PNG, matrix, labels)
    return rows


def write_confusion_matrix_png(path: str | os.PathLike, matrix: np.ndarray, labels: Sequence[str]) -> bool:
    """Draw the confusion matrix (rows normalised, counts written in the cells); return whether it was written.

    Optional: without matplotlib (``pip install 'cdb_hf[demo]'``), or with more than
    :data:`MAX_PLOTTED_CLASSES` classes, only the CSV exists, and a log line says why.
    """
    if len(labels) > MAX_PLOTTED_CLASSES:
        logger.info(f"{len(labels)} classes: {CONFUSION_MATRIX_PNG} is not drawn (see {CONFUSION_MATRIX_CSV})")
        return False
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info(f"matplotlib is not installed: {CONFUSION_MATRIX_PNG} is not drawn (pip install 'cdb_hf[demo]'; "
                    f"the counts are in {CONFUSION_MATRIX_CSV})")
        return False
    matrix = np.asarray(matrix)
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=np.float64), where=totals > 0)
    size = max(3.0, 0.45 * len(labels) + 1.5)
    figure, axes = plt.subplots(figsize=(size + 1.0, size))
    image = axes.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(len(labels)), labels=[str(label) for label in labels], rotation=90)
    axes.set_yticks(range(len(labels)), labels=[str(label) for label in labels])
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if len(labels) <= 20:
        for row in range(len(labels)):
            for column in range(len(labels)):
                if matrix[row, column]:
                    axes.text(column, row, str(int(matrix[row, column])), ha="center", va="center", fontsize=7,
                              color="white" if share[row, column] > 0.5 else "black")
    figure.colorbar(image, ax=axes, label="share of the true class")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


# ---------------------------------------------------------------------------------------------- predictions
def softmax(logits: Any) -> np.ndarray:
    """Row-wise softmax in float64 (stable: the row maximum is subtracted first)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_k(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, probabilities)`` of the ``k`` most probable classes per row, most probable first (ties: lower id)."""
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return order, np.take_along_axis(probabilities, order, axis=-1)


def write_predictions_csv(path: str | os.PathLike, key_name: str, keys: Sequence[Any], logits: Any,
                          labels: Sequence[str], k: int = 5, true_labels: Sequence[str] | None = None) -> int:
    """Write ``predictions.csv``: ``key_name`` (``file`` or ``index``), ``label`` (the true class name, only
    with ``true_labels``), ``predicted_label``, then ``top1_label, top1_probability, ...`` for k = min(``k``,
    number of classes). Returns the row count."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] != len(labels):
        raise ValueError(f"logits of shape {logits.shape} do not fit {len(labels)} labels")
    if len(keys) != logits.shape[0]:
        raise ValueError(f"{len(keys)} keys for {logits.shape[0]} rows of logits")
    if true_labels is not None and len(true_labels) != len(keys):
        raise ValueError(f"{len(true_labels)} true labels for {len(keys)} rows")
    k = min(k, len(labels))
    ids, probabilities = top_k(softmax(logits), k)
    header = [key_name, *(["label"] if true_labels is not None else []), "predicted_label"]
    for rank in range(1, k + 1):
        header += [f"top{rank}_label", f"top{rank}_probability"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        truths = true_labels if true_labels is not None else [None] * len(keys)
        for key, truth, row_ids, row_probabilities in zip(keys, truths, ids.tolist(), probabilities.tolist()):
            cells: list[Any] = [key, *([truth] if true_labels is not None else []), labels[row_ids[0]]]
            for class_id, probability in zip(row_ids, row_probabilities):
                cells += [labels[class_id], f"{probability:.6f}" if math.isfinite(probability) else ""]
            writer.writerow(cells)
    return len(keys)
