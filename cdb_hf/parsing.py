"""``run_finetune.py``'s command line, parsed: a YAML or JSON recipe first, then flags that override it.

``HfArgumentParser`` over the argument dataclasses and ``TrainingArguments``, as in transformers'
``run_image_classification.py``. The CLI, the demo and the A/B runner share it; a recipe value of the wrong
type, a key given twice or an unknown key is a :class:`~cdb_hf.errors.UsageError` naming it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from .arguments import CDBArguments, DataArguments, ModelArguments, RunArguments
from .checks import check_supported_setup
from .errors import UsageError, preview, usage_errors

__all__ = ["PROG", "RECIPE_SUFFIXES", "build_parser", "load_recipe", "parse_args"]

PROG = "run_finetune.py"
RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


def build_parser() -> HfArgumentParser:
    """The parser over the five argument dataclasses, in the order :func:`parse_args` returns them.

    A malformed flag raises ValueError (instead of argparse's usage dump), so that :func:`main` reports it
    in one line like every other bad input.
    """
    parser = HfArgumentParser((ModelArguments, DataArguments, CDBArguments, RunArguments, TrainingArguments))
    parser.prog = PROG
    # The script trains unless told otherwise: --do_train false evaluates (and predicts) with a saved model.
    parser.set_defaults(do_train=True)
    for action in parser._actions:  # argparse reads a lone '%' in a help text (e.g. "30%") as a format code
        if action.help:
            action.help = re.sub(r"(?<!%)%(?![(%])", "%%", action.help)

    def error(message: str):
        raise UsageError(message)

    parser.error = error
    return parser


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a flat YAML or JSON recipe (``{flag name: value}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            values = json.loads(text, object_pairs_hook=_json_unique_keys)
        else:
            values = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader that refuses duplicates)
    except Exception as error:  # both parsers' errors are reported the same way
        raise ValueError(f"recipe {str(path)!r} is not valid {path.suffix[1:].upper()}: {error}") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe {str(path)!r} must be a mapping of flag names to values, got "
                         f"{type(values).__name__}")
    return values


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice (the second would "
                                                        "silently win); keep one", key_node.start_mark)
            seen.add(key) if isinstance(key, str) else None
        return super().construct_mapping(node, deep=deep)


def _json_unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise ValueError(f"key(s) {twice} given twice (the second would silently win); keep one")
    return dict(pairs)


def _check_recipe_types(recipe: dict[str, Any], parser: HfArgumentParser, recipe_name: str) -> None:
    """A recipe value of the wrong YAML type (``seed: 1.5``, ``output_dir: 123``, ``max_steps: true``) fails here,
    naming the key; argparse would convert only strings and pass anything else on unchecked."""
    from transformers.hf_argparser import string_to_bool

    for action in parser._actions:
        if action.dest not in recipe or recipe[action.dest] is None:
            continue
        value = recipe[action.dest]
        values = value if isinstance(value, list) and action.nargs in ("+", "*") else [value]
        if isinstance(value, list) and action.nargs not in ("+", "*"):
            values = [object()]  # a list where one value belongs
        expected = {int: "an integer", float: "a number", str: "a string", string_to_bool: "true or false"}
        if action.type not in expected:
            continue
        kinds = {int: (int, str), float: (int, float, str), str: (str,), string_to_bool: (bool, str)}[action.type]
        if all(isinstance(v, kinds) and not (isinstance(v, bool) and action.type is not string_to_bool)
               for v in values):
            continue
        raise ValueError(f"recipe {recipe_name!r}: {action.dest}: {preview(value)} is not valid; it must be "
                         f"{expected[action.type]}{' (or a list of them)' if action.nargs in ('+', '*') else ''}")


def parse_args(argv: list[str] | None = None) -> tuple[Any, Any, Any, Any, TrainingArguments]:
    """Parse ``[recipe.yaml|recipe.json] [--flag value ...]`` into the five argument dataclasses.

    Returns ``(model_args, data_args, cdb_args, run_args, training_args)``. Flags override the recipe.
    """
    with usage_errors():
        return _parse_args(list(sys.argv[1:] if argv is None else argv))


def _parse_args(argv: list[str]) -> tuple[Any, Any, Any, Any, TrainingArguments]:
    recipe: dict[str, Any] = {}
    recipe_name = None
    if argv and not argv[0].startswith("-") and argv[0].lower().endswith(RECIPE_SUFFIXES):
        recipe_name = argv.pop(0)
        recipe = load_recipe(recipe_name)
    _refuse_deepspeed_early(recipe, argv)
    parser = build_parser()
    if recipe:
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(recipe) - known)
        if unknown:
            raise ValueError(f"recipe {recipe_name!r} has unknown key(s) {unknown}; keys are the flag names "
                             "without '--' (e.g. learning_rate, cdb_channel_rate)")
        _check_recipe_types(recipe, parser, recipe_name)
        # Recipe values become the parser's defaults, so any flag on the command line wins.
        parser.set_defaults(**recipe)
    model_args, data_args, cdb_args, run_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, cdb_args, run_args, training_args


def _refuse_deepspeed_early(recipe: dict[str, Any], argv: list[str]) -> None:
    """TrainingArguments imports DeepSpeed as soon as --deepspeed is set, so refuse before parsing."""
    in_argv = any(arg == "--deepspeed" or arg.startswith("--deepspeed=") for arg in argv)
    if in_argv or recipe.get("deepspeed"):
        check_supported_setup(SimpleNamespace(deepspeed=True, fsdp=None))
