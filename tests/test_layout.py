"""The package's structure, drawn from its imports: no cycles, and every import points down the layers that
README's "Architecture" section draws (a module imports only its own layer or lower ones)."""

from __future__ import annotations

import ast
from pathlib import Path

import peft_ft

PACKAGE = Path(peft_ft.__file__).parent

# Bottom first. A module belongs to the first entry its dotted name starts with.
LAYERS = [
    ("peft_ft.errors", "peft_ft.log", "peft_ft.version"),
    ("peft_ft.recipe.schema", "peft_ft.recipe.dump", "peft_ft.storage"),
    ("peft_ft.data", "peft_ft.models", "peft_ft.kernels"),
    ("peft_ft.methods",),
    ("peft_ft.tasks",),
    ("peft_ft.recipe",),  # load and explain: the schema checked against the registries of methods and tasks
    ("peft_ft.rundir",),
    ("peft_ft.engine",),
    ("peft_ft.serving", "peft_ft.compare", "peft_ft.sweep"),
    ("peft_ft.cli", "peft_ft.__main__", "peft_ft"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports, at its top or inside functions (both are dependencies)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("peft_ft") and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("peft_ft")]
        for name in names:
            while name not in known and "." in name:  # `from peft_ft.tasks import TASKS` -> peft_ft.tasks
                name = name.rsplit(".", 1)[0]
            if name in known:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, set(known)) - {name} for name, path in known.items()}


def layer(name: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if name in prefixes or any(name.startswith(p + ".") for p in prefixes if p != "peft_ft"):
            return i
    raise AssertionError(f"{name} has no layer: add it to LAYERS (and to README's Architecture section)")


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)


def test_imports_point_down_the_layers():
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})" for a, deps in graph().items() for b in deps if layer(b) > layer(a)]
    assert upward == []


def test_no_import_cycles():
    edges, state, cycles = graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(edges[node]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_check_sees_a_planted_upward_import(tmp_path):
    """The graph above is read from the files: a planted upward import is found (the tests can fail)."""
    known = modules()
    schema = known["peft_ft.recipe.schema"]
    planted = tmp_path / "schema.py"
    planted.write_text(schema.read_text(encoding="utf-8") + "\n\ndef _x():\n    from peft_ft.tasks import TASKS\n", encoding="utf-8")
    assert "peft_ft.tasks" in imports(planted, set(known))
    assert layer("peft_ft.tasks") > layer("peft_ft.recipe.schema")


def test_every_module_imports():
    """A name imported from where it no longer lives fails here, whichever command would have reached it."""
    import importlib

    for name in sorted(modules()):
        if name != "peft_ft.__main__":  # runs the CLI
            importlib.import_module(name)
