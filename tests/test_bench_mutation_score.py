"""bench/mutation_score.py counts mutmut's verdicts per file as documented (the score of `make mutants`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "mutation_score.py"
spec = importlib.util.spec_from_file_location("mutation_score", BENCH)
mutation_score = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation_score)


def write_meta(folder: Path, source: str, results: dict) -> None:
    path = folder / f"{source}.meta"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"exit_code_by_key": results}))


def test_the_score_counts_kills_timeouts_survivors_and_listed_equivalents(tmp_path):
    write_meta(tmp_path / "now", "pkg/core.py", {"pkg.core.x_f__mutmut_1": 1, "pkg.core.x_f__mutmut_2": 0,
                                                 "pkg.core.x_f__mutmut_3": 33, "pkg.core.x_f__mutmut_4": 36,
                                                 "pkg.core.x_g__mutmut_1": 0, "pkg.core.x_h__mutmut_1": None})
    write_meta(tmp_path / "now", "pkg/other.py", {"pkg.other.x_k__mutmut_1": 0})
    result = mutation_score.score(tmp_path / "now", ["pkg.core.*"], {"pkg.core.x_g__mutmut_1": "a log line"})
    assert result["files"] == {"pkg/core.py": {"mutants": 6, "checked": 5, "killed": 1, "timeout": 1, "survived": 2,
                                               "no_tests": 1, "equivalent": 1, "score": 0.5}}
    assert result["unlisted_survivors"] == ["pkg.core.x_f__mutmut_2", "pkg.core.x_f__mutmut_3"]

    write_meta(tmp_path / "before", "pkg/core.py", {"pkg.core.x_h__mutmut_1": 1})
    again = mutation_score.score(tmp_path / "now", ["pkg.core.*"], {}, previous=tmp_path / "before")
    assert again["files"]["pkg/core.py"]["checked"] == 6 and again["files"]["pkg/core.py"]["killed"] == 2


def test_an_equivalent_needs_a_reason(tmp_path):
    listed = tmp_path / "equivalent.txt"
    listed.write_text("# comment\n\npkg.core.x_g__mutmut_1  the message's case only\n")
    assert mutation_score.read_equivalent(listed) == {"pkg.core.x_g__mutmut_1": "the message's case only"}
    listed.write_text("pkg.core.x_g__mutmut_1\n")
    with pytest.raises(ValueError, match="'pkg.core.x_g__mutmut_1' is listed without a reason"):
        mutation_score.read_equivalent(listed)
