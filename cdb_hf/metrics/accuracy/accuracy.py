"""Accuracy: the fraction of predictions equal to their reference (shipped locally: works without the Hub)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all predictions:
Accuracy = (number of predictions equal to their reference) / (number of predictions).
Same inputs and outputs as the Hub's `accuracy` metric, without needing the Hub.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): true class ids.
    normalize (`bool`, defaults to `True`): if False, return the number of correct predictions instead.
    sample_weight (`list` of `float`, optional): per-example weights.
Returns:
    accuracy (`float` or `int`): in [0, 1] when normalized, else the (weighted) count of correct predictions.
Examples:
    >>> accuracy = evaluate.load("cdb_hf/metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 0])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = (np.asarray(predictions) == np.asarray(references)).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != correct.shape:
            raise ValueError(f"sample_weight has shape {weights.shape}, expected {correct.shape}.")
        if not normalize:
            total = float(np.sum(correct * weights))
            return {"accuracy": int(total) if sample_weight is None else total}
        if weights.sum() == 0:
            raise ValueError("Accuracy of zero examples (or of zero total sample_weight) is undefined.")
        return {"accuracy": float(np.sum(correct * weights) / np.sum(weights))}
