"""cdb_hf: ChannelDropBack for Hugging Face fine-tuning.

The core (:class:`ChannelDropBack`, :class:`ChannelDropBackConfig`) is torch-only; the transformers
faces are imported lazily so that ``import cdb_hf`` stays light.
"""

import importlib
from typing import Any

from .core import ChannelDropBack, ChannelDropBackConfig
from .version import __version__

_LAZY = {
    "ChannelDropBackCallback": "cdb_hf.callback",
    "add_channel_drop_back": "cdb_hf.callback",
    "CDBTrainer": "cdb_hf.trainer",
    "ResumeSafeTrainer": "cdb_hf.trainer",
    "PerExampleSeeded": "cdb_hf.train_set",
}
__all__ = ["ChannelDropBack", "ChannelDropBackConfig", *_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cdb_hf' has no attribute {name!r}")
