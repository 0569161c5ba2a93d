"""The allocator setting that makes CPU training steps fast.

XLA:CPU allocates the buffers of a step afresh and frees them at the end (about 3 GB per step
for the ViT-S adapter, batch 2, 256x704). glibc serves such large blocks with ``mmap`` and hands
them back with ``munmap``, so every step touches brand-new pages: about 750,000 page faults and
1.8 s of kernel time per step there, a third of the step. With

    MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1

glibc serves large blocks from its heap and keeps freed memory for reuse, so after the first few
steps a step's buffers land on pages an earlier step already touched (measured: the train step
in 0.7x of the time; PyTorch in the same process gains a little too). The price: the process
keeps its peak heap instead of shrinking between steps, which a training loop reaches again
every step anyway.

glibc reads these variables when a program starts, and a thread's malloc arena is fixed at its
first allocation, so they cannot be applied from inside a running Python process reliably: set
them in the environment of the program, or let ``jax-adapter train`` do it (it re-executes
itself once with them set, unless given ``--release-memory``). Other allocators (musl, macOS)
are left alone.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Dict, List, Mapping, Optional

RETAIN_FREED_MEMORY: Dict[str, str] = {
    "MALLOC_ARENA_MAX": "1",          # one arena: the main one, which grows the heap with brk
    "MALLOC_MMAP_MAX_": "0",          # no mmap for large blocks
    "MALLOC_TRIM_THRESHOLD_": "-1",   # never give the heap's free top back
}


def is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def retains_freed_memory(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether ``environ`` (default: this process's) holds :data:`RETAIN_FREED_MEMORY`."""
    env = os.environ if environ is None else environ
    return all(env.get(k) == v for k, v in RETAIN_FREED_MEMORY.items())


def retaining_environ(environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """A copy of ``environ`` (default: this process's) with :data:`RETAIN_FREED_MEMORY` set."""
    return {**(os.environ if environ is None else environ), **RETAIN_FREED_MEMORY}


def reexec_retaining_freed_memory(argv: Optional[List[str]] = None) -> None:
    """Re-execute this program with :data:`RETAIN_FREED_MEMORY` in its environment, if it runs on
    glibc without them; otherwise return. ``argv``: the interpreter's command line (default
    ``sys.orig_argv``, which repeats ``-m module`` or the script path). Does not return when it
    re-executes; call it first thing in a program's entry point, never from library code."""
    if not is_glibc() or retains_freed_memory():
        return
    argv = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], retaining_environ())
