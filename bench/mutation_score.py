"""The mutation score of a ``mutmut run`` (``make mutants``), per mutated file, into bench/results/.

Reads mutmut's per-file results (``mutants/<path>.meta``) and the survivors listed as equivalent in
``bench/mutants_equivalent.txt`` (one ``mutant-name  reason`` a line), and writes::

    {"files": {"cdb_hf/core.py": {"mutants", "checked", "killed", "timeout", "survived", "no_tests",
                                  "equivalent", "score"}}, "survivors": {...}, "unlisted_survivors": [...]}

score = (killed + timeout) / (checked - equivalent): a mutant no test reaches ("no tests") counts as a
survivor. Mutants outside the scope of the run (``--scope`` globs, as given to ``mutmut run``) are left out.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EQUIVALENT = REPO / "bench" / "mutants_equivalent.txt"

# mutmut 3's exit codes (mutmut.stats.status_by_exit_code), spelled out so this runs without mutmut.
KILLED, SURVIVED, NO_TESTS, TIMEOUT = {1, 3}, {0}, {5, 33}, {36, 24, -24, 152, 255}


def read_equivalent(path: Path = EQUIVALENT) -> dict[str, str]:
    """``{mutant name: reason}`` from the equivalents file (``#`` comments and blank lines ignored)."""
    listed = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, reason = line.partition(" ")
                if not reason.strip():
                    raise ValueError(f"{path}: {name!r} is listed without a reason")
                listed[name] = reason.strip()
    return listed


def score(mutants_dir: Path, scope: list[str], equivalent: dict[str, str], previous: Path | None = None) -> dict:
    """Per file, the counts and the score; ``previous``: a copy of an earlier run's mutants folder whose
    verdicts stand for the mutants this run did not check again (``mutmut run NAME ...`` re-runs only NAMEs)."""
    files, survivors = {}, {}
    for meta in sorted(mutants_dir.rglob("*.py.meta")):
        source = str(meta.relative_to(mutants_dir))[:-len(".meta")]
        results = json.loads(meta.read_text())["exit_code_by_key"]
        earlier = previous / meta.relative_to(mutants_dir) if previous is not None else None
        if earlier is not None and earlier.is_file():
            before = json.loads(earlier.read_text())["exit_code_by_key"]
            results = {k: before.get(k) if v is None else v for k, v in results.items()}
        results = {k: v for k, v in results.items() if not scope or any(fnmatch.fnmatch(k, g) for g in scope)}
        if not results:
            continue
        checked = {k: v for k, v in results.items() if v is not None}
        counts = {name: sum(v in codes for v in checked.values())
                  for name, codes in (("killed", KILLED), ("timeout", TIMEOUT), ("survived", SURVIVED),
                                      ("no_tests", NO_TESTS))}
        alive = sorted(k for k, v in checked.items() if v in SURVIVED | NO_TESTS)
        listed = [k for k in alive if k in equivalent]
        denominator = len(checked) - len(listed)
        files[source] = {"mutants": len(results), "checked": len(checked), **counts, "equivalent": len(listed),
                         "score": round((counts["killed"] + counts["timeout"]) / denominator, 4)
                         if denominator else None}
        survivors[source] = alive
    unlisted = sorted(k for alive in survivors.values() for k in alive if k not in equivalent)
    return {"files": files, "survivors": survivors, "unlisted_survivors": unlisted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants_dir", type=Path, default=REPO / "mutants")
    parser.add_argument("--scope", nargs="*", default=[], help="mutant name globs of the run (default: all)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "mutation_score.json")
    parser.add_argument("--note", default="", help="what this run was (tests, machine)")
    parser.add_argument("--previous", type=Path, default=None,
                        help="an earlier run's mutants folder: its verdicts stand where this run checked nothing")
    args = parser.parse_args(argv)
    if not args.mutants_dir.is_dir():
        parser.error(f"--mutants_dir {str(args.mutants_dir)!r} does not exist: run `make mutants` first")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "note": args.note, "scope": args.scope,
              **score(args.mutants_dir, args.scope, read_equivalent(), args.previous)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    for source, counts in result["files"].items():
        print(f"{source}: {counts['killed'] + counts['timeout']} killed of {counts['checked']} checked "
              f"({counts['equivalent']} equivalent, {counts['no_tests']} without a test): score {counts['score']}")
    print(f"{len(result['unlisted_survivors'])} survivors neither killed nor listed in {EQUIVALENT.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
