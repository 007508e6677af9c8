"""The argument dataclasses shared by the CLI, the Trainer path, the accelerate loop and the recipes.

``HfArgumentParser`` fills them from the command line, a YAML/JSON recipe, or both. CDB's own flags
are generated from :class:`~cdb_hf.core.ChannelDropBackConfig` (prefixed ``cdb_``), so the core stays
the single source of truth for their names, defaults, types and help.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from .core import ChannelDropBackConfig

CDB_PREFIX = "cdb_"


@dataclass
class ModelArguments:
    """Which checkpoint to fine-tune (names follow transformers' run_image_classification.py)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub model id (e.g. google/vit-base-patch16-224-in21k), a local directory written "
                          "by save_pretrained, or a built-in source such as builtin:efficientnet_lite0."},
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor name or path, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded checkpoints are cached."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the checkpoint."})
    token: str | None = field(
        default=None, metadata={"help": "Hub token (never logged); defaults to the cached login."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow code from the Hub repository to run. Off by default."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Accepted for compatibility: a new classification head is created automatically "
                          "when the label count differs from the checkpoint's."},
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Fine-tune at this resolution (px, square) instead of the checkpoint's: the image "
                          "processor is set to it, and ViT/DeiT position embeddings are resized (bicubic) so the "
                          "saved model is a plain model at this size (e.g. 384 for the paper's ViT 384 rows)."},
    )
    # LoRA (peft): model flags, so that the CLI, the recipes and both training paths read one dataclass.
    lora_r: int = field(
        default=0,
        metadata={"help": "LoRA rank: > 0 fine-tunes low-rank adapters (peft, `pip install cdb_hf[peft]`) on a "
                          "frozen base model, with the classification head trained fully; 0 = off (full "
                          "fine-tuning). output_dir then holds the adapter (adapter_config.json, "
                          "adapter_model.safetensors)."},
    )
    lora_alpha: int | None = field(
        default=None,
        metadata={"help": "LoRA scaling: the adapter's update is multiplied by lora_alpha / lora_r. Default: "
                          "lora_r (scale 1)."},
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the input of each LoRA branch, in [0, 1). The default 0 keeps the forward "
                          "pass deterministic, as ChannelDropBack intends."},
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Layers that get LoRA adapters, by name or dotted name suffix (e.g. q_proj v_proj, "
                          "attention.o_proj, blocks.0.attn.qkv). Default, by the layer names the model has: "
                          "attention q_proj/v_proj (ViT, DeiT, ...; query/value in older ones), qkv (timm ViT), "
                          "pwconv1/pwconv2 (ConvNeXt), conv_pw/conv_pwl (timm EfficientNet/MobileNet), mlp.fc1/"
                          "mlp.fc2 (timm ConvNeXt), convolution (ResNet), conv2 (timm ResNet)."},
    )
    lora_merge: bool = field(
        default=False,
        metadata={"help": "With --lora_r: also write the merged plain model (base + adapter, loadable with "
                          "AutoModelForImageClassification and no peft) to output_dir/merged."},
    )

    def __post_init__(self) -> None:
        # Fails at parse time, before any data is read; the checkpoint-dependent checks (a multiple of
        # the patch size, a supported architecture) run when the config is loaded, before the weights.
        size = self.image_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"--image_size {size!r} is not valid: give a positive number of pixels (e.g. 384), "
                             "or leave it unset for the checkpoint's own resolution.")


