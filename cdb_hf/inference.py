"""Evaluation and prediction, shared by the three faces: the accelerate loop, ``--do_train false``
(:mod:`cdb_hf.eval_only`) and, through :class:`FinalEvaluation`, the Trainer path.

:func:`evaluate` gives ``eval_loss`` (the mean cross-entropy per image) and the accuracies over a whole
validation set, each example counted once on any number of processes; :func:`predict` gives the logits of
a predict set. Both run on a model and dataloaders that ``accelerator`` prepared.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.data_loader import IterableDatasetShard
from torch.utils.data import DataLoader
from transformers import TrainingArguments

from . import metrics as cdb_metrics
from .evaluation import FinalEvaluation
from .streaming import StreamEvalImages

__all__ = ["evaluate", "predict"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, eval_dataloader: DataLoader, accelerator: Accelerator,
             num_labels: int, final: FinalEvaluation | None = None) -> dict[str, float]:
    """``eval_loss`` (the mean cross-entropy per image), ``eval_accuracy`` (and ``eval_top5_accuracy``) over the
    whole validation set.

    ``gather_for_metrics`` collects every process's predictions and drops the samples duplicated to even
    out the last batch, so each example counts exactly once, whatever the number of processes. With
    ``final``, the predicted and true class ids are kept in it (for the per-class results).
    """
    predicted, true = [], []
    was_training = model.training
    model.eval()
    metrics = cdb_metrics.load_metrics(num_labels)
    # Summed on the device and read once at the end: a host sync per batch would stall the accelerator.
    sum_dtype = torch.float32 if accelerator.device.type == "mps" else torch.float64  # MPS has no float64
    loss_sum, count = torch.zeros((), dtype=sum_dtype, device=accelerator.device), 0
    # A stream's last batch is evened out across processes with examples from its start; accelerate cannot drop
    # them (no length), but the stream counts what it read: keep that many (a Python int, no sync).
    shard = getattr(eval_dataloader, "dataset", None)
    stream = shard.dataset if isinstance(shard, IterableDatasetShard) and isinstance(shard.dataset, StreamEvalImages) \
        else None
    for batch in eval_dataloader:
        logits = model(pixel_values=batch["pixel_values"]).logits
        # Per image, not the batch mean repeated: a last batch evened out with duplicates would otherwise
        # leak the duplicates' loss into the images that are kept.
        losses = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")
        logits, labels, losses = accelerator.gather_for_metrics((logits, batch["labels"], losses))
        if stream is not None and stream.examples_read - count < len(labels):
            keep = max(stream.examples_read - count, 0)
            logits, labels, losses = logits[:keep], labels[:keep], losses[:keep]
        cdb_metrics.add_batch(metrics, logits, labels)
        if final is not None:
            predicted.append(logits.argmax(-1).cpu())
            true.append(labels.cpu())
        loss_sum, count = loss_sum + losses.sum().to(sum_dtype), count + losses.numel()
    model.train(was_training)
    results = {"eval_loss": loss_sum.item() / count if count else float("nan")}
    results.update({f"eval_{name}": value for name, value in cdb_metrics.compute(metrics).items()})
    if final is not None:
        final.predictions = torch.cat(predicted).numpy() if predicted else np.zeros(0, dtype=np.int64)
        final.references = torch.cat(true).numpy() if true else np.zeros(0, dtype=np.int64)
    return results


@torch.no_grad()
def predict(model: torch.nn.Module, predict_set: Any, accelerator: Accelerator,
            args: TrainingArguments) -> np.ndarray:
    """The logits (float32, on the host) of every image of ``predict_set`` (a :class:`~cdb_hf.run.PredictSet`:
    its ``dataset`` and ``collate_fn``), in order, each once."""
    dataloader = accelerator.prepare(DataLoader(predict_set.dataset, collate_fn=predict_set.collate_fn,
                                                batch_size=args.per_device_eval_batch_size,
                                                num_workers=args.dataloader_num_workers))
    was_training = model.training
    model.eval()
    chunks = []
    for batch in dataloader:
        logits = accelerator.gather_for_metrics(model(pixel_values=batch["pixel_values"]).logits)
        chunks.append(logits.detach().float().cpu())
    model.train(was_training)
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), dtype=np.float32)
