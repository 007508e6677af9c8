"""The record pre-flight hands to every face: :class:`RunPlan` (a validated run and what was decided about it).

A module of its own, with no import of the package, so that the faces (and the A/B runner) depend on the
record and not on the checks that fill it (:func:`cdb_hf.preflight.plan_run`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from .core import ChannelDropBackConfig

__all__ = ["RunPlan"]


@dataclass
class RunPlan:
    """A validated run: the arguments, and what pre-flight decided about them."""

    model: Any
    data: Any
    cdb: Any
    run: Any
    training: TrainingArguments
    #: The CDB configuration (None: a baseline run). The run's length is filled in by prepare_run.
    cdb_config: ChannelDropBackConfig | None
    #: "fresh" (missing or empty output_dir), "resume" (continue the run there) or "replace".
    output_mode: str = "fresh"
    resume_checkpoint: str | None = None
    #: The resume checkpoint's record (cdb_hf_checkpoint.json), None when there is none.
    resume_record: dict[str, Any] | None = None
    #: Checkpoints of this output_dir that ``--resume_from_checkpoint true`` skipped because a kill left them
    #: half-written (no record); the resumed run removes them before it saves over their step numbers.
    incomplete_checkpoints: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: ``--ab_extra_arm`` parsed: the TrainingArguments values of the A/B runner's third arm (empty: none).
    extra_arm: dict[str, Any] = field(default_factory=dict)
    #: "train" (fine-tune, then evaluate) or "eval" (``--do_train false``: evaluate and/or predict a saved model).
    kind: str = "train"

    @property
    def args(self) -> tuple[Any, Any, Any, Any, TrainingArguments]:
        return self.model, self.data, self.cdb, self.run, self.training
