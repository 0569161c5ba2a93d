"""Turn kernel-report JSON files into ``benchmarks/results/kernel_report.{json,md}``.

The kernel report compiles the Pallas kernels to GPU machine code without a GPU (Triton's NVIDIA
pipeline, then ``ptxas -v``) and writes one JSON list per run: per kernel the entry point,
dtype, case, warps, grid and, per target (``"90"``, ``"80"``), the registers, spill bytes and
shared memory. This script combines a "before" run, an "after" run and any number of runs at
other head widths into one JSON record and a Markdown table with the blocks per SM that the
registers allow.

    python -m benchmarks.gpu.kernel_report_table --before before.json --after after.json \\
        --extra "DINOv3 dh=12" dinov3_12.json --extra "DINOv3 dh=32" dinov3_32.json ...
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")

# Both targets: 64K 32-bit registers, at most 64 resident warps and 32 resident blocks per SM;
# registers are allocated per warp in units of 256 (8 per thread).
REGS_PER_SM, MAX_WARPS, MAX_BLOCKS = 65536, 64, 32


def blocks_per_sm(regs: Optional[int], warps: int) -> Optional[int]:
    """Resident blocks per SM allowed by registers and warps (shared memory is far from limiting
    here: at most a few KB per block)."""
    if not regs:
        return None
    per_thread = -(-regs // 8) * 8
    return min(MAX_BLOCKS, MAX_WARPS // warps, REGS_PER_SM // (per_thread * 32 * warps))


def summarise(rows: List[dict]) -> List[dict]:
    """Per kernel and target: regs, spill bytes (stores + loads), stack, shared, blocks per SM."""
    out = []
    for r in rows:
        row = {k: r[k] for k in ("entry", "dtype", "case", "kernel", "num_warps", "grid")}
        for arch, res in r["results"].items():
            if not res.get("compiled"):
                row[f"sm_{arch}"] = {"compiled": False, "error": res.get("error", "")[:300]}
                continue
            spill = res.get("spill_stores", 0) + res.get("spill_loads", 0)
            row[f"sm_{arch}"] = {
                "regs": res.get("regs"), "spill_bytes": spill, "stack": res.get("stack", 0),
                "shared": res.get("shared", 0), "blocks_per_sm": blocks_per_sm(res.get("regs"), r["num_warps"]),
            }
        out.append(row)
    return out


def _cell(t: dict) -> str:
    if not t.get("compiled", True):
        return "failed | | "
    spill = f"**{t['spill_bytes']}**" if t["spill_bytes"] else "0"
    return f"{t['regs']} | {spill} | {t['blocks_per_sm']}"


def _key(r: dict) -> tuple:
    return r["entry"], r["dtype"], r["case"], r["kernel"]


HEADER = """# Kernel report: the Pallas kernels compiled for sm_90 and sm_80 (no GPU involved)

Registers per thread, spilled bytes (stores + loads) and the resident blocks per SM that the
registers allow (64K registers per SM, allocated 8 per thread at a time; at most 64 warps and 32
blocks), for every kernel of both entry points (``ms_deform_attn`` and
``ms_deform_attn_fused``, forward and backward) at the ViT-S adapter's shapes (B=6, M=6,
Dh=64, P=4; injector: Q=969 over (34,90), (17,45), (9,23); extractor: Q=4032 over (19,51)),
float32 and bfloat16, before and after the kernels were restructured; then the DINOv3 head
widths.

How: the kernels are lowered with ``jax.jit(...).lower(lowering_platforms=("cuda",))`` on a CPU
machine, the Triton IR of each ``__gpu$xla.gpu.triton`` custom call is compiled with the
``triton`` package's NVIDIA pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin) and
``ptxas -v`` reports the resources. This is Triton's pipeline, not XLA's own (which compiles
the same IR on a real GPU), so counts may differ there; a kernel that spills kilobytes here
is in trouble there too. It says nothing about speed: ``python -m benchmarks.gpu.validate`` measures
that on a GPU.

