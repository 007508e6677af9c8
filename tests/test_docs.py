"""Every command and code block in the README, docs/ and bench/README.md is checked, and no link is broken.

Python blocks compile and import only names the package has (the core example also runs, in
test_readme.py); shell commands are checked against what they call: `run_finetune.py` flags through the
CLI's own parser, `python -m` modules, bench scripts and their flags, make targets. A new kind of
command in a doc fails here until this file learns to check it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

from cdb_hf import cli

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)
# A placeholder a doc uses for "any recipe".
PLACEHOLDERS = {"<recipe>": "recipes/vit-b16_cifar100.yaml"}
# Scripts that pass the rest of their command line to run_finetune.py, after this many positionals.
FORWARDS_TO_CLI = {"bench/ab_train_accuracy.py": 1}


def _blocks(language: str) -> list[tuple[Path, str]]:
    return [(doc, body) for doc in DOCS for lang, body in FENCE.findall(doc.read_text()) if lang == language]


def _commands() -> list[tuple[Path, list[str]]]:
    """Each shell command of each bash block: continuations joined, comments and `&&` chains split."""
    found = []
    for doc, body in _blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            for part in line.split("&&"):
                words = shlex.split(" ".join(PLACEHOLDERS.get(w, w) for w in part.split()))
                if words:
                    found.append((doc, words))
    return found


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    text = FENCE.sub("", doc.read_text())
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_the_docs_exist_and_the_readme_is_a_front_door():
    for name in ("method_card", "cli", "distributed", "lora", "benchmark"):
        assert (REPO / "docs" / f"{name}.md").is_file(), name
    assert len((REPO / "README.md").read_text().splitlines()) <= 350


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(REPO)))
def test_no_link_is_broken(doc):
    text = FENCE.sub("", doc.read_text())
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):  # http(s), mailto: not reachable offline
            continue
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, broken


def test_link_checker_catches_a_broken_link_and_anchor(tmp_path, monkeypatch):
    (tmp_path / "other.md").write_text("# Title\n## A section\n")
    doc = tmp_path / "doc.md"
    doc.write_text("[ok](other.md#a-section) [bad](missing.md) [bad anchor](other.md#nope)\n")
    with pytest.raises(AssertionError, match=r"missing.md.*other.md#nope"):
        test_no_link_is_broken(doc)


def test_every_python_block_compiles_and_imports_what_the_package_has():
    blocks = _blocks("python")
    assert len(blocks) >= 4
    for doc, body in blocks:
        tree = compile(body, str(doc), "exec", flags=ast.PyCF_ONLY_AST)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cdb_hf"):
                module = importlib.import_module(node.module)
                missing = [a.name for a in node.names if not hasattr(module, a.name)]
                assert not missing, f"{doc.name}: {node.module} has no {missing}"


def _check_run_finetune(arguments: list[str]) -> None:
    cli.parse_args(arguments)  # raises on an unknown flag, a bad value or a missing recipe


def _check_command(doc: Path, words: list[str]) -> None:
    program, *rest = words
    if program in ("git", "cd", "pip"):
        return
    if program == "make":
        targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))
        assert rest[0] in targets, f"{doc.name}: make {rest[0]} is not a Makefile target"
        return
    if program in ("accelerate", "torchrun"):
        script = next(i for i, w in enumerate(rest) if w.endswith(".py"))
        launcher = rest[:script]
        if "--config_file" in launcher:
            assert (REPO / launcher[launcher.index("--config_file") + 1]).is_file()
        assert rest[script] == "run_finetune.py", words
        _check_run_finetune(rest[script + 1:])
        return
    assert program == "python", f"{doc.name}: this test does not know how to check {words}"
    if rest[0] == "-m":
        assert importlib.util.find_spec(rest[1]) is not None, f"{doc.name}: no module {rest[1]}"
        return
    script = REPO / rest[0]
    assert script.is_file(), f"{doc.name}: no script {rest[0]}"
    if rest[0] == "run_finetune.py" or rest[0] in FORWARDS_TO_CLI:
        _check_run_finetune(rest[1 + FORWARDS_TO_CLI.get(rest[0], 0):])
        return
    source = script.read_text()
    unknown = [w for w in rest[1:] if w.startswith("--") and f'"{w}"' not in source]
    assert not unknown, f"{doc.name}: {rest[0]} has no flag {unknown}"


def test_every_shell_command_is_one_the_project_can_run():
    commands = _commands()
    assert sum(words[:2] == ["python", "run_finetune.py"] for _, words in commands) >= 5
    for doc, words in commands:
        _check_command(doc, words)


def test_the_command_checker_catches_a_wrong_flag():
    with pytest.raises(Exception, match="no_such_flag"):
        _check_command(REPO / "README.md", ["python", "run_finetune.py", "--no_such_flag", "1"])
    with pytest.raises(AssertionError, match="no flag"):
        _check_command(REPO / "README.md", ["python", "bench/overhead.py", "--no_such_flag"])


def test_the_quoted_demo_output_is_what_the_demo_prints_from_the_results():
    """The README's demo table quotes bench/results/demo/, and its verdict lines are the demo's own."""
    from cdb_hf.demo import benchmark_verdict, render_table

    quoted = next(body for lang, body in FENCE.findall((REPO / "README.md").read_text())
                  if not lang and "validation accuracy (%)" in body)
    demo = json.loads((REPO / "bench" / "results" / "demo" / "results.json").read_text())["summary"]
    assert render_table(demo) in quoted
    assert benchmark_verdict() in quoted


def test_the_readme_verdict_matches_the_benchmark_results():
    summary = json.loads((REPO / "bench" / "results" / "ab_mnist1000_seeds1000-1009" / "results.json")
                         .read_text())["summary"]["metrics"]["eval_accuracy"]
    section = (REPO / "README.md").read_text().split("## Does it help?")[1].split("\n## ")[0]
    for key in ("difference", "extra_difference"):
        stats = summary[key]
        interval = f"[{100 * stats['ci_low']:+.2f}, {100 * stats['ci_high']:+.2f}]".replace("-", "−")
        assert f"{100 * stats['mean']:.2f}".replace("-", "−") in section and interval in section


def test_the_quoted_mutation_scores_are_the_results():
    """The development section (README) and docs/development.md quote bench/results/mutation_score.json, the
    score of the last `make mutants`."""
    result = json.loads((REPO / "bench" / "results" / "mutation_score.json").read_text())
    development = (REPO / "docs" / "development.md").read_text()
    readme = (REPO / "README.md").read_text().split("## Development")[1]
    for source, counts in result["files"].items():
        assert f"{100 * counts['score']:.1f} %" in development, source
        assert f"{counts['mutants']:,}" in development, source
    core = result["files"]["cdb_hf/core.py"]
    assert f"{100 * core['score']:.1f} %" in readme and f"{core['mutants']:,}" in readme


def test_the_readme_scale_figures_are_the_results():
    """The README's Scale bullet quotes bench/results/scale_cpu*.json (hf face; memory: the larger of the faces)."""
    def rows(name: str) -> dict[tuple[int, str], dict]:
        result = json.loads((REPO / "bench" / "results" / f"{name}.json").read_text())
        return {(row["images"], row["face"]): row for row in result["rows"] if "face" in row}

    bullet = (REPO / "README.md").read_text().split("- **Scale**")[1].split("\n- **")[0]
    bullet = " ".join(bullet.split())
    folders, shards = rows("scale_cpu_stream"), rows("scale_cpu_stream_parquet")
    nocache = rows("scale_cpu_nocache")
    for quoted, table in (("image folders", folders), ("parquet shards", shards)):
        first = [table[size, "hf"]["seconds_to_first_step"] for size in (2000, 200000)]
        assert f"{quoted} {first[0]:.1f} → {first[1]:.1f} s" in bullet, quoted
    stream_rss = max(table[200000, face]["peak_rss_mib"] / table[20000, face]["peak_rss_mib"]
                     for table in (folders, shards) for face in ("hf", "accelerate"))
    assert f"is at most {stream_rss:.2f}× that at 20k" in bullet
    later = [nocache[size, "hf"]["seconds_to_first_step"] for size in (2000, 200000)]
    assert f"go from {later[0]:.1f} to {later[1]:.1f} s" in bullet
    map_rss = max(nocache[200000, face]["peak_rss_mib"] / nocache[20000, face]["peak_rss_mib"]
                  for face in ("hf", "accelerate"))
    assert f"with peak RSS at most {map_rss:.2f}× that at 20k" in bullet
    assert f"({nocache[200000, 'hf']['first_launch_seconds_to_first_step']:.0f} s at 200k here" in bullet
