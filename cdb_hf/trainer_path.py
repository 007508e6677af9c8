"""The transformers ``Trainer`` path of ``run_finetune.py``: data → model → CDB check → Trainer → outputs.

It reads like ``run_image_classification.py`` with two differences: ChannelDropBack arrives as a
callback, and the Trainer is :class:`ResumeSafeTrainer`, which loads checkpoints through the model's
own ``from_pretrained`` path (transformers 5.24's Trainer drops ViT weights on resume).
"""

from __future__ import annotations

import copy
import logging as std_logging
import os
import sys

import datasets
import transformers
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, logging

from . import cli
from .callback import ChannelDropBackCallback
from .cli import check_cdb_against_model  # re-exported: it used to live here
from .data import PerExampleSeeded, apply_transforms, collate_fn, data_seed, load_image_datasets
from .hub import push_outputs, save_outputs, write_model_card
from .metrics import build_compute_metrics
from .models import check_image_size, load_model_and_processor
from .perf import apply_memory_format

__all__ = ["ResumeSafeTrainer", "check_cdb_against_model", "load_checkpoint_weights", "train"]

logger = logging.get_logger(__name__)


def load_checkpoint_weights(model: PreTrainedModel, checkpoint_dir: str | os.PathLike) -> None:
    """Copy the weights of a ``save_pretrained`` checkpoint into ``model``, bitwise and completely.

    ``save_pretrained`` writes legacy key names for some architectures (ViT's ``attention.attention.query``)
    that only ``from_pretrained`` converts back; a plain ``load_state_dict`` misses them. Loading a twin
    through ``from_pretrained`` and copying its state dict with ``strict=True`` gets every tensor or fails.
    """
    twin = type(model).from_pretrained(checkpoint_dir, config=copy.deepcopy(model.config))
    model.load_state_dict(twin.state_dict(), strict=True)


class ResumeSafeTrainer(Trainer):
    """A ``Trainer`` whose resume (and ``load_best_model_at_end``) restores every weight.

    transformers 5.24's ``Trainer._load_from_checkpoint`` loads checkpoint files with a plain
    ``load_state_dict(strict=False)``, so keys saved under legacy names (ViT, transformers#43701)
    silently keep their current values. For ordinary (non-PEFT, non-FSDP/DeepSpeed) models this class
    loads through :func:`load_checkpoint_weights` instead; everything else is the stock Trainer.
    """

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = model if model is not None else self.model
        if self._loads_through_from_pretrained(target, resume_from_checkpoint):
            logger.info(f"Loading model weights from {resume_from_checkpoint} through from_pretrained.")
            load_checkpoint_weights(target, resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is not None and self._loads_through_from_pretrained(self.model, best):
            logger.info(f"Loading best model from {best} (score: {self.state.best_metric}).")
            load_checkpoint_weights(self.model, best)
        else:
            super()._load_best_model()

    def _loads_through_from_pretrained(self, model, checkpoint: str) -> bool:
        return (isinstance(model, PreTrainedModel) and not getattr(model, "peft_config", None)
                and not self.is_deepspeed_enabled and not self.is_fsdp_enabled
                and os.path.isfile(os.path.join(checkpoint, "config.json"))
                and (os.path.isfile(os.path.join(checkpoint, SAFE_WEIGHTS_NAME))
                     or os.path.isfile(os.path.join(checkpoint, SAFE_WEIGHTS_INDEX_NAME))))


def train(model_args, data_args, cdb_args, run_args, training_args: TrainingArguments) -> dict[str, float]:
    """Fine-tune with the transformers Trainer (+ ChannelDropBackCallback); return the final metrics.

    Every check that can fail on user input runs before the Trainer is built, so bad input never
    touches ``output_dir``.
    """
    cdb_config = cli.validate_args(model_args, data_args, cdb_args, run_args, training_args)
    _setup_logging(training_args)
    resume = cli.resolve_resume_checkpoint(training_args)
    # TrainingArguments turns do_eval on by itself whenever eval_strategy is set, so do_train/do_eval
    # cannot tell "evaluate only" from "train with periodic evaluation": like the accelerate loop,
    # this script always trains and then evaluates.
    do_train = do_eval = True

    check_image_size(model_args)  # reads only the config: fail before a large dataset loads
    set_seed(training_args.seed)  # a new classification head is drawn from the global RNG
    dataset = load_image_datasets(data_args, seed=training_args.seed, cache_dir=model_args.cache_dir,
                                  token=model_args.token)
    labels = dataset["train"].features["label"].names
    model, image_processor = load_model_and_processor(model_args, labels)
    if cdb_config is not None:
        check_cdb_against_model(model, cdb_config)
    apply_memory_format(model, run_args.channels_last)  # before the Trainer builds the optimizer
    dataset = apply_transforms(dataset, image_processor)

    trainer_args = copy.copy(training_args)
    trainer_args.remove_unused_columns = False  # the transforms read the image column lazily
    trainer_args.push_to_hub = False  # pushed once at the end, through hub.push_outputs
    # Augmentation draws from the global RNG at fetch time, which prefetching and a resume's skipped
    # batches shift; seeding each example by (seed, epoch, index) makes resumed runs crop identically.
    train_dataset = PerExampleSeeded(dataset["train"], seed=data_seed(training_args))
    trainer = ResumeSafeTrainer(
        model=model,
        args=trainer_args,
        train_dataset=train_dataset if do_train else None,
        eval_dataset=dataset["validation"] if do_eval else None,
        processing_class=image_processor,
        data_collator=collate_fn,
        compute_metrics=build_compute_metrics(len(labels)),
        callbacks=[_EpochSetter(train_dataset)]
        + ([ChannelDropBackCallback(cdb_config)] if cdb_config is not None else []),
    )

    # After every check and load, so bad input never costs the old run; rank 0 deletes, the others wait.
    cli.clear_output_dir_for_overwrite(training_args, run_args, is_main_process=trainer.is_world_process_zero())
    trainer.accelerator.wait_for_everyone()
    cli.mark_training_started()
    metrics: dict[str, float] = {}
    if do_train:
        result = trainer.train(resume_from_checkpoint=resume)
        metrics.update(result.metrics)
        trainer.log_metrics("train", result.metrics)
    if do_eval:
        eval_metrics = trainer.evaluate()
        metrics.update(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)

    if trainer.is_world_process_zero():
        save_outputs(training_args.output_dir, trainer.model, image_processor, cdb_config, metrics,
                     trainer_state=trainer.state)
        write_model_card(training_args.output_dir, model_args, data_args, cdb_config, metrics,
                         training_args=training_args, log_history=trainer.state.log_history, model=trainer.model)
        if training_args.push_to_hub:
            push_outputs(training_args.output_dir, training_args)
    return metrics


class _EpochSetter(TrainerCallback):
    """Tell the per-example seeding which epoch it is: with the Trainer's seedable sampler, accelerate
    forwards ``set_epoch`` to the sampler only, so without this every epoch would crop alike."""

    def __init__(self, dataset: PerExampleSeeded) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))



def _setup_logging(training_args: TrainingArguments) -> None:
    """The usual script logging of transformers' examples: one format, the Trainer's log level."""
    std_logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                            datefmt="%m/%d/%Y %H:%M:%S", handlers=[std_logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
