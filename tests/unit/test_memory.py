"""The allocator setting of jax_adapter.memory, applied by ``import jax_adapter`` (in subprocesses:
each needs a fresh allocator). What it is for, page faults and step time, is measured by
benchmarks/cpu/train_step.py; here its effect on freed memory is checked: a freed 256 MB block
stays in the process with the setting and goes back to the system without it.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from jax_adapter.memory import OPT_OUT, RETAIN_FREED_MEMORY, is_glibc, retains_freed_memory

ENV = {k: v for k, v in os.environ.items() if k not in RETAIN_FREED_MEMORY and k != OPT_OUT}
ENV["JAX_PLATFORMS"] = "cpu"
BLOCK = 256 << 20

pytestmark = pytest.mark.skipif(not is_glibc(), reason="the setting is glibc's (Linux); elsewhere nothing is applied")

# Resident memory before and after allocating and freeing a 256 MB block, and the status.
PROBE = f"""
    import json, os
    import numpy as np

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def probe():
        a = np.ones({BLOCK}, np.uint8)
        held = rss()
        del a
        return held - rss()   # what freeing gave back

    print(json.dumps({{"given_back": probe(), "status": jax_adapter.memory.status()}}))
"""


def run(prefix: str, env=None) -> dict:
    code = textwrap.dedent(prefix) + textwrap.dedent(PROBE)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=ENV if env is None else env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_applies_it_before_jax_starts():
    r = run("import jax_adapter\n")
    assert r["status"] == {"applied": True, "how": "mallopt", "reaches_jax_threads": True}
    assert r["given_back"] < BLOCK // 8  # kept for reuse


def test_opt_out_leaves_glibc_alone():
    r = run("import jax_adapter\n", env={**ENV, OPT_OUT: "0"})
    assert r["status"]["applied"] is False
    assert r["given_back"] > BLOCK * 7 // 8  # a large block is mmap'd and unmapped


def test_release_gives_the_defaults_back():
    r = run("import jax_adapter\njax_adapter.memory.release_freed_memory()\n")
    assert r["status"]["applied"] is False and r["given_back"] > BLOCK * 7 // 8


def test_applied_after_jax_started_is_reported():
    r = run("""
        import jax, jax.numpy as jnp
        jnp.ones(3).block_until_ready()   # the CPU backend and its threads start
        import jax_adapter
    """)
    assert r["status"] == {"applied": True, "how": "mallopt", "reaches_jax_threads": False}


def test_the_environment_form():
    assert RETAIN_FREED_MEMORY == {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "-1"}
    assert not retains_freed_memory({"MALLOC_ARENA_MAX": "1"}) and retains_freed_memory(RETAIN_FREED_MEMORY)
    r = run("import jax_adapter\n", env={**ENV, **RETAIN_FREED_MEMORY, OPT_OUT: "0"})
    assert r["status"]["how"] == "environment" and r["given_back"] < BLOCK // 8
