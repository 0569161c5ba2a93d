"""Fixtures shared by every test folder (helpers are plain functions in ``tests/helpers.py``)."""

import os
import pathlib

import pytest

# The test extra installs JAX's TPU and CUDA compilers (for the plan tests). Without such devices
# JAX would try to start them, and fail loudly, before falling back to the CPU: the tests run on
# the CPU unless JAX_PLATFORMS says otherwise (JAX_PLATFORMS=cuda runs them on a GPU).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tests.helpers import FIXTURES

# Parallel runs (pytest-xdist, `-n auto`; pyproject's addopts choose `--dist loadfile`): a test
# file's tests go to one worker, so that its module fixtures (training runs shared by several
# tests) are computed once. Files are handed out in the order below: the longest first, so that
# the workers finish together, then every other file with slow tests, then the rest.
LONGEST_FIRST = ("tests/integration/test_training_cli.py", "tests/integration/test_readme_training.py",
                 "tests/integration/test_readme.py", "tests/integration/test_training.py",
                 "tests/integration/test_plan.py", "tests/unit/test_training_run.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    def path(item) -> str:
        return item.nodeid.split("::")[0]

    slow_files = {path(i) for i in items if i.get_closest_marker("slow")}

    def rank(item) -> int:
        p = path(item)
        return LONGEST_FIRST.index(p) if p in LONGEST_FIRST else len(LONGEST_FIRST) + (p not in slow_files)

    items.sort(key=rank)  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


@pytest.fixture
def gpu_target():
    """Dispatch traces for an sm_90 GPU that this process pretends to have (not ahead of time, so
    the Pallas compile check runs, on the CPU device, where it fails as a broken GPU toolchain
    would)."""
    import jax_adapter

    with jax_adapter.target("gpu", compute_capability="9.0", ahead_of_time=False) as t:
        yield t
