"""The package's imports point one way (README, "Development"): no circles, no module importing one above it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cdb_hf"

# Lowest first; a module may import only modules of lower layers (and the package's __init__).
LAYERS = [
    {"version", "errors", "core", "builtin", "perf", "metrics", "evaluation", "image_check"},
    {"checks", "arguments", "run_dir", "run_lock", "preemption", "data", "models", "optimization"},
    {"hub", "streaming", "resume"},
    {"preflight"},
    {"callback", "run"},
    {"trainer_path", "accelerate_loop"},
    {"eval_only"},
    {"launch"},
    {"ab"},
    {"cli"},
    {"demo"},
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
