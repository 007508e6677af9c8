"""cdb_hf: ChannelDropBack for Hugging Face fine-tuning.

The core (:class:`ChannelDropBack`, :class:`ChannelDropBackConfig`) is torch-only; the transformers
callback is imported lazily so that ``import cdb_hf`` stays light.
"""

from typing import Any

from .core import ChannelDropBack, ChannelDropBackConfig

__version__ = "0.1.0"
__all__ = ["ChannelDropBack", "ChannelDropBackConfig", "ChannelDropBackCallback", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "ChannelDropBackCallback":
        from .callback import ChannelDropBackCallback

        return ChannelDropBackCallback
    raise AttributeError(f"module 'cdb_hf' has no attribute {name!r}")
