"""Whether ``--push_to_hub`` can succeed, asked before any work (offline mode, no token): light, below pre-flight.

Pushing itself (:func:`cdb_hf.hub.push_outputs`) happens after training, in :mod:`cdb_hf.hub`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from huggingface_hub import constants as hub_constants
from huggingface_hub import get_token

if TYPE_CHECKING:
    from transformers import TrainingArguments

__all__ = ["check_can_push"]


def check_can_push(training_args: TrainingArguments) -> None:
    """Raise before any work if ``--push_to_hub`` cannot possibly succeed (offline mode, no token)."""
    if not getattr(training_args, "push_to_hub", False):
        return
    if hub_constants.HF_HUB_OFFLINE:
        raise ValueError("--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set; unset it or drop "
                         "--push_to_hub (the outputs are saved in --output_dir either way)")
    if not (training_args.hub_token or get_token()):
        raise ValueError("--push_to_hub needs a Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass "
                         "--hub_token (it is never logged)")
