"""``--do_train false``: evaluate and/or predict with a saved model, without training and without touching it.

The run reads ``--model_name_or_path`` as it is (its classification head and its ``id2label``), evaluates on
the evaluation split that the same data flags would give a training run, and writes into ``--output_dir``
(a fresh folder, or an earlier evaluation with ``--overwrite_output_dir``; never a training run):

* ``eval_results.json`` — ``eval_loss``, ``eval_accuracy`` (and ``eval_top5_accuracy`` with >= 5 classes),
  ``eval_samples`` (strict JSON);
* ``eval_per_class.csv``, ``eval_confusion_matrix.csv`` / ``.png`` (:mod:`cdb_hf.evaluation`);
* ``predictions.csv`` with ``--do_predict``.

The dataset's classes are matched to the model's by name (a validation folder may hold fewer classes than
the model knows), else by position when the counts agree (a warning says so), else the run is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoConfig
from transformers.utils import logging

from . import sources, transforms
from .errors import usage_errors
from .evaluation import FinalEvaluation
from .inference import evaluate, predict
from .models import _call_hub, load_model_and_processor, resolve_model_path
from .plan import RunPlan
from .run import RunSession, load_predict_set, write_evaluation_files
from .run_dir import write_results_json

__all__ = ["EVAL_RUN_KIND", "evaluate_only", "match_labels", "model_labels"]

logger = logging.get_logger(__name__)

#: The run marker's ``kind`` of an evaluation-only run (pre-flight lets only such a run be replaced by one).
EVAL_RUN_KIND = "eval"


def model_labels(model_args) -> list[str]:
    """The checkpoint's class names in id order, from its config's ``id2label``."""
    name = model_args.config_name or model_args.model_name_or_path
    path = resolve_model_path(name, "config_name" if model_args.config_name else "model_name_or_path")
    config = _call_hub("model", name, AutoConfig.from_pretrained, path, cache_dir=model_args.cache_dir,
                       revision=model_args.model_revision, token=model_args.token,
                       trust_remote_code=bool(model_args.trust_remote_code))
    id2label = {int(key): str(value) for key, value in (config.id2label or {}).items()}
    if sorted(id2label) != list(range(config.num_labels)) or config.num_labels < 2:
        raise ValueError(f"--model_name_or_path {model_args.model_name_or_path!r} is not an image classifier with "
                         f"class names (its config has num_labels={config.num_labels}, id2label={config.id2label})")
    return [id2label[index] for index in range(config.num_labels)]


def match_labels(dataset_labels: list[str], labels: list[str]) -> np.ndarray:
    """``remap[dataset class id] = model class id``: by name when every dataset class is a model class, else by
    position when the counts agree (with a warning), else ValueError naming both lists."""
    if set(dataset_labels) <= set(labels):
        return np.array([labels.index(name) for name in dataset_labels], dtype=np.int64)
    if len(dataset_labels) == len(labels):
        logger.warning(f"the dataset's classes {dataset_labels} are not the model's {labels}: matched by position "
                       "(dataset class i = model class i)")
        return np.arange(len(labels), dtype=np.int64)
    unknown = sorted(set(dataset_labels) - set(labels))
    raise ValueError(f"the evaluation data's classes do not match the model's: {unknown} are not among the model's "
                     f"{len(labels)} classes {labels[:20]}{' ...' if len(labels) > 20 else ''}, and the counts differ "
                     f"({len(dataset_labels)} vs {len(labels)}), so they cannot be matched by position either")


class _RemappedLabels:
    """``collate_fn`` with the dataset's class ids translated into the model's."""

    def __init__(self, remap: np.ndarray) -> None:
        self.remap = torch.as_tensor(remap)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = transforms.collate_fn(examples)
        batch["labels"] = self.remap[batch["labels"]]
        return batch


def evaluate_only(plan: RunPlan) -> dict[str, float]:
    """Evaluate (and with ``--do_predict`` predict) ``--model_name_or_path``; return the evaluation metrics.

    Everything is loaded and checked before ``--output_dir`` is created; the model is never saved again.
    """
    args = plan.training
    accelerator = Accelerator(cpu=args.use_cpu, mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else None)
    has_eval_data = bool(plan.data.dataset_name or plan.data.train_dir or plan.data.validation_dir)
    with RunSession(plan, kind=EVAL_RUN_KIND) as session:
        with usage_errors():
            labels = model_labels(plan.model)
            model, image_processor = load_model_and_processor(plan.model, labels)
            eval_loader = None
            if has_eval_data:
                with accelerator.main_process_first():
                    split = sources.load_eval_split(plan.data, seed=args.seed, cache_dir=plan.model.cache_dir,
                                                        token=plan.model.token)
                remap = match_labels(split.features["label"].names, labels)
                eval_loader = DataLoader(transforms.apply_eval_transform(split, image_processor),
                                         collate_fn=_RemappedLabels(remap),
                                         batch_size=args.per_device_eval_batch_size,
                                         num_workers=args.dataloader_num_workers)
        predict_set = load_predict_set(plan, image_processor) if args.do_predict else None
        model = accelerator.prepare(model)
        session.open_run_dir()
        session.ready()

        metrics: dict[str, float] = {}
        final = FinalEvaluation()
        if eval_loader is not None:
            metrics = evaluate(model, accelerator.prepare(eval_loader), accelerator, len(labels), final=final)
            metrics["eval_samples"] = len(split)
            logger.info("eval: " + ", ".join(f"{key}={value:.4g}" for key, value in metrics.items()))
        if predict_set is not None:
            final.predict_logits = predict(model, predict_set, accelerator, args)
        if accelerator.is_main_process:
            output_dir = Path(args.output_dir)
            if metrics:
                write_results_json(output_dir / "eval_results.json", metrics)
            write_evaluation_files(output_dir, labels, final, predict_set)
            session.complete()
        accelerator.wait_for_everyone()
    return metrics
