"""Load any image-classification checkpoint (Hub id, local folder, timm export, built-in) with the run's labels.

Everything goes through ``AutoConfig`` / ``AutoModelForImageClassification`` / ``AutoImageProcessor``
(so ViT, ConvNeXt, ResNet, Swin, DeiT, BEiT, timm checkpoints via TimmWrapper, ... all work). A new
classification head is created when the checkpoint's label count differs from the dataset's.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import is_offline_mode
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
from transformers.utils import logging

from . import builtin

logger = logging.get_logger(__name__)


def load_model_and_processor(model_args, labels: list[str]) -> tuple[PreTrainedModel, object]:
    """``(model, image_processor)`` for ``model_args`` (:class:`~cdb_hf.arguments.ModelArguments`) and ``labels``.

    ``config.id2label``/``label2id`` come from ``labels`` (index = class id). Weights load from
    safetensors when the checkpoint has them (else ``torch.load(weights_only=True)``); remote code runs
    only with ``trust_remote_code=True``. Unknown ids and an unreachable Hub give one clear error.
    """
    labels = _check_labels(labels)
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required: a Hub model id, a local checkpoint directory, or "
                         f"{', '.join(builtin.list_builtin_sources('model'))}.")
    model_path = resolve_model_path(model_args.model_name_or_path, "model_name_or_path")
    config_path = resolve_model_path(model_args.config_name, "config_name") if model_args.config_name else model_path
    processor_path = (resolve_model_path(model_args.image_processor_name, "image_processor_name")
                      if model_args.image_processor_name else model_path)
    hub_kwargs = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision,
                  "token": model_args.token, "trust_remote_code": bool(model_args.trust_remote_code)}

    config = _call_hub("model", model_args.config_name or model_args.model_name_or_path,
                       AutoConfig.from_pretrained, config_path, **hub_kwargs)
    _check_has_image_classification_model(config, model_args.config_name or model_args.model_name_or_path)
    checkpoint_num_labels = config.num_labels
    _drop_duplicate_timm_num_classes(config)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: index for index, label in enumerate(labels)}
    config.finetuning_task = "image-classification"
    # Integer class ids with cross-entropy, whatever the checkpoint was trained for (some are multi-label).
    config.problem_type = "single_label_classification"

    # The processor first: it is cheap, and a missing one should fail before the weights are read.
    image_processor = _call_hub("image processor", model_args.image_processor_name or model_args.model_name_or_path,
                                AutoImageProcessor.from_pretrained, processor_path, **hub_kwargs)
    new_head = checkpoint_num_labels != len(labels)
    if new_head:
        logger.info(f"Checkpoint has {checkpoint_num_labels} labels, the dataset {len(labels)}: "
                    "a new classification head is initialized.")
    model = _call_hub("model", model_args.model_name_or_path, AutoModelForImageClassification.from_pretrained,
                      model_path, config=config, weights_only=True,
                      ignore_mismatched_sizes=new_head or bool(model_args.ignore_mismatched_sizes), **hub_kwargs)
    return model, image_processor


def resolve_model_path(name: str, flag: str = "model_name_or_path") -> str:
    """A built-in name becomes its exported folder; a missing local path fails now; a Hub id passes through."""
    if builtin.is_builtin(name):
        return str(builtin.builtin_model_dir(name))
    path = Path(os.path.expanduser(name))
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file() and flag != "image_processor_name":
            raise ValueError(f"--{flag} {name!r} is a directory without config.json; expected a folder written by "
                             "save_pretrained (or timm's save_for_hf).")
        return str(path)
    # Hub ids are 'name' or 'owner/name'; anything else that does not exist was meant as a local path.
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        raise FileNotFoundError(f"--{flag} {name!r}: no such directory (and it is not a Hub id of the form "
                                "'name' or 'owner/name').")
    return name


def _check_labels(labels) -> list[str]:
    labels = [str(label) for label in labels]
    if len(labels) < 2:
        # transformers treats num_labels == 1 as regression, which is not what a classifier run wants.
        raise ValueError(f"Need at least 2 class labels for image classification, got {labels}.")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"Class labels must be unique; duplicated: {duplicates}.")
    return labels


def _check_has_image_classification_model(config, name: str) -> None:
    auto_map = getattr(config, "auto_map", None) or {}
    if (config.model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
            and "AutoModelForImageClassification" not in auto_map):
        raise ValueError(f"{name!r} is a {config.model_type!r} checkpoint, which has no image-classification model "
                         "in transformers (AutoModelForImageClassification); use an image classification or vision "
                         "backbone checkpoint such as ViT, ConvNeXt, ResNet, Swin, DeiT, BEiT or a timm model.")


def _drop_duplicate_timm_num_classes(config) -> None:
    # transformers 5.24 passes num_classes to timm.create_model itself, and fails with "got multiple values
    # for keyword argument 'num_classes'" when config.model_args (written by timm's save_for_hf) repeats it.
    model_args = getattr(config, "model_args", None)
    if isinstance(model_args, dict) and "num_classes" in model_args:
        config.model_args = {key: value for key, value in model_args.items() if key != "num_classes"}


def _call_hub(kind: str, name: str, load, *args, **kwargs):
    """Run a ``from_pretrained`` and turn 'not found locally and not on the Hub' into one clear ValueError."""
    try:
        return load(*args, **kwargs)
    except OSError as error:
        if os.path.isdir(args[0]):
            hint = (" Pass --image_processor_name (a folder or Hub id with preprocessor_config.json)."
                    if kind == "image processor" else "")
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"Could not load the {kind} from local folder {args[0]!r}: {first_line}{hint}") from error
        raise ValueError(builtin.describe_hub_failure(kind, name, error, is_offline_mode())) from error
