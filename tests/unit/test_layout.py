"""The package's structure, checked on the source: no import cycles, model code never imports the
converters, the kernels import nothing of the project, no generic top-level names."""

import ast
import pathlib
from typing import Dict, Iterator, List, Set, Tuple

from tests.helpers import ROOT

# Repository folder -> the package it installs as.
PACKAGES = {"jax_adapter": "jax_adapter", "convert": "jax_adapter.convert",
            "pallas_kernels": "jax_adapter.pallas_kernels"}


def _module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    parts[0] = PACKAGES.get(parts[0], parts[0])
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _import_pairs(path: pathlib.Path, module: str = "") -> Iterator[Tuple[str, str]]:
    """``(module, name)`` of everything ``path`` imports (top level or inside functions; ``name``
    is ``""`` for ``import module``); relative imports resolved against ``module``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, "") for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            yield from ((source, alias.name) for alias in node.names)


def _imports(path: pathlib.Path, module: str = "") -> Iterator[str]:
    """Absolute names of everything ``path`` imports: each module, and each ``module.name``."""
    for source, name in _import_pairs(path, module):
        yield source
        if name:
            yield f"{source}.{name}"


def import_graph(files: Dict[str, pathlib.Path]) -> Dict[str, Set[str]]:
    """``{module: modules of the package it imports}``: a ``from a import b`` counts as importing
    the submodule ``a.b`` when there is one, else ``a``. A package's own ``__init__`` that a
    submodule's import runs implicitly is not an edge (Python orders those itself)."""
    graph = {}
    for module, path in files.items():
        edges = set()
        for source, name in _import_pairs(path, module):
            target = f"{source}.{name}" if f"{source}.{name}" in files else source
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != module:
                edges.add(target)
        graph[module] = edges
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_files(root: pathlib.Path = ROOT) -> Dict[str, pathlib.Path]:
    return {_module_name(p, root): p for folder in PACKAGES for p in sorted((root / folder).rglob("*.py"))}


def _violations(folder: str, forbidden, allowed_files=()):
    """``folder``'s imports of ``forbidden`` packages (its own package's modules aside)."""
    own = PACKAGES.get(folder, folder)
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if any(rel.startswith(a) for a in allowed_files):
            continue
        for name in _imports(path, _module_name(path)):
            if name == own or name.startswith(own + "."):
                continue
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{rel} imports {name}")
    return bad


def test_no_import_cycle_inside_the_package():
    graph = import_graph(_package_files())
    assert len(graph) > 50 and graph["jax_adapter.models.dinov2.adapter"]
    found = cycles(graph)
    assert not found, found


def test_model_package_does_not_import_convert():
    # Only the command line and pretrained's composition of fetching and converting use the
    # converters.
    bad = _violations("jax_adapter", ("jax_adapter.convert", "convert"),
                      allowed_files=("jax_adapter/cli/", "jax_adapter/pretrained.py"))
    assert not bad, bad


def test_kernels_import_nothing_of_the_project():
    bad = _violations("pallas_kernels", ("jax_adapter", "convert"))
    assert not bad, bad


def test_no_generic_top_level_names():
    # The repository folders convert/ and pallas_kernels/ are imported inside jax_adapter only.
    bad = []
    for folder in ("jax_adapter", "convert", "tests", "benchmarks"):
        bad += _violations(folder, ("convert", "pallas_kernels"))
    assert not bad, bad


def test_the_checkers_can_fail(tmp_path):
    pkg = tmp_path / "jax_adapter"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from jax_adapter.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import c\n")
    (pkg / "c.py").write_text("import jax_adapter.a\nfrom jax_adapter.convert.keys import slots\n")
    files = {_module_name(p, tmp_path): p for p in sorted(pkg.rglob("*.py"))}
    assert "jax_adapter.convert.keys" in set(_imports(files["jax_adapter.c"], "jax_adapter.c"))
    graph = import_graph(files)
    assert graph["jax_adapter.sub.b"] == {"jax_adapter.c"}
    assert cycles(graph) == [["jax_adapter.a", "jax_adapter.c", "jax_adapter.sub.b"]]


def _backend_reads(root: pathlib.Path, folders=("jax_adapter", "convert")) -> List[str]:
    """Calls of ``jax.default_backend()`` in library code (the command line's messages aside)."""
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel.startswith("jax_adapter/cli/"):
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "default_backend"):
                    found.append(f"{rel}:{node.lineno}")
    return found


def test_dispatch_reads_the_compilation_target_not_the_backend(tmp_path):
    # Which kernel or formulation runs is decided from jax_adapter.compilation, so that a
    # program compiled for another platform takes that platform's paths.
    assert _backend_reads(ROOT) == []
    (tmp_path / "jax_adapter").mkdir()
    (tmp_path / "jax_adapter" / "x.py").write_text("import jax\nif jax.default_backend() == 'gpu':\n    pass\n")
    assert _backend_reads(tmp_path, ("jax_adapter",)) == ["jax_adapter/x.py:2"]
