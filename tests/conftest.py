import pathlib

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


def load_npz(name: str) -> dict:
    with np.load(FIXTURES / name) as d:
        return {k: d[k] for k in d.files}


def rel_err(actual, expected) -> float:
    """Largest absolute error relative to the largest magnitude of ``expected``."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def run_cli(argv, capsys):
    """``jax-adapter argv`` in-process -> ``(exit code, stdout, stderr)`` of that call alone."""
    from jax_adapter.cli import main

    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def run_cli_ok(argv, capsys):
    """Like :func:`run_cli` for a call that must succeed and print one JSON record."""
    import json

    rc, out, err = run_cli(argv, capsys)
    assert rc == 0, err
    return json.loads(out)
