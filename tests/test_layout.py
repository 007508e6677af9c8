"""The package's imports point one way (README, "Development"): no circles, no module importing one above it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cdb_hf"

# Lowest first; a module may import only modules of lower layers (and the package's __init__). Eight layers, so
# no import chain inside the package is longer than eight modules (docs/development.md).
LAYERS = [
    # the core and the leaves: torch-only method, errors, version, metrics, pure helpers
    {"core", "errors", "version", "builtin", "perf", "metrics", "evaluation", "image_check", "transforms",
     "optimization", "preemption", "run_lock", "hub_auth", "ab_report"},
    # arguments, the run plan, checks, run folders, models, data sources
    {"arguments", "plan", "checks", "run_dir", "models", "sources", "train_set"},
    {"callback", "parsing", "resume", "hub", "streaming", "ab_args"},
    # shared run set-up, evaluation/prediction, the public Trainer classes, output-folder planning
    {"run", "inference", "trainer", "output_dir"},
    # the three faces, and pre-flight
    {"trainer_path", "accelerate_loop", "eval_only", "preflight"},
    {"launch"},
    {"ab"},
    {"cli", "demo"},
]


def package_imports(path: Path) -> set[str]:
    """The cdb_hf modules ``path`` imports, anywhere in the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cdb_hf."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("cdb_hf."))
    return found - {"__init__", "__version__"}


def test_every_module_imports_only_modules_below_it():
    layer_of = {name: index for index, layer in enumerate(LAYERS) for name in layer}
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    modules.update({p.name: p / "__init__.py" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()})
    unplaced = sorted(set(modules) - set(layer_of))
    assert not unplaced, f"place {unplaced} in a layer of LAYERS (and in the README's module map)"
    upward = [(name, imported) for name, path in modules.items() for imported in package_imports(path)
              if layer_of.get(imported, -1) >= layer_of[name]]
    assert not upward, f"imports that do not point down: {upward}"


def test_the_core_imports_only_torch_and_the_standard_library():
    tree = ast.parse((PACKAGE / "core.py").read_text())
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module}
    assert not roots & {"transformers", "accelerate", "datasets", "timm", "peft", "numpy", "cdb_hf"}, roots



_HEAVY = ("datasets", "pyarrow", "torchvision")


def _start(*statements: str) -> subprocess.Popen:
    """A fresh interpreter (this one has every library loaded) that runs ``statements`` in turn and prints, after
    each, the data/image libraries loaded so far."""
    probe = f"print(','.join(m for m in {_HEAVY!r} if m in sys.modules))"
    code = "import sys\n" + "".join(f"{statement}\n{probe}\n" for statement in statements)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=PACKAGE.parent)


def _loaded(process: subprocess.Popen) -> list[set[str]]:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    return [set(filter(None, line.split(","))) for line in out.splitlines()]


def test_the_package_and_its_two_entry_names_load_no_data_or_image_library():
    """``import cdb_hf`` and the core plus the callback stay light: no datasets, pyarrow or torchvision of ours.

    transformers' own ``TrainerCallback`` loads torchvision where peft is installed (trainer_utils imports peft,
    which imports modeling_utils and its image utilities): the callback may load only what that loads. One
    interpreter, in that order (each import costs seconds)."""
    with_peft = _start("import cdb_hf", "from cdb_hf import ChannelDropBack, ChannelDropBackConfig",
                       "from transformers.trainer_callback import TrainerCallback",
                       "from cdb_hf import ChannelDropBackCallback")
    # Where peft is not installed (blocked here), the two names load none of the three libraries at all.
    without_peft = _start("sys.modules['peft'] = None", "from cdb_hf import ChannelDropBack, ChannelDropBackCallback")
    package, core, transformers_own, callback = _loaded(with_peft)
    assert package == set() and core == set(), (package, core)
    assert not {"datasets", "pyarrow"} & callback, callback
    assert callback == transformers_own, f"cdb_hf's callback loads {sorted(callback - transformers_own)} itself"
    assert _loaded(without_peft) == [set(), set()]
