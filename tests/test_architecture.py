"""The import lines of ARCHITECTURE.md, checked on the source with ``ast`` (nothing is imported).

Every ``import`` and ``from … import`` statement of ``certbench/`` and ``methods/`` counts for the
forbidden lines, wherever it stands (module level, class body, function body). Only imports that run
when the module is imported count for the cycle check: those at module level or in a class body, not
those inside a function (a deliberate lazy import) nor under ``if TYPE_CHECKING:``. ``from a import b``
names the module ``a.b`` when that is a module of the repository, else ``a``; ``import a.b`` names
``a.b`` (its parent packages are already initialised, or being initialised, when a submodule runs, so
they form no cycle unless named). Imports by computed name (``importlib.import_module``) are invisible
here: the method, architecture and certificate discovery use them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("certbench", "methods")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # a repository module it imports (or the top-level name of a third-party one)
    line: int
    eager: bool  # runs when ``source`` is imported (not in a function, not under TYPE_CHECKING)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {
    _module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))
}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(node: ast.AST, eager: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, eager
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _statements(child, False)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for branch in child.body:
                yield from _statements(ast.Module(body=[branch], type_ignores=[]), False)
            for branch in child.orelse:
                yield from _statements(ast.Module(body=[branch], type_ignores=[]), eager)
        else:
            yield from _statements(child, eager)


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        base = ".".join([*anchor, *([base] if base else [])])
    submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
    return submodules + ([base] if len(submodules) < len(node.names) else [])


def _imports() -> list[Import]:
    found = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, eager in _statements(tree, True):
            for target in _targets(module, node):
                if target != module:
                    found.append(Import(module, target, node.lineno, eager))
    return found


IMPORTS = _imports()


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_method_module(name: str) -> bool:
    """A plug-in module ``methods/<name>.py``; ``methods/_<family>.py`` holds shared bases, not a method."""
    parts = name.split(".")
    return len(parts) == 2 and parts[0] == "methods" and not parts[1].startswith("_")


def _where(imp: Import) -> str:
    return f"{MODULES[imp.source].relative_to(REPO)}:{imp.line} imports {imp.target}"


def _repository(imp: Import) -> bool:
    return _under(imp.target, *PACKAGES)


# rule: (the importing modules, the only repository modules they may import (None: any but the
# forbidden; the package root ``certbench``, free of imports, is always allowed), those they must not import)
LINES: dict[str, tuple[tuple[str, ...], tuple[str, ...] | None, tuple[str, ...]]] = {
    "nn (layers) rests on nothing else of the repository": (("certbench.nn",), ("certbench.nn",), ()),
    "bounds rest on nn only": (("certbench.bounds",), ("certbench.nn", "certbench.bounds"), ()),
    "data, models, certificates and attacks never reach up to methods, training or evaluation": (
        (
            "certbench.data",
            "certbench.models",
            "certbench.certificates",
            "certbench.attacks",
            "certbench.applicability",
        ),
        None,
        (
            "methods",
            "certbench.method",
            "certbench.train",
            "certbench.evaluate",
            "certbench.cli",
            "certbench.catalogue",
        ),
    ),
    "methods are plug-ins: they build on the library, never on training, evaluation or outputs": (
        ("methods",),
        None,
        (
            "certbench.train",
            "certbench.evaluate",
            "certbench.cli",
            "certbench.catalogue",
            "certbench.records",
            "certbench.collect",
            "certbench.tables",
            "certbench.figures",
            "certbench.audit",
        ),
    ),
    "records, collect, tables, figures and the audit never import the torch side": (
        (
            "certbench.records",
            "certbench.storage",
            "certbench.collect",
            "certbench.tables",
            "certbench.figures",
            "certbench.plotting",
            "certbench.labels",
            "certbench.frontpage",
            "certbench.audit",
        ),
        None,
        (
            "methods",
            "certbench.nn",
            "certbench.bounds",
            "certbench.models",
            "certbench.certificates",
            "certbench.attacks",
            "certbench.method",
            "certbench.train",
            "certbench.evaluate",
        ),
    ),
}


@pytest.mark.parametrize("rule", sorted(LINES))
def test_forbidden_lines(rule: str) -> None:
    sources, allowed, forbidden = LINES[rule]
    crossing = [
        _where(imp)
        for imp in IMPORTS
        if _under(imp.source, *sources)
        and _repository(imp)
        and (
            _under(imp.target, *forbidden)
            or (allowed is not None and imp.target != "certbench" and not _under(imp.target, *allowed))
        )
    ]
    assert not crossing, f"{rule}:\n" + "\n".join(crossing)


def test_only_the_method_registry_imports_methods() -> None:
    """The library finds methods through :func:`certbench.method.get_method` and nothing else."""
    crossing = [
        _where(imp)
        for imp in IMPORTS
        if _under(imp.source, "certbench")
        and imp.source != "certbench.method"
        and _under(imp.target, "methods")
    ]
    assert not crossing, "\n".join(crossing)


def test_no_method_imports_a_sibling_method() -> None:
    """Code shared by methods lives in :mod:`certbench.method` or a ``methods/_<family>.py`` base module."""
    crossing = [
        _where(imp) for imp in IMPORTS if _under(imp.source, "methods") and _is_method_module(imp.target)
    ]
    assert not crossing, "\n".join(crossing)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that returns to its start, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_no_import_cycles() -> None:
    """Module-level imports among the repository's modules form no cycle (lazy imports in functions
    excepted)."""
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for imp in IMPORTS:
        if imp.eager and imp.target in MODULES:
            graph[imp.source].add(imp.target)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_checker_sees_what_it_checks() -> None:
    """Guard against a checker that passes because it finds nothing."""
    assert {"certbench.bounds.lirpa", "certbench.nn.linf_dist", "certbench.method", "methods.ibp"} <= set(
        MODULES
    )
    eager = {(imp.source, imp.target) for imp in IMPORTS if imp.eager}
    lazy = {(imp.source, imp.target) for imp in IMPORTS if not imp.eager}
    assert ("certbench.bounds.lirpa", "certbench.bounds.lirpa_compat") in eager
    assert ("certbench.bounds.linf_dist", "certbench.nn.linf_dist") in eager
    assert ("certbench.certificates", "certbench.applicability") in lazy  # inside Certificate.refusal
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
