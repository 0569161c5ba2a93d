"""The plan table: ``jax-adapter plan`` for each model, precision, batch and target, one fresh
process a row, into ``results/plan-<name>.json`` and a Markdown table beside it.

    python -m benchmarks.plan.table                          # the recorded table (about 1.5 h on 2 cores)
    python -m benchmarks.plan.table --models dinov2_vits14 --targets v5e --batches 6 --modes bf16

Rows: ``--models`` x ``--modes`` (``f32``, ``bf16``, ``bf16+remat``) x ``--batches`` x
``--targets``, the trunk frozen (``--unfrozen`` trains it), at ``--image-size``. Each row records
the plan's memory, fit, compile time, code size, kernels and dispatch, and the compiling
process's peak RSS. Needs the plan extras (``pip install -e '.[plan]'``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List

from benchmarks.common import cpu_flags, cpu_model, load_average, now, write_record

MODES = {"f32": [], "bf16": ["--bf16"], "bf16+remat": ["--bf16", "--remat"]}
GIB = 1 << 30
# jax-adapter in a child that reports its own peak RSS on exit.
CHILD = ("import atexit, resource, sys; atexit.register(lambda: print('peak_rss_kib', "
         "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); "
         "from jax_adapter.cli import main; sys.exit(main(sys.argv[1:]))")


def row(model: str, target: str, mode: str, batch: int, size: str, program: str, frozen: bool) -> Dict[str, Any]:
    argv = [sys.executable, "-c", CHILD, "plan", "--target", target, "--preset", model,
            "--batch", str(batch), "--image-size", size, "--program", program, "--json", *MODES[mode]]
    if frozen:
        argv.append("--freeze-trunk")
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    rss = [int(ln.split()[1]) for ln in done.stderr.splitlines() if ln.startswith("peak_rss_kib ")]
    out = {"model": model, "target": target, "mode": mode, "batch": batch, "image_size": size,
           "program": program, "frozen_trunk": frozen, "wall_s": round(time.perf_counter() - t0, 1),
           "peak_rss_bytes": rss[-1] * 1024 if rss else None}
    if done.returncode:
        errors = [ln for ln in done.stderr.splitlines() if not ln.startswith("peak_rss_kib ")]
        out["error"] = (errors or ["?"])[-1]
        return out
    out["plan"] = json.loads(done.stdout)
    return out


def _gib(n: Any) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def markdown(rows: List[Dict[str, Any]]) -> str:
    lines = ["| model | target | mode | batch | program | peak GiB | temp GiB | fits | compile s | code MiB | "
             "kernels | Pallas | gathers | msda | attention |", "|" + "---|" * 15]
    for r in rows:
        if "plan" not in r:
            lines.append(f"| {r['model']} | {r['target']} | {r['mode']} | {r['batch']} | {r['program']} | "
                         f"error: {r['error']} |" + " |" * 10)
            continue
        for name, p in r["plan"]["programs"].items():
            m, k = p["memory"], p.get("kernels", {})
            fits = "yes" if p["fits"]["device"] else "no"
            if p["fits"]["device"] and p["fits"].get("default_pool") is False:
                fits = "above 75%"
            code = m.get("generated_code")
            pallas = sum(k.get("pallas_kernels", {}).values()) if k else "-"
            gathers = (k["gathers"]["standalone"] + k["gathers"]["fused"]) if k else "-"
            d = p["dispatch"]
            lines.append(
                f"| {r['model']} | {r['target']} | {r['mode']} | {r['batch']} | {name} | {_gib(m['peak'])} | "
                f"{_gib(m.get('temporaries'))} | {fits} | {p['compile_s']} | "
                f"{'-' if not code else f'{code / (1 << 20):.1f}'} | {k.get('kernels', '-')} | {pallas} | {gathers} | "
                f"{', '.join(d.get('msda', {}))} | {', '.join(d.get('attention', {}))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="dinov2_vits14,dinov2_vitb14")
    p.add_argument("--targets", default="h100,v5e")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--batches", default="6,48")
    p.add_argument("--image-size", default="256x704")
    p.add_argument("--program", default="train", choices=("train", "forward", "both"))
    p.add_argument("--unfrozen", action="store_true", help="train the trunk too")
    p.add_argument("--name", default="table", help="results/plan-<name>.json and .md")
    args = p.parse_args()
    rows = []
    record = {"date": now(), "cpu_model": cpu_model(), "cpu_flags": cpu_flags(),
              "load_average_start": round(load_average(), 2), "rows": rows}
    combos = itertools.product(args.models.split(","), args.targets.split(","), args.modes.split(","),
                               [int(b) for b in args.batches.split(",")])
    for model, target, mode, batch in combos:
        r = row(model, target, mode, batch, args.image_size, args.program, not args.unfrozen)
        rows.append(r)
        peak = r["plan"]["programs"] if "plan" in r else {}
        print(json.dumps({k: r[k] for k in ("model", "target", "mode", "batch", "wall_s")}
                         | {n: _gib(q["memory"]["peak"]) for n, q in peak.items()} | {"error": r.get("error")}),
              flush=True)
        record["load_average_end"] = round(load_average(), 2)
        path = write_record(record, None, f"plan-{args.name}.json")
        with open(path[:-5] + ".md", "w") as f:
            f.write(markdown(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
