"""The allocator setting of jax_adapter.memory: the environment it sets and the re-execution
that applies it (a subprocess: glibc reads the setting only when a program starts).

What the setting is for, page faults and step time, is measured by benchmarks/train_step.py
(the page faults per call are in its record); how many pages a call faults in depends on how
the heap happens to fragment, so it is not asserted here.
"""

import os
import subprocess
import sys
import textwrap

from jax_adapter.memory import (RETAIN_FREED_MEMORY, is_glibc, retaining_environ,
                                retains_freed_memory)

ENV = {k: v for k, v in os.environ.items() if k not in RETAIN_FREED_MEMORY}
ENV["JAX_PLATFORMS"] = "cpu"


def run(code: str, *args: str, env=None) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=ENV if env is None else env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_environment():
    assert RETAIN_FREED_MEMORY == {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "-1"}
    assert not retains_freed_memory({"MALLOC_ARENA_MAX": "1"})
    env = retaining_environ({"PATH": "/bin", "MALLOC_ARENA_MAX": "4"})
    assert env["PATH"] == "/bin" and retains_freed_memory(env)


def test_reexec_once_with_the_setting():
    out = run("""
        import os, sys
        print("start", flush=True)
        from jax_adapter.memory import reexec_retaining_freed_memory, retains_freed_memory
        reexec_retaining_freed_memory()
        print("args", sys.argv[1:], "retains", retains_freed_memory())
    """, "--flag")
    if is_glibc():
        # The first run prints "start" and is replaced; the second prints both lines.
        assert out.split("\n")[:3] == ["start", "start", "args ['--flag'] retains True"], out
    else:
        assert out.split("\n")[:2] == ["start", "args ['--flag'] retains False"], out
