"""The package's layers (docs: DESIGN.md "Layout"): each module imports only from its own layer and those
below, Ray only from the shell up, and no import cycle. Read from the source with `ast`, imports inside
functions included, so nothing here starts Ray or even imports the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "trm_ray"

# Lowest first. A new module must be placed here: the test fails for a module it does not know.
LAYERS = {
    "values": ("__init__", "cli", "config", "files", "names", "spec"),
    "math": ("compressor", "kl", "pca", "loop", "phase2"),
    "data": ("text", "model", "shards", "hidden", "references"),
    "shell": ("cluster", "extract", "spectrum", "downstream", "regions", "scoring", "train", "scheduler",
              "tracking"),
    "results": ("report", "publish"),
    "entry": ("sweep", "quickstart"),
}
RAY_FREE = ("values", "math", "data")
LEVEL = {module: i for i, modules in enumerate(LAYERS.values()) for module in modules}
NAME = {module: layer for layer, modules in LAYERS.items() for module in modules}


def imported(path: Path) -> set[str]:
    """Every module `path` imports anywhere in it (top-level dotted names: trm_ray.spectrum, ray.train)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "trm_ray":  # from trm_ray import spectrum
                found.update(f"trm_ray.{alias.name}" for alias in node.names)
    return found


def package_imports(path: Path) -> set[str]:
    """The package's own modules that `path` imports (by their short names), itself left out."""
    own = {name.split(".")[1] for name in imported(path) if name.startswith("trm_ray.")}
    return own - {path.stem}


MODULES = {path.stem: path for path in sorted(PACKAGE.glob("*.py"))}
GRAPH = {name: package_imports(path) for name, path in MODULES.items()}


def test_every_module_has_a_layer_and_every_layer_entry_is_a_module():
    assert sorted(set(MODULES) - set(LEVEL)) == [], "place the new module in LAYERS"
    assert sorted(set(LEVEL) - set(MODULES)) == [], "a module in LAYERS no longer exists"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_only_from_its_layer_and_those_below(module):
    above = sorted(f"{other} ({NAME[other]})" for other in GRAPH[module] if LEVEL[other] > LEVEL[module])
    assert above == [], f"{module} ({NAME[module]}) imports from a layer above it"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if NAME.get(m) in RAY_FREE))
def test_the_core_below_the_shell_never_imports_ray(module):
    ray = sorted(name for name in imported(MODULES[module]) if name == "ray" or name.startswith("ray."))
    assert ray == [], f"{module} ({NAME[module]}) imports Ray, which only the shell and above may"


def test_there_is_no_import_cycle():
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for other in sorted(GRAPH[module]):
            visit(other, path + [module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])
