"""The package's floors (docs/architecture.md): a module imports only from its own floor or below, the
import graph has no circle, and imports of the package's own modules sit at the top of files.

Read off the source with ``ast`` (imports inside functions included), so a lazy import cannot hide an
arrow that runs up a floor or closes a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "deconvlab"

# Lowest first. A module belongs to the floor of the longest prefix that names it.
FLOORS: list[tuple[str, ...]] = [
    ("errors", "console", "tiling"),
    ("config", "perf", "boxes", "macs", "models", "data", "model_list"),
    ("volume",),
    ("tasks",),
    ("tracking", "store", "access", "locks"),
    ("callbacks", "build"),
    ("cost", "model_io"),
    ("train", "evaluate", "compare", "predict", "promote", "runs", "datacheck"),
    ("sweep",),
    ("cli", "__main__", "api", "completion"),
]
# The package root imports nothing; were it to, it would stand on the top floor.
ROOT_FLOOR = len(FLOORS) - 1
# The command line imports each verb when its command runs: importing them all up front would cost
# every `deconvlab --help` the start-up of torch, Lightning and MLflow (docs/architecture.md has the figures).
LAZY_IMPORTS_ALLOWED = {"deconvlab.cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def floor_of(module: str) -> int:
    """The index of the floor ``module`` lives on."""
    relative = module.removeprefix("deconvlab").lstrip(".")
    if not relative:
        return ROOT_FLOOR
    best, best_len = None, -1
    for index, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (relative == prefix or relative.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS and docs/architecture.md")
    return best


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at top level)`` for every import of a package module in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, path.name == "__init__.py")
            # `from deconvlab.x import y` imports the module deconvlab.x.y when y is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            if target.split(".")[0] == "deconvlab" and target != "deconvlab":
                while target not in known and "." in target:
                    target = target.rsplit(".", 1)[0]
                found.append((target, node.lineno, id(node) in top_level))
    return found


def import_graph() -> dict[str, list[tuple[str, int, bool]]]:
    modules = all_modules()
    known = set(modules)
    return {m: [i for i in imports_of(m, p, known) if i[0] != m] for m, p in modules.items()}


def test_no_module_imports_from_a_higher_floor():
    upward = [f"{m}:{line} imports {target} (floor {floor_of(target)} > {floor_of(m)})"
              for m, imports in import_graph().items() for target, line, _ in imports
              if floor_of(target) > floor_of(m)]
    assert not upward, "\n".join(upward)


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (circle := visit(nxt, [*path, nxt])):
                return circle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (circle := visit(start, [start])):
            return circle
    return None


def test_the_import_graph_has_no_circle():
    graph = {m: {t for t, _, _ in imports} for m, imports in import_graph().items()}
    # A package's __init__ re-exporting its modules is not a circle with them.
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))


def test_the_package_imports_its_own_modules_at_the_top_of_files():
    lazy = [f"{m}:{line} imports {target} inside a function" for m, imports in import_graph().items()
            if m not in LAZY_IMPORTS_ALLOWED for target, line, top in imports if not top]
    assert not lazy, "\n".join(lazy)


def test_the_checker_sees_circles_and_upward_arrows():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None
    assert floor_of("deconvlab.sweep.runner") > floor_of("deconvlab.train") > floor_of("deconvlab.build")
    assert floor_of("deconvlab.tasks.volumetric") > floor_of("deconvlab.volume.dense") > floor_of("deconvlab.data")
    with pytest.raises(AssertionError, match="on no floor"):
        floor_of("deconvlab.somewhere_new")