Reproduce: run the kernel report tool (``run.sh [--json F]`` from the project root; it builds
a virtual environment with ``triton==3.9.0``), then
``python -m benchmarks.gpu.kernel_report_table --before B.json --after A.json --extra LABEL
F.json ...``. The DINOv3 rows come from the same tool with one more case,
``dinov3: q=3696, shapes=((16, 44),)`` (the one-level ViT-S/16 grid at 256x704, 32x88 +
16x44 + 8x22 SPM queries), and ``--dims 6,16,<dh>,4``. Redo it whenever a kernel changes.

"""


def summary(before: List[dict], after: List[dict], extra: Dict[str, List[dict]]) -> str:
    def stats(rows):
        cells = [r[a] for r in rows for a in ("sm_90", "sm_80") if r[a].get("compiled", True)]
        spill = sum(1 for c in cells if c["spill_bytes"])
        return (f"{spill} of {len(cells)} kernel/target pairs spill, registers "
                f"{min(c['regs'] for c in cells)}-{max(c['regs'] for c in cells)}, blocks per SM "
                f"{min(c['blocks_per_sm'] for c in cells)}-{max(c['blocks_per_sm'] for c in cells)}")

    lines = [f"- Before: {stats(before)}.", f"- After: {stats(after)}."]
    if extra:
        rows = [r for rs in extra.values() for r in rs]
        lines.append(f"- Further runs ({len(extra)}, below): {stats(rows)}.")
    return "\n".join(lines) + "\n\n"


def markdown(before: List[dict], after: List[dict], extra: Dict[str, List[dict]]) -> str:
    lines = [
        "## ViT-S adapter shapes, before / after",
        "",
        "| entry | dtype | case | kernel | warps before / after | grid after "
        "| sm_90 before: regs | spill | blocks | sm_90 after: regs | spill | blocks "
        "| sm_80 before: regs | spill | blocks | sm_80 after: regs | spill | blocks |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    old = {_key(r): r for r in before}
    for r in after:
        b = old.get(_key(r))
        cells = []
        for arch in ("sm_90", "sm_80"):
            cells.append(_cell(b[arch]) if b else "- | - | -")
            cells.append(_cell(r[arch]))
        warps = f"{b['num_warps'] if b else '-'} / {r['num_warps']}"
        lines.append(f"| {r['entry']} | {r['dtype']} | {r['case']} | {r['kernel']} | {warps} | "
                     f"{tuple(r['grid'])} | " + " | ".join(cells) + " |")
    for label, rows in extra.items():
        lines += ["", f"## {label}", "",
                  "| entry | dtype | kernel | warps | grid | sm_90 regs | spill | blocks "
                  "| sm_80 regs | spill | blocks |",
                  "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['entry']} | {r['dtype']} | {r['kernel']} | {r['num_warps']} | "
                         f"{tuple(r['grid'])} | {_cell(r['sm_90'])} | {_cell(r['sm_80'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="kernel-report JSON of the kernels before the change")
    p.add_argument("--after", required=True, help="kernel-report JSON of the current kernels")
    p.add_argument("--extra", nargs=2, action="append", default=[], metavar=("LABEL", "JSON"),
                   help="further runs (e.g. other head widths), one table each")
    p.add_argument("--meta", default="{}", help="JSON object stored as the record's 'meta'")
    p.add_argument("--out", default=os.path.join(RESULTS, "kernel_report"), help="path without suffix")
    a = p.parse_args()
    load = lambda path: summarise(json.load(open(path)))  # noqa: E731
    before, after = load(a.before), load(a.after)
    extra = {label: load(path) for label, path in a.extra}
    record = {"meta": json.loads(a.meta), "before": before, "after": after, "extra": extra}
    with open(a.out + ".json", "w") as f:
        json.dump(record, f, indent=1)
    with open(a.out + ".md", "w") as f:
        f.write(HEADER + summary(before, after, extra) + markdown(before, after, extra))
    spills = [(label, _key(r)) for label, rows in [("after", after), *extra.items()] for r in rows
              for arch in ("sm_90", "sm_80") if r[arch].get("spill_bytes") or not r[arch].get("compiled", True)]
    print(f"wrote {a.out}.json and .md; {len(spills)} kernel/target pairs spill or fail after the change")


if __name__ == "__main__":
    main()
