"""What a finished run leaves behind, and how it reaches the Hub (shared by the Trainer and accelerate paths).

The output directory is a plain transformers checkpoint (safetensors weights, config, image processor)
plus cdb_hf's records (``cdb_config.json``, metrics JSON, ``trainer_state.json``) and transformers'
standard model card, so anyone can load it with ``AutoModelForImageClassification`` and no cdb_hf. A LoRA
run (``--lora_r``) saves the peft adapter instead (``adapter_config.json``, ``adapter_model.safetensors``,
the fine-tuned model's config in ``model_config/``), and with ``--lora_merge`` the merged plain model in
``merged/``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from huggingface_hub import HfApi, ModelCard
from transformers import TrainingArguments
from transformers.modelcard import TrainingSummary, extract_hyperparameters_from_trainer, parse_log_history
from transformers.utils import logging

from .builtin import looks_like_hub_id
from .core import ChannelDropBackConfig
from .optimization import OFFICIAL_LR_MILESTONE_FRACTIONS
from .run_dir import RUN_MARKER, write_results_json

__all__ = ["CDB_CONFIG_NAME", "LORA_MERGED_DIR", "MAX_CARD_CLASSES", "LORA_MODEL_CONFIG_DIR", "UPLOAD_IGNORE_PATTERNS",
           "is_peft_model", "push_outputs", "save_merged_model", "save_outputs", "write_model_card"]

logger = logging.get_logger(__name__)

CDB_CONFIG_NAME = "cdb_config.json"
#: Intermediate checkpoints hold optimizer state and pickled TrainingArguments (which may hold a token).
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "training_args.bin", "_*", RUN_MARKER]
_PAPER = "https://arxiv.org/abs/2411.10891"
#: A LoRA run's fine-tuned config (labels, resolution): not at the top level, where a config.json makes
#: transformers take the adapter folder for a full checkpoint (and fail to find its weights).
LORA_MODEL_CONFIG_DIR = "model_config"
#: Where ``--lora_merge`` writes the merged plain model.
LORA_MERGED_DIR = "merged"
#: The model card lists per-class accuracy up to this many classes (beyond, a table nobody reads).
MAX_CARD_CLASSES = 20


def is_peft_model(model) -> bool:
    """Whether ``model`` is a peft model (duck-typed: peft stays an optional dependency)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def save_outputs(output_dir: str | os.PathLike, model, image_processor, cdb_config: ChannelDropBackConfig | None,
                 metrics: dict[str, float], *, trainer_state: Any = None) -> list[str]:
    """Write the final model and every record of the run into ``output_dir``; return the file names written.

    ``cdb_config.json`` is written only when CDB was on (a baseline has no CDB config). Metrics go to
    ``all_results.json`` and, split by prefix, ``train_results.json`` / ``eval_results.json``, the
    names ``Trainer.save_metrics`` uses. ``trainer_state`` is a ``TrainerState`` or a plain dict.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # safetensors (transformers 5 writes nothing else). save_pretrained packs every tensor contiguously, so a
    # model trained in channels_last (RunArguments.channels_last) saves as a plain checkpoint, unchanged in memory.
    model.save_pretrained(output_dir)  # a peft model: adapter_config.json + adapter_model.safetensors
    written = []
    if is_peft_model(model):
        model.get_base_model().config.save_pretrained(output_dir / LORA_MODEL_CONFIG_DIR)
        written.append(f"{LORA_MODEL_CONFIG_DIR}/config.json")
    if image_processor is not None:
        image_processor.save_pretrained(output_dir)
    if cdb_config is not None:
        write_results_json(output_dir / CDB_CONFIG_NAME, cdb_config.to_dict())
        written.append(CDB_CONFIG_NAME)
    metrics = {key: _plain(value) for key, value in metrics.items()}
    for split in ("train", "eval"):
        split_metrics = {k: v for k, v in metrics.items() if k.startswith(f"{split}_") or k == "epoch"}
        if any(k != "epoch" for k in split_metrics):
            write_results_json(output_dir / f"{split}_results.json", split_metrics)
            written.append(f"{split}_results.json")
    write_results_json(output_dir / "all_results.json", metrics)
    written.append("all_results.json")
    if trainer_state is not None:
        if hasattr(trainer_state, "save_to_json"):
            trainer_state.save_to_json(str(output_dir / "trainer_state.json"))
        else:
            write_results_json(output_dir / "trainer_state.json", trainer_state)
        written.append("trainer_state.json")
    return written


def save_merged_model(output_dir: str | os.PathLike, model, image_processor) -> Path:
    """Merge a peft model's adapters into its base and save that plain model in ``output_dir/merged``.

    The merge happens in place (peft's ``merge_and_unload``: no second copy of the model in memory), so
    call it after the adapter was saved. The result loads with ``AutoModelForImageClassification``.
    """
    target = Path(output_dir) / LORA_MERGED_DIR
    merged = model.merge_and_unload()
    merged.save_pretrained(target)
    if image_processor is not None:
        image_processor.save_pretrained(target)
    return target


def write_model_card(output_dir: str | os.PathLike, model_args, data_args, cdb_config: ChannelDropBackConfig | None,
                     metrics: dict[str, float], *, training_args: TrainingArguments | None = None,
                     log_history: list[dict[str, Any]] | None = None, model=None,
                     model_name: str | None = None, per_class: list[dict[str, Any]] | None = None,
                     run_args=None) -> str:
    """Write ``README.md`` (transformers' standard Trainer model card plus a ChannelDropBack section).

    The card records the base model, the dataset, the CDB hyperparameters (or that this is a
    baseline), the final metrics, and that the result is a standard architecture needing no extra
    code. ``per_class`` (rows of :func:`cdb_hf.evaluation.per_class_accuracy`) adds a per-class accuracy
    table for up to :data:`MAX_CARD_CLASSES` classes (beyond that, the card points to the CSV).
    ``run_args`` (RunArguments) puts ``--lr_schedule multistep`` in the hyperparameters in place of the
    TrainingArguments scheduler it replaced. Returns the card's text.
    """
    output_dir = Path(output_dir)
    base_model = model_args.model_name_or_path
    dataset = data_args.dataset_name or data_args.train_dir
    base_is_hub_id = looks_like_hub_id(base_model)
    dataset_is_hub_id = looks_like_hub_id(dataset)
    if model_name is None:
        hub_id = getattr(training_args, "hub_model_id", None) if training_args is not None else None
        model_name = (hub_id or output_dir.resolve().name).split("/")[-1]

    eval_lines, eval_results = None, None
    if log_history:
        _, eval_lines, eval_results = parse_log_history(log_history)
    if not eval_results:  # the accelerate loop has no Trainer log history: use the final metrics
        eval_results = {_title(k.removeprefix("eval_")): v for k, v in metrics.items()
                        if k.startswith("eval_") and k not in ("eval_runtime", "eval_samples_per_second",
                                                               "eval_steps_per_second")} or None
    hyperparameters = (extract_hyperparameters_from_trainer(SimpleNamespace(args=training_args))
                       if training_args is not None else None)
    if hyperparameters is not None and getattr(run_args, "lr_schedule", "trainer") == "multistep":
        milestones = run_args.lr_milestones
        official = "/".join(f"{100 * fraction:.0f}" for fraction in OFFICIAL_LR_MILESTONE_FRACTIONS)
        where = (f"epochs {', '.join(str(m) for m in milestones)}" if milestones
                 else f"{official} % of the epochs (official)")
        hyperparameters["lr_scheduler_type"] = f"multistep (x{run_args.lr_gamma} from {where})"
        hyperparameters.pop("lr_scheduler_warmup_ratio", None)
        hyperparameters.pop("lr_scheduler_warmup_steps", None)
    summary = TrainingSummary(
        model_name=model_name,
        tags=["image-classification", "channeldropback", "cdb_hf", "generated_from_trainer"]
        + (["peft", "lora"] if is_peft_model(model) else []),
        finetuned_from=base_model,
        tasks="image-classification",
        dataset=dataset,
        dataset_tags=dataset if dataset_is_hub_id else None,
        dataset_args=data_args.dataset_config_name if dataset_is_hub_id else None,
        eval_results=eval_results,
        eval_lines=eval_lines or None,
        hyperparameters=hyperparameters,
    )
    text = summary.to_model_card()
    if not base_is_hub_id:
        # A local directory is not a Hub repo: no broken link, and no base_model metadata the Hub would reject.
        text = text.replace(f"[{base_model}](https://huggingface.co/{base_model})", f"`{base_model}`")
        text = re.sub(r"^base_model: .*\n", "", text, count=1, flags=re.MULTILINE)
    text = text.replace("\n## Model description\n\nMore information needed\n",
                        "\n## Model description\n\n" + _description(model, base_model, cdb_config, metrics)
                        + _per_class_section(per_class))
    if is_peft_model(model):  # an adapter: the Hub shows peft's loading snippet for it
        text = re.sub(r"^library_name: transformers$", "library_name: peft", text, count=1, flags=re.MULTILINE)
    card = ModelCard(text)  # parses and checks the YAML metadata block
    output_dir.mkdir(parents=True, exist_ok=True)
    card.save(output_dir / "README.md")
    return str(card)


def push_outputs(output_dir: str | os.PathLike, training_args: TrainingArguments, *,
                 commit_message: str = "Fine-tuned with cdb_hf (ChannelDropBack)") -> str:
    """Create the Hub repository (if needed) and upload ``output_dir`` without intermediate checkpoints.

    The repository is ``--hub_model_id`` or the output directory's name; the token comes from
    ``--hub_token`` or the cached login and is never logged. Returns the repository id.
    """
    repo_id = training_args.hub_model_id or Path(output_dir).resolve().name
    api = HfApi(token=training_args.hub_token)
    repo_url = api.create_repo(repo_id, private=training_args.hub_private_repo, exist_ok=True)
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    revision = getattr(training_args, "hub_revision", None)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    logger.info(f"Uploading {output_dir} to the Hub repository {repo_id}")
    api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message=commit_message,
                      ignore_patterns=UPLOAD_IGNORE_PATTERNS, revision=revision)
    return repo_id


# ---------------------------------------------------------------------- helpers
def _description(model, base_model: str | None, cdb_config: ChannelDropBackConfig | None,
                 metrics: dict[str, float]) -> str:
    lora = is_peft_model(model)
    base = model.get_base_model() if lora else model
    architecture = type(base).__name__ if base is not None else "AutoModelForImageClassification"
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    lines = [] if lora else [
        f"A standard `{architecture}`{f' (`{model_type}`)' if model_type else ''} checkpoint: it loads with "
        "`AutoModelForImageClassification.from_pretrained(...)` and needs no extra code and no cdb_hf. "
        "ChannelDropBack only changes which weights each optimizer step updates; the architecture and the "
        "forward pass are unchanged, so the deployed network is exactly the trained one.",
        "",
    ]
    if lora:
        lines += _lora_description(model, architecture, model_type)
    lines += [
        f"Base model: `{base_model}`.",
        "",
        "### ChannelDropBack",
        "",
    ]
    if cdb_config is None:
        lines.append("Trained **without** ChannelDropBack (baseline run of cdb_hf).")
    else:
        lines.append(f"Fine-tuned with [ChannelDropBack]({_PAPER}) (Hershkovitch Neiterman & Ben-Artzi, ICPR 2024) "
                     "through cdb_hf, with these hyperparameters (also in `cdb_config.json`):")
        lines.append("")
        lines.extend(f"- {key}: {value}" for key, value in cdb_config.to_dict().items())
    final = {k: v for k, v in metrics.items() if not k.endswith(("_runtime", "_per_second", "total_flos"))}
    if final:
        lines += ["", "### Final metrics", "", "| metric | value |", "|:--|--:|"]
        lines.extend(f"| {key} | {_round(value)} |" for key, value in final.items())
    return "\n".join(lines) + "\n"


def _per_class_section(rows: list[dict[str, Any]] | None) -> str:
    """A markdown table of per-class accuracy (validation set), or a pointer to the CSV for many classes."""
    if not rows:
        return ""
    lines = ["", "### Per-class accuracy (validation set)", ""]
    if len(rows) > MAX_CARD_CLASSES:
        lines.append(f"{len(rows)} classes: see `eval_per_class.csv` and `eval_confusion_matrix.csv`.")
        return "\n".join(lines) + "\n"
    lines += ["| class | examples | correct | accuracy |", "|:--|--:|--:|--:|"]
    for row in rows:
        accuracy = "—" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        label = str(row["label"]).replace("|", "\\|")
        lines.append(f"| {label} | {row['support']} | {row['correct']} | {accuracy} |")
    lines += ["", "The confusion matrix is in `eval_confusion_matrix.csv` (and `.png`)."]
    return "\n".join(lines) + "\n"


def _lora_description(model, architecture: str, model_type: str | None) -> list[str]:
    config = next(iter(model.peft_config.values()))
    targets = sorted(config.target_modules) if isinstance(config.target_modules, (set, list)) \
        else config.target_modules
    return [
        f"A LoRA adapter (peft) for a `{architecture}`{f' (`{model_type}`)' if model_type else ''}: rank "
        f"{config.r}, alpha {config.lora_alpha}, dropout {config.lora_dropout}, on `{targets}`; the classification "
        f"head (`{sorted(config.modules_to_save or [])}`) is trained and saved in full, the rest of the base model "
        "is frozen. Load it with:",
        "",
        "```python",
        "from peft import PeftConfig, PeftModel",
        "from transformers import AutoConfig, AutoModelForImageClassification",
        "",
        "adapter = \"path/or/repo-of-this-adapter\"",
        f"config = AutoConfig.from_pretrained(adapter, subfolder=\"{LORA_MODEL_CONFIG_DIR}\")  # labels",
        "base = AutoModelForImageClassification.from_pretrained(",
        "    PeftConfig.from_pretrained(adapter).base_model_name_or_path, config=config, ignore_mismatched_sizes=True)",
        "model = PeftModel.from_pretrained(base, adapter)",
        "```",
        "",
        f"If `{LORA_MERGED_DIR}/` is present, it holds the merged plain model (no peft needed).",
        "",
    ]


def _title(key: str) -> str:
    return " ".join(part.capitalize() for part in key.split("_"))


def _round(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars to Python numbers, so the metrics are JSON."""
    return value.item() if hasattr(value, "item") else value