@dataclass
class DataArguments:
    """Which images to train and evaluate on."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id, a local dataset folder (save_to_disk or loadable files), or a "
                          "built-in source such as builtin:mnist5k or builtin:digits."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_dir: str | None = field(default=None, metadata={"help": "An image folder (one sub-folder per class)."})
    validation_dir: str | None = field(default=None, metadata={"help": "A validation image folder."})
    eval_split_name: str | None = field(
        default=None,
        metadata={"help": "The split to evaluate on, e.g. 'test' for datasets with train/test only (CIFAR, SVHN). "
                          "Unset: a split named validation/valid/val, else one carved from train."},
    )
    train_val_split: float = field(
        default=0.15, metadata={"help": "Validation fraction carved (seeded) from train when there is no "
                                        "validation split and no --eval_split_name."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate the training set (seeded shuffle first) for quick runs."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})
    train_augmentation: Literal["crop_flip", "crop", "none"] = field(
        default="crop_flip",
        metadata={"help": "Training augmentation. 'crop_flip': RandomResizedCrop to the checkpoint's input size and "
                          "a horizontal flip (transformers' image-classification example). 'crop': no flip (for "
                          "digits, text, anything a mirror changes the meaning of). 'none': the evaluation "
                          "preprocessing, so the model can fit its training set (e.g. to study a regularizer)."},
    )
    corrupt_images: Literal["error", "skip"] = field(
        default="error",
        metadata={"help": "Images that do not decode (truncated, damaged, not images), found by decoding every image "
                          "once before training (cached in $CDB_HF_CACHE/image_checks-v1.sqlite). 'error': stop "
                          "with one line naming them (exit 2). 'skip': train and evaluate without them, with a "
                          "warning naming each, and train_skipped_images/eval_skipped_images in the results."},
    )
    train_image_cache_mb: int = field(
        default=1024,
        metadata={"help": "Decode the training images once into memory (RGB, 8 bits) when they fit in this many MiB, "
                          "instead of decoding each image at every fetch; 0 turns it off. A training set that does "
                          "not fit is decoded at each fetch as before. Results are the same either way."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Read the data as it is used (datasets' IterableDataset: Hub ids, local parquet/image "
                          "folders/WebDataset tar shards) instead of loading and checking it all first: start-up "
                          "does not grow with the dataset. Needs --max_steps and a validation split; each rank "
                          "reads its own shard; corrupt images are met lazily under --corrupt_images."},
    )
    shuffle_buffer_size: int = field(
        default=10_000,
        metadata={"help": "With --streaming: examples held in the seeded shuffle buffer (larger mixes better and "
                          "holds more encoded images in memory)."},
    )
    class_names: list[str] | None = field(
        default=None,
        metadata={"help": "With --streaming and integer labels (e.g. WebDataset's .cls): the class names in label-id "
                          "order (a stream's labels cannot be collected up front). Unset: the label column must be a "
                          "ClassLabel."},
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": "Image column; detected automatically when omitted."})
    label_column_name: str | None = field(
        default=None, metadata={"help": "Label column; detected automatically when omitted."})
    predict_dir: str | None = field(
        default=None,
        metadata={"help": "With --do_predict: an image folder (flat, or with sub-folders) to predict; "
                          "predictions.csv names each image by its path relative to this folder."},
    )
    predict_split_name: str | None = field(
        default=None,
        metadata={"help": "With --do_predict: a split of --dataset_name to predict (e.g. 'test'); predictions.csv "
                          "names each example by its index in the split."},
    )


@dataclass
class RunArguments:
    """cdb_hf's own switches that are not CDB hyperparameters."""

    trainer: Literal["hf", "accelerate"] = field(
        default="hf",
        metadata={"help": "'hf': transformers Trainer + ChannelDropBackCallback; 'accelerate': cdb_hf's "
                          "accelerate loop. Same arguments, same results."},
    )
    ab_seeds: int = field(
        default=0,
        metadata={"help": "If > 0, run an A/B comparison: baseline vs CDB for this many paired seeds."},
    )
    ab_extra_arm: str | None = field(
        default=None,
        metadata={"help": "With --ab_seeds: a third arm, the baseline with these TrainingArguments values changed "
                          "(comma-separated name=value pairs, e.g. 'weight_decay=0.05' or "
                          "'label_smoothing_factor=0.1'), trained on the same seeds, so that CDB can be compared "
                          "with a standard regularizer at the same budget."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the earlier cdb_hf run in output_dir (a folder with cdb_hf_run.json; any other "
                          "non-empty folder is refused). The earlier run is set aside first, deleted only once "
                          "the new run completes, and restored if it fails (transformers 5 dropped this "
                          "TrainingArguments flag)."},
    )
    resume_allow_cdb_changes: bool = field(
        default=False,
        metadata={"help": "Resume from a checkpoint saved with other ChannelDropBack settings (or with CDB off/on): "
                          "refused by default, because the resumed run would not continue the same run; with "
                          "this flag it goes ahead with a warning naming every difference."},
    )
    channels_last: bool = field(
        default=True,
        metadata={"help": "Train with 2-D convolution weights in the channels_last (NHWC) memory format, the "
                          "fast layout of oneDNN (CPU) and cuDNN with AMP: about 2x faster steps for EfficientNet/"
                          "MobileNet on CPU, no effect on Linear layers (ViT). The saved model is a plain "
                          "checkpoint either way. false = PyTorch's default layout."},
    )
    lr_schedule: Literal["trainer", "multistep"] = field(
        default="trainer",
        metadata={"help": "'trainer': TrainingArguments' --lr_scheduler_type (with its warmup). 'multistep': the "
                          "official scripts' MultiStepLR, stepped per epoch: the rate is multiplied by --lr_gamma "
                          "from each --lr_milestones epoch on; --lr_scheduler_type must then stay unset and there "
                          "is no warmup. Both training paths build it alike."},
    )
    lr_milestones: list[int] | None = field(
        default=None,
        metadata={"help": "Epochs (0-based) from which --lr_schedule multistep lowers the rate, e.g. 26 51 72. "
                          "Unset: the official round(0.3E), round(0.6E), round(0.85E) for a run of E epochs."},
    )
    lr_gamma: float = field(
        default=0.1, metadata={"help": "Factor --lr_schedule multistep applies at each milestone (official: 0.1)."})
    weight_decay_all: bool = field(
        default=False,
        metadata={"help": "Apply --weight_decay to every parameter, biases and norm weights included, as the "
                          "official optimizer does. false: the Trainer's rule (biases and norms not decayed). "
                          "Both training paths honour it."},
    )

    def __post_init__(self) -> None:
        # A recipe value bypasses argparse's bool conversion: refuse "yes" or 1 here, before any work.
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last={self.channels_last!r} is not valid; it must be true or false")


def _cdb_arguments_class() -> type:
    """``CDBArguments``: ChannelDropBackConfig's fields as ``cdb_*`` flags, plus the ``cdb`` switch."""
    specs = [("cdb", bool, field(default=True, metadata={"help": "Apply ChannelDropBack (false = baseline)."}))]
    for f in dataclasses.fields(ChannelDropBackConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        specs.append((CDB_PREFIX + f.name, f.type, field(default=default, metadata=dict(f.metadata))))

    def to_config(self, **overrides) -> ChannelDropBackConfig | None:
        """The core config these flags describe, or None when CDB is off."""
        if not self.cdb:
            return None
        values = {f.name: getattr(self, CDB_PREFIX + f.name) for f in dataclasses.fields(ChannelDropBackConfig)}
        values.update(overrides)
        return ChannelDropBackConfig(**values)

    cls = dataclasses.make_dataclass("CDBArguments", specs, namespace={"to_config": to_config})
    cls.__module__ = __name__
    cls.__doc__ = "ChannelDropBack flags: every ChannelDropBackConfig field, prefixed 'cdb_'."
    return cls


CDBArguments = _cdb_arguments_class()
