"""Evaluation metrics as local ``evaluate`` modules, so that evaluation never needs the Hugging Face Hub.

``evaluate.load("accuracy")`` downloads its script from the Hub; the modules in this package
(``accuracy/``, ``top_k_accuracy/``) have the same interface and load from the installed package.
Both training paths share :func:`add_batch` / :func:`compute`, so they report identical numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import evaluate
import numpy as np

METRICS_DIR = Path(__file__).resolve().parent
TOP_K = 5


def metric_path(name: str) -> str:
    """Folder of the local evaluate module ``name`` (``"accuracy"`` or ``"top_k_accuracy"``)."""
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"No local metric {name!r}; available: {available}.")
    return str(path)


def load_metrics(num_labels: int, **load_kwargs) -> dict[str, evaluate.EvaluationModule]:
    """``{"accuracy": ..., "top5_accuracy": ...}`` (top-5 only when there are at least 5 classes).

    Feed them with :func:`add_batch` and read them with :func:`compute` (what the accelerate loop does);
    ``load_kwargs`` go to ``evaluate.load``. They keep their inputs in memory by default: no cache files
    for concurrent runs to contend over (gather predictions with accelerate's ``gather_for_metrics`` first).
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels must be an integer >= 2, got {num_labels!r}.")
    load_kwargs.setdefault("keep_in_memory", True)
    metrics = {"accuracy": evaluate.load(metric_path("accuracy"), **load_kwargs)}
    if num_labels >= TOP_K:
        metrics[f"top{TOP_K}_accuracy"] = evaluate.load(metric_path("top_k_accuracy"), **load_kwargs)
    return metrics


def _as_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):  # torch tensors, possibly on an accelerator and in bf16
        array = array.detach().float().cpu().numpy() if array.is_floating_point() else array.detach().cpu().numpy()
    return np.asarray(array)


def add_batch(metrics: dict[str, evaluate.EvaluationModule], logits, labels) -> None:
    """Add one batch of ``logits`` (N, C) and integer ``labels`` (N,) to every metric of :func:`load_metrics`."""
    logits, labels = _as_numpy(logits), _as_numpy(labels).astype(np.int64)
    for name, metric in metrics.items():
        if name == "accuracy":
            metric.add_batch(predictions=logits.argmax(axis=-1), references=labels)
        else:
            metric.add_batch(predictions=logits.astype(np.float32), references=labels)


def compute(metrics: dict[str, evaluate.EvaluationModule]) -> dict[str, float]:
    """Final values of the metrics fed by :func:`add_batch`: ``{"accuracy": ..., "top5_accuracy": ...}``.

    Under ``evaluate``'s own multi-process mode, non-main processes get ``{}``.
    """
    results = {}
    for name, metric in metrics.items():
        value = metric.compute() if name == "accuracy" else metric.compute(k=TOP_K)
        if value is not None:
            results[name] = float(next(iter(value.values())))
    return results


def build_compute_metrics(num_labels: int) -> Callable[..., dict[str, float]]:
    """``compute_metrics`` for the transformers Trainer: accuracy (+ top5_accuracy when ``num_labels >= 5``).

    With ``--batch_eval_metrics`` the Trainer passes one batch at a time and ``compute_result=True`` on the
    last one: batches accumulate and the values come only then (``{}`` before), so the numbers do not depend
    on the batching. Without it, each call holds a whole evaluation.
    """
    metrics = load_metrics(num_labels)

    def compute_metrics(eval_prediction, compute_result: bool = True) -> dict[str, float]:
        logits = eval_prediction.predictions
        if isinstance(logits, (tuple, list)):  # models that also return hidden states/attentions
            logits = logits[0]
        add_batch(metrics, logits, eval_prediction.label_ids)
        return compute(metrics) if compute_result else {}

    return compute_metrics


__all__ = ["METRICS_DIR", "add_batch", "build_compute_metrics", "compute", "load_metrics", "metric_path"]
