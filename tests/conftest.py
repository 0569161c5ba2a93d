"""Fixtures shared by every test folder (helpers are plain functions in ``tests/helpers.py``)."""

import os
import pathlib

import pytest

# The test extra installs JAX's TPU and CUDA compilers (for the plan tests). Without such devices
# JAX would try to start them, and fail loudly, before falling back to the CPU: the tests run on
# the CPU unless JAX_PLATFORMS says otherwise (JAX_PLATFORMS=cuda runs them on a GPU).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tests.helpers import FIXTURES


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
