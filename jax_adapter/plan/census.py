"""What a compiled XLA program runs: its kernels, library calls, gathers and scatters, loops.

:func:`census` reads ``compiled.as_text()`` (the optimised HLO of XLA:GPU or XLA:TPU). A kernel is
an instruction of a *sequential* computation (the entry, loop bodies and conditions, branches,
called computations) other than the free ones (parameters, tuples, bitcasts, control flow
itself); the instructions inside a fusion or a reducer are parts of one kernel. Gathers and
scatters are counted also inside fusions: a fused gather still gathers. Loops are listed with
their trip counts, since a loop's body runs that many times but appears once.
"""

from __future__ import annotations

import collections
import re
from typing import Dict, List, Optional, Tuple

# Kernel families by custom-call target (first matching prefix wins).
FAMILIES: Tuple[Tuple[str, str], ...] = (
    ("__gpu$xla.gpu.triton", "pallas_triton"),  # Pallas GPU kernels through XLA's Triton pipeline
    ("__cudnn$fmha", "cudnn_attention"),  # cuDNN fused attention, forward and backward
    ("__cudnn$conv", "cudnn_conv"),
    ("__cudnn$", "cudnn_other"),
    ("__cublas$", "cublas"),
    ("tpu_custom_call", "mosaic"),  # Pallas TPU kernels
    ("__gpu$", "gpu_other"),
)
FREE_OPS = frozenset({
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
    "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "async-update", "domain",
})
COLLECTIVES = frozenset({
    "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "send", "recv",
})

_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) (?:\([^{]*\) -> .*)?\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")
_Instr = Tuple[str, str, str]  # name, opcode, line


def _parse(text: str) -> Tuple[Dict[str, List[_Instr]], Optional[str]]:
    """Computation name -> its instructions, and the entry's name."""
    comps: Dict[str, List[_Instr]] = {}
    entry = current = None
    for line in text.splitlines():
        if current is None or (line.startswith(("ENTRY", "%")) and line.rstrip().endswith("{")):
            m = _COMPUTATION.match(line)
            if m and "=" not in line.split("(")[0]:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
                continue
        if line.startswith("}"):
            current = None
        elif current is not None:
            m = _INSTRUCTION.match(line)
            if m:
                comps[current].append((m.group(1), m.group(3), line))
    return comps, entry


def _sequential(comps: Dict[str, List[_Instr]], entry: Optional[str]) -> List[str]:
    """The computations whose instructions run one after another: the entry and what its control
    flow runs (not fused computations or reducers)."""
    seen: List[str] = []
    todo = [entry] if entry else []
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.append(c)
        for _, op, line in comps[c]:
            if op == "while":
                todo += re.findall(r"(?:body|condition)=%?([\w.\-]+)", line)
            elif op == "conditional":
                m = re.search(r"branch_computations=\{([^}]*)\}", line)
                if m:
                    todo += [x.strip().lstrip("%") for x in m.group(1).split(",")]
                todo += re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line)
            elif op in ("call", "async-start"):
                todo += re.findall(r"(?:to_apply|calls)=%?([\w.\-]+)", line)
    return seen


def _family(target: str) -> str:
    return next((fam for prefix, fam in FAMILIES if target.startswith(prefix)), "other_custom_call")


def _kernel_name(line: str) -> Optional[str]:
    """A Pallas kernel's function, from ``op_name=".../jvp(msda_forward)/pallas_call"``."""
    m = re.search(r'op_name="([^"]*)"', line)
    if not m:
        return None
    parts = [p for p in m.group(1).split("/") if p]
    for p in reversed(parts[:-1]):
        inner = re.findall(r"\(([\w.<>\-]+)\)", p)
        if inner:
            return inner[-1]
        if not p.startswith(("jit(", "jvp(", "transpose(", "vmap(", "remat", "checkpoint")):
            return p
    return parts[0] if parts else None


def _target(line: str) -> str:
    t = re.search(r'custom_call_target="([^"]*)"', line)
    return t.group(1) if t else "?"


def census(compiled_text: str) -> dict:
    """Kernel census of an optimised HLO module (``compiled.as_text()``).

    Returns ``kernels`` (total and per family: ``xla_fusion``, ``cublas``, ``cudnn_attention``,
    ``cudnn_conv``, ``pallas_triton``, ``mosaic``, ``collective``, ``xla_other``...),
    ``pallas_kernels`` (kernel function -> call sites), ``gathers``/``scatters`` (standalone
    and inside fusions) and ``loops`` (trip counts; None when unknown).
    """
    comps, entry = _parse(compiled_text)
    sequential = _sequential(comps, entry)
    families: collections.Counter = collections.Counter()
    pallas: collections.Counter = collections.Counter()
    loops: List[Optional[int]] = []
    for c in sequential:
        for name, op, line in comps[c]:
            if op == "custom-call":
                fam = _family(_target(line))
                families[fam] += 1
                if fam in ("pallas_triton", "mosaic"):
                    pallas[_kernel_name(line) or name] += 1
            elif op == "fusion":
                families["xla_fusion"] += 1
            elif op == "while":
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
                loops.append(int(trip.group(1)) if trip else None)
            elif op.removesuffix("-start") in COLLECTIVES:
                families["collective"] += 1
            elif op.endswith("-start"):
                families["async_start"] += 1  # transfers (TPU DMAs) and async wrappers: not kernels
            elif op not in FREE_OPS and not op.endswith("-done"):
                families["xla_other"] += 1
    counts = {"gather": {"standalone": 0, "fused": 0}, "scatter": {"standalone": 0, "fused": 0}}
    sequential_set = set(sequential)
    for c, instrs in comps.items():
        where = "standalone" if c in sequential_set else "fused"
        for _, op, _ in instrs:
            if op in counts:
                counts[op][where] += 1
    return {
        "kernels": sum(v for k, v in families.items() if k != "async_start"),
        "families": dict(sorted(families.items())),
        "pallas_kernels": dict(sorted(pallas.items())),
        "gathers": counts["gather"],
        "scatters": counts["scatter"],
        "loops": loops,
    }
