"""The package layering of DESIGN.md, checked on the source: which package may import which, and no cycles.

Every `import sourcelm...` counts, the ones inside functions too (a lazy import is still a dependency), except
those under `if TYPE_CHECKING:`.
"""

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

import sourcelm

ROOT = Path(sourcelm.__file__).parent
BASE = {"config", "artifacts", "sourcelm"}  # the root package (its version), the config tree, files and hashes
# package -> the packages it may import besides BASE (the data path: each folder only reaches backwards)
ALLOWED = {
    "config": set(), "artifacts": set(), "sourcelm": set(),
    "kernels": set(),
    "data": set(),
    "tokens": {"data"},
    "model": {"kernels"},
    "parallel": {"model", "kernels"},
    "train": {"model", "kernels", "parallel", "tokens", "data"},
    "interop": {"model", "kernels", "train", "tokens"},  # export reads a training checkpoint
    "infer": {"model", "kernels", "interop"},
    "plan": {"model", "kernels", "parallel", "train", "tokens"},  # calibrates by training a cut of the model here
    "provenance": {"data", "tokens", "model", "kernels", "parallel", "train", "interop", "infer"},
    "eval": {"data", "model", "interop"},  # the decontamination step, the untrained baseline, HF export
    "cli": {"*"}, "demo": {"*"}, "__main__": {"*"},
}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "sourcelm"


def _imports(tree: ast.AST):
    type_checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                     and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
                     for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sourcelm":
            if node.module == "sourcelm":  # `from sourcelm import x`: the subpackage x, or the root's own names
                yield from (f"sourcelm.{a.name}" if (ROOT / a.name).exists() or (ROOT / f"{a.name}.py").exists()
                            else "sourcelm" for a in node.names)
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "sourcelm")


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        source = "sourcelm" if parts == ("__init__",) else parts[0]
        targets = {_package(m) for m in _imports(ast.parse(path.read_text(), str(path)))} - {source}
        edges.setdefault(source, set()).update(targets)
    return edges


def test_every_package_imports_only_what_the_layering_allows():
    edges = _graph()
    assert set(edges) <= set(ALLOWED), f"a package the layering does not know: {set(edges) - set(ALLOWED)}"
    wrong = {src: sorted(dst - BASE - ALLOWED[src]) for src, dst in edges.items()
             if "*" not in ALLOWED[src] and dst - BASE - ALLOWED[src]}
    assert not wrong, f"imports against DESIGN.md's layering (package: what it must not import): {wrong}"


def test_no_package_cycles():
    graphlib.TopologicalSorter(_graph()).prepare()  # raises CycleError naming the cycle


@pytest.mark.parametrize("package", sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()))
def test_each_package_imports_alone(package):
    """Every module of the package, in a fresh interpreter, so that no other package's import has already loaded
    what this one needs."""
    code = (f"import importlib, pkgutil, sourcelm.{package} as p\n"
            "for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.'):\n"
            "    if m.name.endswith('.__main__'): continue  # runs a command\n"
            "    importlib.import_module(m.name)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
