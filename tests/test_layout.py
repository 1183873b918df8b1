"""The layout of the package, read from its source with ``ast`` (nothing is imported to check it).

Three products, each a subpackage, and imports only run downwards:

* ``sharpmeter.measure`` (the measurement library) imports only itself;
* ``sharpmeter.integrations`` (Trainer, Accelerate) imports the library;
* ``sharpmeter.paper`` (simulator, analyses, comparison, report) imports itself and the
  library's torch-free names, and nothing of it reaches torch (or the training stack);
* ``sharpmeter.harness`` (the GPT study) may import all of them;
* ``sharpmeter/__init__.py`` exports the library's user-facing names; ``sharpmeter/cli.py``
  wires every part's subcommands into the ``sharpmeter`` command.

No module imports the package root (``import sharpmeter``): its ``__init__`` imports the library,
so a module that needs a name takes it from the module that defines it. Every import counts,
whether at the top of a module, inside a function or under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

import sharpmeter

PACKAGE = Path(sharpmeter.__file__).parent
PRODUCTS = {"measure": "library", "integrations": "integrations", "harness": "harness"}
PRODUCTS["paper"] = "paper"
# What each part may import (besides the standard library and third-party packages).
MAY_IMPORT = {
    "library": {"library"},
    "integrations": {"library", "integrations"},
    "paper": {"library", "paper"},
    "harness": {"library", "integrations", "paper", "harness"},
    "root": {"library"},
    "cli": {"library", "integrations", "paper", "harness"},
}
# The training stack, which the paper side never loads.
TRAINING_STACK = {"torch", "transformers", "accelerate"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of the package by name (a package by its ``__init__.py``)."""
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def part(name: str) -> str:
    if name == "sharpmeter":
        return "root"
    if name == "sharpmeter.cli":
        return "cli"
    return PRODUCTS[name.split(".")[1]]


@cache
def imports(name: str) -> tuple[tuple[str, int], ...]:
    """What ``name`` imports, with line numbers: a module of the package by its full name (the
    root as ``sharpmeter``), any other by its top-level name (``torch``, ``json``)."""
    path = modules()[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from a import b` imports the module a.b when there is one, else a name of a
            targets = [
                f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules() else origin
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            top = target.split(".")[0]
            found.append((target if top == "sharpmeter" else top, node.lineno))
    return tuple(dict.fromkeys(found))


def _packages_above(name: str) -> list[str]:
    """The packages whose ``__init__`` runs before ``name``, the root left out: it is the one
    ``__init__`` that loads the library (and torch) for everything below it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


@cache
def loads(name: str) -> frozenset[str]:
    """Everything importing ``name`` loads: modules of the package and third-party top-level
    names, following the package's own imports and the ``__init__`` of each package above."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in modules() and current != "sharpmeter":
            todo += [target for target, _ in imports(current)]
            todo += _packages_above(current)
    return frozenset(seen)


def test_the_top_level_holds_the_three_products_and_the_command():
    top = {path.name for path in PACKAGE.iterdir() if not path.name.startswith((".", "__p"))}
    assert top == {"__init__.py", "cli.py", *PRODUCTS}
    assert all((PACKAGE / name / "__init__.py").is_file() for name in PRODUCTS)


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_run_downwards_only(name):
    allowed = MAY_IMPORT[part(name)]
    upward = [
        f"line {line}: {target} ({part(target)})"
        for target, line in imports(name)
        if target.startswith("sharpmeter.") and part(target) not in allowed
    ]
    assert not upward, f"{name} ({part(name)}) imports upwards: {upward}"


@pytest.mark.parametrize("name", sorted(set(modules()) - {"sharpmeter"}))
def test_no_module_imports_the_package_root(name):
    lines = [line for target, line in imports(name) if target == "sharpmeter"]
    assert not lines, f"{name} imports the package root (line {lines}): import the module instead"


PAPER = sorted(name for name in modules() if part(name) == "paper")


@pytest.mark.parametrize("name", PAPER)
def test_the_paper_side_loads_no_torch(name):
    """``sharpmeter.paper.analysis`` above all: the analyses run on a machine without torch."""
    stack = sorted(loads(name) & TRAINING_STACK)
    via = sorted(m for m in loads(name) if m in modules() and part(m) == "library")
    assert not stack, f"{name} loads {stack} (library modules it reaches: {via})"


def test_the_library_names_the_paper_side_reads_stay_torch_free():
    """The paper side reads the library's on-disk names from one module; it and the light
    ``__init__`` above it must stay free of torch for the rule above to hold."""
    assert "sharpmeter.measure.schema" in loads("sharpmeter.paper.report")
    assert "sharpmeter.measure.schema" in loads("sharpmeter.paper.analysis.runs")
    assert not imports("sharpmeter.measure") and not imports("sharpmeter.paper")
    assert not loads("sharpmeter.measure.schema") & TRAINING_STACK


def test_the_analyses_are_found_by_the_torch_check():
    # a guard against a walk that silently checks nothing
    assert {"sharpmeter.paper.analysis", "sharpmeter.paper.analysis.runs"} <= set(PAPER)
    assert "torch" in loads("sharpmeter.measure.meter")
    assert "torch" in loads("sharpmeter.harness.train")


def test_module_level_imports_have_no_cycle():
    """Imports at the top of a module (not in a function, not under ``TYPE_CHECKING``) form no
    cycle, so every module can be imported first."""
    graph = {name: _top_level_imports(name) for name in modules()}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2:
            return
        assert state.get(name) != 1, f"import cycle: {' -> '.join([*trail, name])}"
        state[name] = 1
        for target in graph[name]:
            visit(target, [*trail, name])
        state[name] = 2

    for name in graph:
        visit(name, [])


def _top_level_imports(name: str) -> list[str]:
    tree = ast.parse(modules()[name].read_text())
    lines = {node.lineno for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))}
    return [
        target
        for target, line in imports(name)
        if line in lines and target in modules() and target != "sharpmeter"
    ]


# The public API: a name added here is a promise to users, so it is added on purpose.
PUBLIC = {
    "CriticalSharpnessResult",
    "DirectionalSharpnessResult",
    "HessianOperator",
    "JsonlSink",
    "LanczosResult",
    "MeterOptions",
    "NonFiniteLossError",
    "ParameterVector",
    "ParametersWrittenError",
    "PowerIterationResult",
    "PreconditionedOperator",
    "Schedule",
    "SharpnessMeter",
    "TraceResult",
    "WandbSink",
    "__version__",
    "adam_preconditioner",
    "critical_sharpness",
    "directional_sharpness",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "learning_rate",
    "measurement",
    "power_iteration",
    "update_direction",
}


def test_the_public_api_is_small_and_resolves():
    assert set(sharpmeter.__all__) == PUBLIC  # sorted: ruff's RUF022
    for name in sharpmeter.__all__:
        assert getattr(sharpmeter, name) is not None, name
    # each from the library, where it is defined
    defined_in = {getattr(sharpmeter, name).__module__ for name in PUBLIC - {"__version__"}}
    assert all(module.startswith("sharpmeter.measure.") for module in defined_in), defined_in
