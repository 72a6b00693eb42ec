"""The package's modules import each other downward only (issue 11, point 5).

Layers: ``cli`` -> ``guard`` -> ``http`` / ``middleware`` / ``admin`` -> ``keys`` / ``rate`` /
``audit`` / ``ip`` -> ``config`` / ``_util`` -> ``_core``. A lower layer that needs the guard
is handed it and uses its public methods (``Guard.record_event``, ``Guard.record_refusal``...);
it does not reach into the guard's private members.

Both checks read the source with :mod:`ast`; nothing is imported:

* the import graph counts every ``import`` of a ``fastmcp_guard`` module, at module level
  and inside functions (an import that runs later is still a dependency), but not those
  under ``if TYPE_CHECKING:`` (annotations only). Relative imports are resolved, and
  ``from package import name`` points at the submodule when ``name`` is one. The edge goes
  to the module named, not to its parent packages (Python initialises those first, but a
  package importing its own submodules would otherwise always be a cycle). The package's
  lazy ``__getattr__`` (``importlib.import_module`` of a name held in a string) is not an
  import statement and is not counted;
* the private-member check flags ``<x>._name`` where ``<x>`` is a name ``guard`` or
  ``Guard``, or an attribute ``.guard`` / ``._guard`` (``self.guard._refused``), in any
  module but ``guard.py``.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "fastmcp_guard"


def _package_root() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None and spec.submodule_search_locations, f"{PACKAGE} is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def _modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` (and stub-only ``.pyi``) file."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi") or "__pycache__" in path.parts:
            continue
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if path.suffix == ".py" or name not in found:  # an extension's stub: a leaf
            found[name] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: module level, in functions and classes, in
    ``try`` blocks; not in the body of ``if TYPE_CHECKING:`` (its ``else`` runs)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the package."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _targets(
    module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]
) -> set[str]:
    package = module.split(".")[0]
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        return {t for n in names if n.split(".")[0] == package
                if (t := _known(n, modules)) is not None}  # fmt: skip
    if node.level:
        base = module.split(".") if path.stem == "__init__" else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join([*base, node.module] if node.module else base)
    else:
        source = node.module or ""
    if source.split(".")[0] != package:
        return set()
    out: set[str] = set()
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        target = sub if sub in modules else _known(source, modules)
        if target is not None:
            out.add(target)
    return out


Edges = dict[str, dict[str, str]]


def import_graph(root: Path, package: str) -> Edges:
    """module -> {imported module: where (``file:line`` of the first such import)}."""
    modules = _modules(root, package)
    graph: Edges = {name: {} for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _import_nodes(tree):
            for target in _targets(name, path, node, modules):
                if target != name:
                    where = f"{path.relative_to(root).as_posix()}:{node.lineno}"
                    previous = graph[name].get(target)
                    if previous is None or _line(where) < _line(previous):
                        graph[name][target] = where
    return graph


def _line(where: str) -> int:
    return int(where.rsplit(":", 1)[1])


def _components(graph: Edges) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def import_cycles(graph: Edges, limit: int = 200) -> list[list[str]]:
    """The elementary cycles (each as ``[a, b, ..., a]``, starting at its smallest
    module), at most ``limit`` of them; empty when the graph is acyclic."""
    cycles: list[list[str]] = []
    for component in _components(graph):
        members = set(component)
        for start in component:
            allowed = {m for m in members if m > start}

            def walk(node: str, path: list[str], start: str = start,
                     allowed: set[str] = allowed) -> None:  # fmt: skip
                for succ in sorted(graph[node]):
                    if len(cycles) >= limit:
                        return
                    if succ == start:
                        cycles.append([*path, start])
                    elif succ in allowed and succ not in path:
                        walk(succ, [*path, succ])

            walk(start, [start])
    return cycles


def describe(cycle: list[str], graph: Edges, package: str) -> str:
    """``config -> keys (config.py:497) -> config (keys/__init__.py:362)``."""
    short = [m.removeprefix(package + ".") if m != package else m for m in cycle]
    steps = [short[0]]
    for (src, dst), name in zip(itertools.pairwise(cycle), short[1:]):
        steps.append(f"{name} ({graph[src][dst]})")
    return " -> ".join(steps)


def test_the_package_has_no_import_cycle() -> None:
    root = _package_root()
    graph = import_graph(root, PACKAGE)
    assert graph.get(f"{PACKAGE}.guard"), "the walker saw no import of guard.py"
    cycles = import_cycles(graph)
    if cycles:
        pytest.fail(f"{len(cycles)} import cycle(s) in {PACKAGE}:\n"
                    + "\n".join(describe(c, graph, PACKAGE) for c in cycles))  # fmt: skip


# -- the walker itself: it sees what it must, and only that -----------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


def test_the_walker_counts_imports_in_functions_and_relative_ones(tmp_path: Path) -> None:
    _write(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg import b\n",
        "b.py": "def later():\n    from .sub import c\n",
        "sub/__init__.py": "",
        "sub/c.py": "import pkg.a\n",
        "_ext.pyi": "def f() -> int: ...\n",
        "d.py": "from pkg._ext import f\nfrom . import a\n",
    })  # fmt: skip
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.b": "a.py:1"}
    assert graph["pkg.b"] == {"pkg.sub.c": "b.py:2"}
    assert graph["pkg.sub.c"] == {"pkg.a": "sub/c.py:1"}
    assert graph["pkg.d"] == {"pkg._ext": "d.py:1", "pkg.a": "d.py:2"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    assert describe(import_cycles(graph)[0], graph, "pkg") == (
        "a -> b (a.py:1) -> sub.c (b.py:2) -> a (sub/c.py:1)"
    )


def test_the_walker_ignores_type_checking_imports(tmp_path: Path) -> None:
    _write(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg.b import X\n",
        "b.py": """
            import typing
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from pkg.a import Y
            if typing.TYPE_CHECKING:
                import pkg.a
            else:
                import pkg.c
            X = 1
        """,
        "c.py": "",
    })  # fmt: skip
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.b"] == {"pkg.c": "b.py:9"}
    assert import_cycles(graph) == []


# -- nobody else touches Guard's private members -----------------------------------------

_GUARD_NAMES = frozenset({"guard", "Guard"})
_GUARD_ATTRIBUTES = frozenset({"guard", "_guard"})


def _holds_guard(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id in _GUARD_NAMES) or (
        isinstance(node, ast.Attribute) and node.attr in _GUARD_ATTRIBUTES
    )


def private_guard_uses(source: str, filename: str) -> list[str]:
    """``file:line guard._name`` for every private attribute read or written on a guard."""
    found = sorted(
        (node.lineno, node.col_offset, ast.unparse(node))
        for node in ast.walk(ast.parse(source, filename=filename))
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and _holds_guard(node.value)
    )
    return [f"{filename}:{line} {text}" for line, _, text in found]


def test_only_guard_py_touches_private_members_of_guard() -> None:
    root = _package_root()
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel != "guard.py":
            found += private_guard_uses(path.read_text(encoding="utf-8"), rel)
    if found:
        pytest.fail("modules reach into Guard's private members:\n" + "\n".join(found))


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ("guard._refused('x')", ["m.py:1 guard._refused"]),
        ("self.guard._local_caller()", ["m.py:1 self.guard._local_caller"]),
        ("self._guard._audit_event('ok')", ["m.py:1 self._guard._audit_event"]),
        ("guard._admin_socket = 'p'", ["m.py:1 guard._admin_socket"]),
        ("Guard._x", ["m.py:1 Guard._x"]),
        ("guard.record_event('ok')", []),
        ("self._guard.ip", []),
        ("guard.__class__", []),
        ("other._private", []),
    ],
)
def test_the_private_member_check(source: str, flagged: list[str]) -> None:
    assert private_guard_uses(source, "m.py") == flagged
