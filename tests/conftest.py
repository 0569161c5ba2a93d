"""Fixtures shared by every test folder (helpers are plain functions in ``tests/helpers.py``)."""

import pathlib

import pytest

from tests.helpers import FIXTURES


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES
