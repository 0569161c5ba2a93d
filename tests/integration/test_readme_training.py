"""README.md's blocks from the heading of ``jax-adapter train`` on (command-line training runs,
the memory benchmark), run in order in a scratch directory of their own (``tests/readme_blocks.py``)."""

from __future__ import annotations

import json

import pytest

from tests.readme_blocks import ROOT, run_part


@pytest.mark.slow
def test_readme_training_blocks_run_in_order(tmp_path):
    recorded = ROOT / "benchmarks" / "results" / "train_memory-cpu.json"
    before = recorded.read_bytes() if recorded.exists() else None
    work, _ = run_part(2, tmp_path, at_least=2)
    records = json.loads((work / "runs" / "smoke" / "run.json").read_text())
    assert records["optimizer"]["total_steps"] == 8  # the extended run's stretched schedule
    # The memory benchmark writes only where told (--out).
    assert (recorded.read_bytes() if recorded.exists() else None) == before
