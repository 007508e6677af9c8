"""Load any image-classification checkpoint (Hub id, local folder, timm export, built-in) with the run's labels.

Everything goes through ``AutoConfig`` / ``AutoModelForImageClassification`` / ``AutoImageProcessor``
(so ViT, ConvNeXt, ResNet, Swin, DeiT, BEiT, timm checkpoints via TimmWrapper, ... all work). A new
classification head is created when the checkpoint's label count differs from the dataset's.
``image_size`` fine-tunes at another resolution: the image processor is set to it, and models whose
learned position embeddings are tied to the checkpoint's patch grid get them resized, so that the saved
model is a plain checkpoint at the new resolution.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from huggingface_hub import is_offline_mode
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
from transformers.utils import logging

from . import builtin

logger = logging.get_logger(__name__)

# Learned absolute position embeddings sized by the checkpoint's patch grid, and a forward pass that
# refuses any other input size: --image_size resizes the embeddings.
POSITION_EMBEDDING_MODEL_TYPES = frozenset({"vit", "deit", "vit_msn"})
# Run at any input size as loaded (convolutions, windowed attention, or position embeddings and
# biases interpolated at every forward pass): --image_size changes only the image processor.
ANY_SIZE_MODEL_TYPES = frozenset({"beit", "bit", "convnext", "convnextv2", "data2vec-vision", "dinov2",
                                  "efficientnet", "focalnet", "mobilenet_v1", "mobilenet_v2", "regnet",
                                  "resnet", "swin", "swinv2"})
# Non-overlapping patches: an image size that is not a multiple of the patch size would lose its border.
_PATCH_GRID_MODEL_TYPES = POSITION_EMBEDDING_MODEL_TYPES | {"beit", "data2vec-vision", "dinov2"}


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

    image_size = getattr(model_args, "image_size", None)
    if image_size is not None:
        _check_image_size(config, image_size)
        _check_lora_image_size(config, model_args)
    # The processor first: it is cheap, and a missing one should fail before the weights are read.
    image_processor = _call_hub("image processor", model_args.image_processor_name or model_args.model_name_or_path,
                                AutoImageProcessor.from_pretrained, processor_path, **hub_kwargs)
    if image_size is not None:
        image_processor = processor_at_size(image_processor, image_size)
    new_head = checkpoint_num_labels != len(labels)
    if new_head:
        logger.info(f"Checkpoint has {checkpoint_num_labels} labels, the dataset {len(labels)}: "
                    "a new classification head is initialized.")
    model = _call_hub("model", model_args.model_name_or_path, AutoModelForImageClassification.from_pretrained,
                      model_path, config=config, weights_only=True,
                      ignore_mismatched_sizes=new_head or bool(model_args.ignore_mismatched_sizes), **hub_kwargs)
    if image_size is not None:
        resize_model_input(model, image_size)
    if lora_enabled(model_args):
        model = apply_lora(model, model_args)
    return model, image_processor


# ------------------------------------------------------------------------------------------------ LoRA
#: Default LoRA targets, tried in order: the first group whose every name matches some layer, and all of
#: whose matches peft can adapt, is used. Names, not model types, so that timm models and renamed
#: transformers layers (ViT's query became q_proj in transformers 5) are covered alike.
LORA_DEFAULT_TARGETS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),        # ViT, DeiT, ... in transformers 5
    ("query", "value"),          # Swin, BEiT, older ViT
    ("qkv",),                    # timm ViT, Swin, EVA
    ("pwconv1", "pwconv2"),      # transformers ConvNeXt / ConvNeXt V2 (Linear pointwise layers)
    ("conv_pw", "conv_pwl"),     # timm EfficientNet / MobileNet (1x1 convolutions)
    ("mlp.fc1", "mlp.fc2"),      # timm ConvNeXt
    ("convolution",),            # transformers ResNet, RegNet
    ("conv2",),                  # timm ResNet (the 3x3 convolution of each block)
)
#: Heads trained fully (peft modules_to_save) when they are top-level children of the model.
_HEAD_NAMES = ("classifier", "distillation_classifier")


def lora_enabled(model_args) -> bool:
    """Whether ``model_args`` asks for LoRA fine-tuning (``lora_r > 0``)."""
    return bool(getattr(model_args, "lora_r", 0))


def apply_lora(model: PreTrainedModel, model_args) -> torch.nn.Module:
    """Wrap ``model`` in peft LoRA adapters: the base frozen, the adapters and the classification head trained.

    The targets are ``model_args.lora_target_modules`` or the architecture's default
    (:data:`LORA_DEFAULT_TARGETS`); the head (``classifier``, or a timm model's ``get_classifier()``) is a
    peft ``modules_to_save`` module, since a new head must be trained in full. Raises ValueError naming
    the layers the model has when the targets match nothing LoRA can adapt.
    """
    from peft import LoraConfig, get_peft_model

    heads = classifier_module_names(model)
    targets = resolve_lora_targets(model, model_args.lora_target_modules, exclude=heads)
    rank = int(model_args.lora_r)
    alpha = model_args.lora_alpha if model_args.lora_alpha is not None else rank
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=float(model_args.lora_dropout),
                        target_modules=targets, modules_to_save=heads)
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info(f"LoRA r={rank}, alpha={alpha} on {targets}, heads trained fully: {heads}; {trainable:,} of "
                f"{total:,} parameters trainable ({100 * trainable / max(total, 1):.2f}%).")
    return peft_model


def classifier_module_names(model: torch.nn.Module) -> list[str]:
    """The classification head(s) of an image classifier, by module name (trained fully under LoRA)."""
    names = [name for name, _ in model.named_children() if name in _HEAD_NAMES]
    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None and hasattr(timm_model, "get_classifier"):
        head = timm_model.get_classifier()
        names += [f"timm_model.{name}" for name, module in timm_model.named_modules() if module is head and name]
    if not names:
        raise ValueError(f"--lora_r: cannot find the classification head of {type(model).__name__} (a top-level "
                         f"module named {' or '.join(_HEAD_NAMES)}, or a timm model's get_classifier()), which "
                         "LoRA fine-tuning trains in full; fine-tune it without --lora_r")
    return names


def resolve_lora_targets(model: torch.nn.Module, requested: list[str] | None, *,
                         exclude: Iterable[str] = ()) -> list[str]:
    """The LoRA target names for ``model``: ``requested`` (checked) or the first default group that fits.

    A name matches a module whose dotted name equals it or ends with ``.<name>`` (peft's rule). Modules
    inside ``exclude`` (the heads) never count. Raises ValueError naming the flag and the layer names the
    model has when a requested name matches nothing, or matches a layer LoRA cannot adapt.
    """
    excluded = tuple(exclude)
    modules = {name: module for name, module in model.named_modules()
               if name and not any(name == head or name.startswith(head + ".") for head in excluded)}

    def matches(target: str) -> list[str]:
        return [name for name in modules if name == target or name.endswith("." + target)]

    if requested:
        requested = [str(target) for target in requested]
        for target in requested:
            found = matches(target)
            unsupported = [name for name in found if not _lora_can_adapt(modules[name])]
            if not found:
                raise ValueError(f"--lora_target_modules {target!r} matches no layer of this "
                                 f"{type(model).__name__}; {_layer_preview(modules)}")
            if unsupported:
                raise ValueError(f"--lora_target_modules {target!r} matches layers LoRA cannot adapt (not a Linear, "
                                 f"or a convolution with groups > 1): {_names_preview(unsupported)}; "
                                 f"{_layer_preview(modules)}")
        return requested
    for group in LORA_DEFAULT_TARGETS:
        found = [matches(target) for target in group]
        if all(found) and all(_lora_can_adapt(modules[name]) for names in found for name in names):
            return list(group)
    raise ValueError(f"--lora_target_modules: no default LoRA targets for {type(model).__name__}; pass the layers "
                     f"to adapt. {_layer_preview(modules)}")


def _lora_can_adapt(module: torch.nn.Module) -> bool:
    # peft's LoRA layers for these types; a grouped (depthwise) convolution needs a rank divisible by its
    # groups and cannot be merged, so it is never a sensible target.
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return module.groups == 1
    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding))


def _layer_preview(modules: dict[str, torch.nn.Module], limit: int = 12) -> str:
    """The adaptable layer names of a model, shortened to their last part, with counts."""
    counts: dict[str, int] = {}
    for name, module in modules.items():
        if _lora_can_adapt(module):
            short = name.rsplit(".", 1)[-1]
            counts[short] = counts.get(short, 0) + 1
    shown = [f"{name} (x{count})" if count > 1 else name for name, count in list(counts.items())[:limit]]
    more = f", ... ({len(counts) - limit} more)" if len(counts) > limit else ""
    return f"its Linear/convolution layers are named {', '.join(shown) or 'nothing'}{more}"


def _names_preview(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _check_lora_image_size(config, model_args) -> None:
    """Resized position embeddings belong to the frozen base, so an adapter saved without them would not
    reproduce the fine-tuned model: refuse the combination before the weights are read."""
    if lora_enabled(model_args) and (config.model_type in POSITION_EMBEDDING_MODEL_TYPES
                                     or config.model_type == "timm_wrapper"):
        raise ValueError(f"--image_size {model_args.image_size} with --lora_r is not supported for "
                         f"{config.model_type!r} checkpoints: the resized position embeddings would not be part of "
                         "the saved adapter; fine-tune at the checkpoint's resolution, or without --lora_r")


def check_image_size(model_args) -> None:
    """Refuse an ``image_size`` the checkpoint cannot be fine-tuned at, reading only its config.

    :func:`load_model_and_processor` runs the same check; calling this first lets a training path fail
    before it loads a large dataset. Does nothing when ``image_size`` is unset.
    """
    if getattr(model_args, "image_size", None) is None or not model_args.model_name_or_path:
        return
    name = model_args.config_name or model_args.model_name_or_path
    config = _call_hub("model", name, AutoConfig.from_pretrained, resolve_model_path(name, "model_name_or_path"),
                       cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
                       trust_remote_code=bool(model_args.trust_remote_code))
    _check_image_size(config, model_args.image_size)
    _check_lora_image_size(config, model_args)


def check_lora_targets(model_args) -> None:
    """Refuse LoRA targets the checkpoint has no layer for, reading only its config.

    The model is built on the meta device (no memory, no weights), so a misspelt
    ``--lora_target_modules`` fails before a large dataset loads; :func:`apply_lora` runs the same check
    on the loaded model. Does nothing without ``lora_r``.
    """
    if not lora_enabled(model_args) or not model_args.model_name_or_path:
        return
    name = model_args.config_name or model_args.model_name_or_path
    config = _call_hub("model", name, AutoConfig.from_pretrained, resolve_model_path(name, "model_name_or_path"),
                       cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
                       trust_remote_code=bool(model_args.trust_remote_code))
    _check_has_image_classification_model(config, name)
    _drop_duplicate_timm_num_classes(config)
    with torch.device("meta"):
        model = AutoModelForImageClassification.from_config(config,
                                                            trust_remote_code=bool(model_args.trust_remote_code))
    resolve_lora_targets(model, model_args.lora_target_modules, exclude=classifier_module_names(model))


def processor_at_size(image_processor, image_size: int):
    """A copy of ``image_processor`` whose output is ``image_size`` x ``image_size`` px.

    A center crop stays a center crop with the same resize-to-crop ratio (DeiT: 256 -> 224 becomes
    439 -> 384 at 384 px); ConvNeXt's ``shortest_edge`` + ``crop_pct`` and timm's ``input_size`` +
    ``crop_pct`` keep their crop fraction. Saving the copy saves the new size.
    """
    data_config = getattr(image_processor, "data_config", None)
    if isinstance(data_config, dict):  # TimmWrapperImageProcessor: timm's data config is the whole story
        channels = data_config.get("input_size", (3,))[0]
        return type(image_processor)(pretrained_cfg={**data_config, "input_size": (channels, image_size, image_size)},
                                     architecture=getattr(image_processor, "architecture", None))

    size, overrides = getattr(image_processor, "size", None), {}
    height, width, shortest_edge = _size_field(size, "height"), _size_field(size, "width"), \
        _size_field(size, "shortest_edge")
    crop_size = getattr(image_processor, "crop_size", None)
    crop_height, crop_width = _size_field(crop_size, "height"), _size_field(crop_size, "width")
    if getattr(image_processor, "do_center_crop", False) and crop_height and crop_width:
        overrides["crop_size"] = {"height": image_size, "width": image_size}
        if height and width:
            overrides["size"] = {"height": round(height * image_size / crop_height),
                                 "width": round(width * image_size / crop_width)}
        elif shortest_edge:
            overrides["size"] = {"shortest_edge": round(shortest_edge * image_size / min(crop_height, crop_width))}
    elif height and width:
        overrides["size"] = {"height": image_size, "width": image_size}
    elif shortest_edge:
        overrides["size"] = {"shortest_edge": image_size}
    if "size" not in overrides:
        raise ValueError(f"--image_size {image_size}: cannot set the size of {type(image_processor).__name__} (size "
                         f"{_plain_size(size)}, crop_size {_plain_size(crop_size)}); supported are processors sized by "
                         "height/width or shortest_edge, with or without a center crop.")
    return type(image_processor).from_dict({**image_processor.to_dict(), **overrides})


def resize_model_input(model: PreTrainedModel, image_size: int) -> None:
    """Make ``model`` a plain model for ``image_size`` px input, in place (its config included).

    Learned absolute position embeddings are resized by bicubic interpolation of their patch grid
    (class and distillation tokens kept as they are), exactly as the model's own
    ``interpolate_pos_encoding`` would at run time, so the saved model needs no interpolation flag to
    load or run. timm models with a resizable input (ViTs and others with ``set_input_size``) are
    resized by timm itself. Models that run at any size are left as they are.
    """
    model_type = model.config.model_type
    if model_type == "timm_wrapper":
        _resize_timm_model(model, image_size)
    elif model_type in POSITION_EMBEDDING_MODEL_TYPES:
        _resize_position_embeddings(model, image_size)


def _check_image_size(config, image_size: int) -> None:
    """Refuse, before the weights are read, an image size this checkpoint cannot be fine-tuned at."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"--image_size {image_size!r} is not valid: give a positive number of pixels (e.g. 384), "
                         "or leave it unset for the checkpoint's own resolution.")
    model_type = config.model_type
    if model_type in _PATCH_GRID_MODEL_TYPES:
        patch = _pair(config.patch_size)
        if image_size % patch[0] or image_size % patch[1]:
            raise ValueError(f"--image_size {image_size} is not a multiple of this {model_type} checkpoint's patch "
                             f"size {config.patch_size}; valid sizes are multiples of it (e.g. "
                             f"{max(1, round(image_size / patch[0])) * patch[0]}).")
    if model_type == "swin" and getattr(config, "use_absolute_embeddings", False):
        raise ValueError(f"--image_size {image_size} is not supported for Swin checkpoints with absolute position "
                         "embeddings (use_absolute_embeddings=true); leave --image_size unset.")
    known = POSITION_EMBEDDING_MODEL_TYPES | ANY_SIZE_MODEL_TYPES | {"timm_wrapper"}
    size_aware = hasattr(config, "image_size") or hasattr(config, "patch_size")
    if model_type not in known and size_aware:
        raise ValueError(f"--image_size {image_size} is not supported for {model_type!r} checkpoints: it is not known "
                         f"whether they run at another resolution. Supported: {', '.join(sorted(known))} (and "
                         "checkpoints whose config has no image_size); or leave --image_size unset.")


@torch.no_grad()
def _resize_position_embeddings(model: PreTrainedModel, image_size: int) -> None:
    resized = 0
    for module in model.modules():
        patches, position = getattr(module, "patch_embeddings", None), getattr(module, "position_embeddings", None)
        if not isinstance(position, torch.nn.Parameter) or not hasattr(patches, "num_patches"):
            continue
        patch = _pair(patches.patch_size)
        old_grid = tuple(size // step for size, step in zip(_pair(patches.image_size), patch))
        new_grid = (image_size // patch[0], image_size // patch[1])
        num_prefix_tokens = position.shape[1] - old_grid[0] * old_grid[1]  # CLS (+ distillation for DeiT)
        if num_prefix_tokens < 0:
            raise ValueError(f"Cannot resize {type(module).__name__}: {position.shape[1]} position embeddings for a "
                             f"{old_grid[0]}x{old_grid[1]} patch grid.")
        if new_grid != old_grid:
            dim = position.shape[-1]
            grid = position[:, num_prefix_tokens:].reshape(1, *old_grid, dim).permute(0, 3, 1, 2)
            grid = torch.nn.functional.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False)
            grid = grid.to(position.dtype).permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
            module.position_embeddings = torch.nn.Parameter(torch.cat([position[:, :num_prefix_tokens], grid], dim=1),
                                                            requires_grad=position.requires_grad)
        patches.image_size = (image_size, image_size)
        patches.num_patches = new_grid[0] * new_grid[1]
        if hasattr(module, "image_size"):  # the embeddings keep their own copy for the input-size check
            module.image_size = (image_size, image_size)
        resized += 1
    if resized == 0:
        raise ValueError(f"--image_size {image_size}: found no position embeddings to resize in "
                         f"{type(model).__name__}.")
    model.config.image_size = image_size


def _resize_timm_model(model: PreTrainedModel, image_size: int) -> None:
    timm_model = model.timm_model
    pretrained_cfg = dict(getattr(model.config, "pretrained_cfg", None) or {})
    if hasattr(timm_model, "set_input_size"):
        patch = getattr(getattr(timm_model, "patch_embed", None), "patch_size", None)
        if patch is not None and (image_size % _pair(patch)[0] or image_size % _pair(patch)[1]):
            raise ValueError(f"--image_size {image_size} is not a multiple of this timm model's patch size {patch}; "
                             "valid sizes are multiples of it.")
        timm_model.set_input_size(img_size=(image_size, image_size))  # resamples pos_embed (bicubic)
        # timm.create_model(img_size=...) is how the saved checkpoint is rebuilt at the new size.
        model.config.model_args = {**(model.config.model_args or {}), "img_size": image_size}
    elif pretrained_cfg.get("fixed_input_size"):
        raise ValueError(f"--image_size {image_size} is not supported for the timm model "
                         f"{model.config.architecture!r}: it needs a fixed input size and cannot be resized "
                         "(no set_input_size); leave --image_size unset.")
    if pretrained_cfg:  # the saved config.json is also the saved image processor of a timm checkpoint
        channels = (pretrained_cfg.get("input_size") or [3])[0]
        model.config.pretrained_cfg = {**pretrained_cfg, "input_size": [channels, image_size, image_size]}


def _pair(value) -> tuple[int, int]:
    if isinstance(value, Iterable):
        first, second = value
        return int(first), int(second)
    return int(value), int(value)


def _size_field(size, key: str) -> int | None:
    # transformers 5 stores sizes as SizeDict objects, older processors as plain dicts.
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def _plain_size(size) -> dict | None:
    if size is None or isinstance(size, dict):
        return size
    return {key: value for key, value in vars(size).items() if value is not None} if hasattr(size, "__dict__") \
        else size


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
    if not builtin.looks_like_hub_id(name):
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
