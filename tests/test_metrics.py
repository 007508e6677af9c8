"""cdb_hf.metrics: local evaluate modules checked against scikit-learn, and the Trainer/loop helpers."""

from __future__ import annotations

import configparser
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, top_k_accuracy_score
from transformers import EvalPrediction

from cdb_hf import metrics


@pytest.fixture(scope="module")
def scores_and_labels():
    rng = np.random.default_rng(0)
    return rng.normal(size=(200, 7)).astype(np.float32), rng.integers(0, 7, 200)


def test_accuracy_module_matches_sklearn(scores_and_labels):
    scores, labels = scores_and_labels
    predictions = scores.argmax(1)
    weights = np.random.default_rng(1).random(len(labels))
    accuracy = evaluate.load(metrics.metric_path("accuracy"))
    assert accuracy.compute(predictions=predictions, references=labels)["accuracy"] == \
        pytest.approx(accuracy_score(labels, predictions))
    assert accuracy.compute(predictions=predictions, references=labels, normalize=False)["accuracy"] == \
        accuracy_score(labels, predictions, normalize=False)
    assert accuracy.compute(predictions=predictions, references=labels, sample_weight=weights)["accuracy"] == \
        pytest.approx(accuracy_score(labels, predictions, sample_weight=weights))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_module_matches_sklearn(scores_and_labels, k):
    scores, labels = scores_and_labels
    top_k = evaluate.load(metrics.metric_path("top_k_accuracy"))
    value = top_k.compute(predictions=scores, references=labels, k=k)["top_k_accuracy"]
    assert value == pytest.approx(top_k_accuracy_score(labels, scores, k=k, labels=list(range(7))))


def test_top_k_ties_rank_the_lower_class_first_and_bad_k_is_refused():
    top_k = evaluate.load(metrics.metric_path("top_k_accuracy"))
    tied = [[1.0, 1.0, 1.0], [0.0, 2.0, 2.0]]
    assert top_k.compute(predictions=tied, references=[0, 1], k=1)["top_k_accuracy"] == 1.0
    assert top_k.compute(predictions=tied, references=[2, 2], k=1)["top_k_accuracy"] == 0.0
    assert top_k.compute(predictions=tied, references=[2, 2], k=2, normalize=False)["top_k_accuracy"] == 1
    for bad_k in (0, 1.5):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            top_k.compute(predictions=tied, references=[0, 1], k=bad_k)


def test_compute_metrics_for_the_trainer(scores_and_labels):
    scores, labels = scores_and_labels
    compute_metrics = metrics.build_compute_metrics(num_labels=7)
    result = compute_metrics(EvalPrediction(predictions=scores, label_ids=labels))
    ranks = (scores > scores[np.arange(len(labels)), labels][:, None]).sum(1)  # classes scored above the truth
    assert result == pytest.approx({"accuracy": float((ranks == 0).mean()), "top5_accuracy": float((ranks < 5).mean())})
    assert all(type(value) is float for value in result.values())
    # Reusable across evaluations, and tuple predictions (logits + hidden states) work.
    assert compute_metrics(EvalPrediction(predictions=(scores, np.zeros(3)), label_ids=labels)) == result


def test_compute_metrics_accumulates_batches_until_compute_result(scores_and_labels):
    scores, labels = scores_and_labels
    one_shot = metrics.build_compute_metrics(7)(EvalPrediction(predictions=scores, label_ids=labels))
    compute_metrics = metrics.build_compute_metrics(7)
    for _ in range(2):  # a second evaluation starts from scratch
        starts = list(range(0, len(labels), 64))
        for start in starts:  # what the Trainer does under --batch_eval_metrics (tensors, last batch computes)
            batch = EvalPrediction(predictions=torch.from_numpy(scores[start:start + 64]),
                                   label_ids=torch.from_numpy(labels[start:start + 64]))
            result = compute_metrics(batch, compute_result=start == starts[-1])
            if start != starts[-1]:
                assert result == {}
        assert result == pytest.approx(one_shot)


def test_top5_only_with_at_least_five_classes():
    three = np.eye(3, dtype=np.float32)
    assert metrics.build_compute_metrics(3)(EvalPrediction(predictions=three, label_ids=np.array([0, 1, 0]))) == \
        pytest.approx({"accuracy": 2 / 3})
    assert set(metrics.load_metrics(5)) == {"accuracy", "top5_accuracy"}
    for bad in (1, 0, "10", True):
        with pytest.raises(ValueError, match="num_labels must be an integer >= 2"):
            metrics.load_metrics(bad)


def test_batched_tensor_feeding_equals_one_shot(scores_and_labels):
    scores, labels = scores_and_labels
    loaded = metrics.load_metrics(7)
    for start in range(0, len(labels), 64):
        metrics.add_batch(loaded, torch.from_numpy(scores[start:start + 64]).to(torch.bfloat16),
                          torch.from_numpy(labels[start:start + 64]))
    batched = metrics.compute(loaded)
    bf16_scores = torch.from_numpy(scores).to(torch.bfloat16).float().numpy()
    one_shot = metrics.build_compute_metrics(7)(EvalPrediction(predictions=bf16_scores, label_ids=labels))
    assert batched == pytest.approx(one_shot)


def test_unknown_metric_names_the_available_ones():
    with pytest.raises(ValueError, match=r"No local metric 'f1'; available: \['accuracy', 'top_k_accuracy'\]"):
        metrics.metric_path("f1")


def test_metric_modules_are_shipped_as_package_data():
    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    patterns = setup["options.package_data"]["cdb_hf"].split()
    package = metrics.METRICS_DIR.parent
    modules = [str(path.relative_to(package)) for path in metrics.METRICS_DIR.glob("*/*.py")]
    assert sorted(modules) == ["metrics/accuracy/accuracy.py", "metrics/top_k_accuracy/top_k_accuracy.py"]
    # setuptools expands package_data patterns with glob, relative to the package folder.
    shipped = {str(path.relative_to(package)) for pattern in patterns for path in package.glob(pattern)}
    assert set(modules) <= shipped, f"package_data {patterns} misses {sorted(set(modules) - shipped)}"
