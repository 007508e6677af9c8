"""Run a validated plan on the face it names: the one dispatch, for the CLI and the A/B runner.

Three faces, one floor: the Trainer path (:mod:`cdb_hf.trainer_path`), the accelerate loop
(:mod:`cdb_hf.accelerate_loop`) and evaluation/prediction of a saved model (:mod:`cdb_hf.eval_only`).
"""

from __future__ import annotations

from .plan import RunPlan

__all__ = ["train"]


def train(plan: RunPlan) -> dict[str, float]:
    """Fine-tune with ``plan.run.trainer`` (``hf``: the transformers Trainer; ``accelerate``: the loop), or, for
    a ``--do_train false`` plan, evaluate/predict the saved model (:mod:`cdb_hf.eval_only`)."""
    if plan.kind == "eval":
        from .eval_only import evaluate_only

        return evaluate_only(plan)
    if plan.run.trainer == "accelerate":
        from .accelerate_loop import train as train_face
    else:
        from .trainer_path import train as train_face
    return train_face(plan)
