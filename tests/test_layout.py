"""The import layout: no import cycles among shipped modules, and who may import whom.

Read from the source (``ast``), not by importing it: a cycle hidden behind a function-level import
is still one (the two modules cannot be understood, tested or moved apart), so imports inside
functions count. Imports under ``if TYPE_CHECKING:`` never run; they are checked separately, with
the type-only back edges that remain listed below (the list may only shrink).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("stream_server", "vad", "benchmarks", "granite_stream_testing")
PRODUCT = ("stream_server", "vad")

TYPE_ONLY_BACK_EDGES = {
    # The connection shell and the HTTP routes annotate their host as StreamServer, which imports them.
    ("stream_server.server.connection", "stream_server.server.app"),
    ("stream_server.server.http_api", "stream_server.server.app"),
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(module: str, path: Path, type_checking: bool) -> set[str]:
    """Every module name ``path`` imports, anywhere in it (``from a import b`` gives ``a.b`` and ``a``)."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in _walk(ast.parse(path.read_text(), str(path)), type_checking):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def _walk(node: ast.AST, type_checking: bool):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child) and not type_checking:
            for other in child.orelse:
                yield other
                yield from _walk(other, type_checking)
            continue
        yield child
        yield from _walk(child, type_checking)


def import_graph(root: Path, packages: tuple[str, ...], type_checking: bool = False) -> dict[str, set[str]]:
    """Module → the modules of ``packages`` it imports (the most specific existing module per name)."""
    paths = {_module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        edges = set()
        for name in _imported_names(module, path, type_checking):
            while name and name not in paths:
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.add(name)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _importers(graph: dict[str, set[str]], prefix: str) -> set[str]:
    return {m for m, edges in graph.items() if any(e == prefix or e.startswith(prefix + ".") for e in edges)}


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import g\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import x\n")
    (pkg / "d.py").write_text("import pkg.a\n")
    assert cycles(import_graph(tmp_path, ("pkg",))) == []
    assert cycles(import_graph(tmp_path, ("pkg",), type_checking=True)) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_no_import_cycles_among_shipped_modules():
    assert cycles(import_graph(ROOT, SHIPPED)) == []


def test_no_type_level_cycles_beyond_the_listed_back_edges():
    graph = import_graph(ROOT, SHIPPED, type_checking=True)
    for source, target in TYPE_ONLY_BACK_EDGES:
        assert target in graph[source], f"{source} no longer imports {target}: drop it from the list"
        graph[source].discard(target)
    assert cycles(graph) == []


def test_the_product_imports_benchmarks_only_for_the_bench_subcommand_and_no_test_support():
    graph = import_graph(ROOT, (*PRODUCT, "benchmarks", "granite_stream_testing"))
    product = {m: edges for m, edges in graph.items() if m.split(".")[0] in PRODUCT}
    assert _importers(product, "benchmarks") == {"stream_server.cli"}
    assert _importers(product, "granite_stream_testing") == set()


def test_tests_import_benchmarks_only_in_the_benchmarks_own_tests():
    importers = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "tests").rglob("*.py")
        if any(name == "benchmarks" or name.startswith("benchmarks.")
               for name in _imported_names("tests.x", path, type_checking=True))
    }
    assert importers and all(p.startswith("tests/benchmarks/") for p in importers), sorted(importers)


# What each layer may import from the product besides itself (prefixes). A layer never imports one
# above it: the sans-I/O core sees only the neutral inference types; engines see the types and the
# process memory upkeep; the inference layer sees the engine interface; the server shell sees the
# core, inference and the engine interface, but no protocol adapter (they reach it as routes).
LAYERS = {
    "stream_server.core": ("stream_server.core", "stream_server.inference.types", "stream_server.speakers.clustering", "vad"),
    "stream_server.engines": ("stream_server.engines", "stream_server.inference.types", "stream_server.inference.memory",
                              "stream_server.speakers"),
    "stream_server.speakers": ("stream_server.speakers", "stream_server.inference.types", "stream_server.engines.base"),
    "stream_server.inference": ("stream_server.inference", "stream_server.engines.base"),
    "stream_server.adapters": ("stream_server.adapters", "stream_server.core", "stream_server.inference.types",
                               "stream_server.server.connection", "stream_server.speakers.clustering"),
    # The shell knows no foreign protocol: adapters are handed to it as routes (StreamServer(routes=...)).
    "stream_server.server": ("stream_server.server", "stream_server.core", "stream_server.inference",
                             "stream_server.engines.base"),
    "vad": ("vad",),
}

# Single modules allowed one edge more than their layer, each with the reason (the list may only shrink).
MODULE_EXCEPTIONS = {
    # A Ray Serve replica runs in a process of its own (also deployed from a YAML file, with no caller
    # to hand it an engine), so it builds its engine there with load_engine (and RayPoolSettings takes
    # the engine section's defaults from EngineSettings).
    ("stream_server.inference.ray_pool", "stream_server.engines"),
}


def _allowed(target: str, prefixes: tuple[str, ...]) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def _docstring_only_packages() -> set[str]:
    """Packages whose ``__init__`` imports nothing: ``from pkg import module`` reaches only the module."""
    return {
        _module_name(path, ROOT)
        for pkg in PRODUCT
        for path in (ROOT / pkg).rglob("__init__.py")
        if not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(ast.parse(path.read_text())))
    }


def test_no_layer_imports_a_layer_above_it():
    graph = import_graph(ROOT, PRODUCT, type_checking=True)
    empty = _docstring_only_packages()
    upward = sorted(
        (module, target)
        for module, edges in graph.items()
        for layer, allowed in LAYERS.items()
        if module == layer or module.startswith(layer + ".")
        for target in edges - empty
        if not _allowed(target, allowed)
    )
    assert upward == sorted(MODULE_EXCEPTIONS)


def test_the_session_imports_no_engine_package():
    graph = import_graph(ROOT, PRODUCT, type_checking=True)
    assert not {e for e in graph["stream_server.core.session"] if e.startswith("stream_server.engines")}
