"""Top-k accuracy: the fraction of examples whose reference is among the k highest-scored classes."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-k accuracy counts an example as correct when its reference class is among the `k` classes with the
highest scores (logits or probabilities). Equal scores rank the lower class id first (as `argmax` does),
so with k=1 it equals the accuracy of the argmax.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): per-example scores, one per class (e.g. logits).
    references (`list` of `int`): true class ids.
    k (`int`, defaults to 5): how many top-scored classes count as a hit; must be >= 1.
    normalize (`bool`, defaults to `True`): if False, return the number of hits instead.
Returns:
    top_k_accuracy (`float` or `int`)
Examples:
    >>> top_k = evaluate.load("cdb_hf/metrics/top_k_accuracy")
    >>> top_k.compute(predictions=[[0.1, 0.5, 0.4], [0.8, 0.15, 0.05]], references=[2, 2], k=2)
    {'top_k_accuracy': 0.5}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32")),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, k=5, normalize=True):
        scores = np.asarray(predictions, dtype=np.float64)
        references = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2:
            raise ValueError(f"predictions must be one row of class scores per example, got shape {scores.shape}.")
        num_classes = scores.shape[1]
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        if references.size and (references.min() < 0 or references.max() >= num_classes):
            raise ValueError(f"references must be class ids in 0..{num_classes - 1}.")
        # Stable sort of the negated scores: equal scores keep the lower class id first.
        top_k = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        hits = (top_k == references[:, None]).any(axis=1)
        if not normalize:
            return {"top_k_accuracy": int(hits.sum())}
        if hits.size == 0:
            raise ValueError("Top-k accuracy of zero examples is undefined.")
        return {"top_k_accuracy": float(hits.mean())}
