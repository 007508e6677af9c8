"""Training-speed settings that change no result beyond float rounding (shared by both training paths).

``channels_last`` stores 2-D convolution weights as NHWC. oneDNN on CPU and cuDNN on GPUs with mixed
precision run convolutions fastest in that layout; in NCHW, PyTorch converts around every convolution,
which costs most for depthwise convolutions (EfficientNet, MobileNet, ConvNeXt). Only 4-D tensors are
touched, so Linear layers (all of a ViT except its patch embedding) are unaffected.

The layout is invisible to everything that reads values: ``save_pretrained`` and accelerate's
``save_state`` pack tensors contiguously before writing safetensors, ``load_state_dict`` copies values
into the existing (channels_last) parameters, and ChannelDropBack's index operations address elements
by index, not by memory offset.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

__all__ = ["apply_memory_format"]

logger = logging.get_logger(__name__)


def apply_memory_format(model: nn.Module, channels_last: bool) -> nn.Module:
    """Convert ``model``'s 4-D parameters and buffers to channels_last in place when asked; return ``model``.

    Call it before the optimizer is built, so that optimizer state (momentum, Adam moments) is created in
    the same layout as the weights. ``channels_last=False`` leaves the model exactly as loaded.
    """
    if not isinstance(channels_last, bool):
        raise ValueError(f"channels_last={channels_last!r} is not valid; it must be true or false")
    if not channels_last:
        return model
    converted = sum(1 for param in model.parameters() if param.dim() == 4)
    if converted:
        model.to(memory_format=torch.channels_last)
        logger.info(f"channels_last: {converted} four-dimensional weight(s) stored NHWC for training; the saved "
                    "checkpoint is a plain contiguous one")
    return model

