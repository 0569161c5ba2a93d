"""``benchmarks/cpu/xla_flags.py``: every option set it compares is one that the installed XLA
accepts and that changes the compiled program where it claims to (XLA aborts the process on an
unknown flag, so a renamed option would otherwise only show when the benchmark runs)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.cpu.xla_flags import OPTION_SETS
from tests.helpers import ROOT

# A product followed by elementwise work and a reduction: which library runs the product shows
# in the compiled program's fusion kinds.
PROGRAM = """
import jax, jax.numpy as jnp
f = jax.jit(lambda a, b: jnp.exp(a @ b).sum(-1))
text = f.lower(jnp.ones((64, 32)), jnp.ones((32, 48))).compile().as_text()
print("ynn" if '"__ynn_fusion"' in text else "no-ynn")
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_option_set_is_accepted_by_xla(name):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=OPTION_SETS[name])
    proc = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The sets that turn YNNPACK off must reach a program without its fusions; the others keep them.
    ynn_off = "--xla_cpu_experimental_ynn_fusion_type= " in OPTION_SETS[name] + " "
    assert proc.stdout.strip().splitlines()[-1] == ("no-ynn" if ynn_off else "ynn"), (name, proc.stdout)
