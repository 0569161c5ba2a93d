"""The package's dependency direction, checked on the source: model code never imports the
converters, and the kernels import nothing of the project."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _imports(path: pathlib.Path):
    """Absolute module names imported anywhere in ``path`` (top level or inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _violations(folder: str, forbidden, allowed_files=()):
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if any(rel.startswith(a) for a in allowed_files):
            continue
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{rel} imports {name}")
    return bad


def test_model_package_does_not_import_convert():
    # Only the command line and load_pretrained's composition of fetching and converting use the
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


def test_checker_sees_a_violation(tmp_path):
    # The checker itself must be able to fail.
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from jax_adapter.convert.keys import slots\n")
    assert "jax_adapter.convert.keys" in set(_imports(f))
