"""Run a validated plan on the training face it names: the one dispatch, for the CLI and the A/B runner."""

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
