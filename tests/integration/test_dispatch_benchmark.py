"""``benchmarks/cpu/dispatch.py`` runs end to end on the tiny preset and, with ``--no-write``,
writes no results file."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
@pytest.mark.multiprocess
def test_dispatch_benchmark_reports_both_calls_and_writes_nothing(tmp_path):
    results = ROOT / "benchmarks" / "results" / "dispatch-cpu.json"
    before = results.stat().st_mtime_ns if results.exists() else None
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cpu.dispatch", "--preset", "tiny", "--reps", "2",
                           "--no-write"], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("nnx.jit", "jax.jit"):
        assert re.search(rf"{re.escape(name)}\s+returns after\s+[\d.]+ ms; whole call\s+[\d.]+ ms", proc.stdout), proc.stdout
    assert re.search(r"\(\d+ graph nodes, \d+ arrays\)", proc.stdout), proc.stdout
    assert "wrote" not in proc.stdout
    assert (results.stat().st_mtime_ns if results.exists() else None) == before
