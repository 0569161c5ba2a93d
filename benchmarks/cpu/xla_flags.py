"""XLA:CPU compiler options against the defaults, on the train step's parts, against PyTorch.

    python -m benchmarks.cpu.xla_flags                    # every option set, two rounds (~15 min)
    python -m benchmarks.cpu.xla_flags --only default,eigen_dots --rounds 1

Each option set runs ``benchmarks.cpu.train_step --only parts`` in a process of its own with the
options in ``XLA_FLAGS`` (they are read once, when XLA starts). Every run times JAX and its
PyTorch peer interleaved call by call, so the JAX / PyTorch ratio of a part carries the load of
that moment on both sides; option sets go round-robin, ``--rounds`` times, so that a slow stretch
of the machine hits all of them alike. The record keeps each run's per-part medians and ratios
and, per option set, the median over rounds of each part's ratio divided by the default's ratio
in the same round (below 1: the option helps). Options that change floating-point results (fast
math) are left out: the parts must stay at parity. Writes
``benchmarks/results/xla_flags-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List

import numpy as np

from benchmarks.common import check_quiet, load_average, machine_info, now, write_record

# name -> XLA_FLAGS. jaxlib 0.10 runs every dot through YNNPACK ("__ynn_fusion") by default;
# the thunk runtime is the only runtime (``xla_cpu_use_thunk_runtime=false`` is ignored with a
# warning), and oneDNN fusions are not built into the CPU wheel, so neither is a choice here.
OPTION_SETS: Dict[str, str] = {
    "default": "",
    # Eigen's contraction for every dot instead of YNNPACK.
    "eigen_dots": "--xla_cpu_experimental_ynn_fusion_type=",
    # YNNPACK fusions grown around the dots: elementwise and reductions join them.
    "ynn_fused": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                 "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE",
    # XNNPACK's graph fusion (greedy), YNNPACK off so that XNNPACK sees the dots.
    "xnn_greedy": "--xla_cpu_experimental_ynn_fusion_type= "
                  "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE "
                  "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    # 512-bit vectors in XLA's own loop fusions (the default prefers 256 bits).
    "vector_512": "--xla_cpu_prefer_vector_width=512",
}


def run_parts(flags: str, reps: int) -> Dict[str, Dict[str, float]]:
    """One ``train_step --only parts`` run under ``XLA_FLAGS=flags``: part -> medians and ratio."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "parts.json")
        env = {**os.environ, "XLA_FLAGS": flags}
        subprocess.run([sys.executable, "-m", "benchmarks.cpu.train_step", "--only", "parts",
                        "--reps-parts", str(reps), "--out", out], check=True, cwd=root, env=env,
                       stdout=subprocess.DEVNULL)
        with open(out) as f:
            parts = json.load(f)["parts"]
    return {name: {"jax_ms": p["jax"]["median_s"] * 1e3, "torch_ms": p["torch"]["median_s"] * 1e3,
                   "ratio": p["ratio"]} for name, p in parts.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(OPTION_SETS), help="comma-separated option sets (default: all)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps-parts", type=int, default=5, help="timed calls per side and part in each run")
    ap.add_argument("--out", default=None, help="results file (default results/xla_flags-cpu.json)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = set(names) - set(OPTION_SETS)
    if bad:
        ap.error(f"unknown option set(s) {sorted(bad)}; choose from {', '.join(OPTION_SETS)}")
    if "default" not in names:
        names.insert(0, "default")
    record = {"date": now(), "machine": machine_info(), "rounds": args.rounds, "reps_parts": args.reps_parts,
              "option_sets": {n: OPTION_SETS[n] for n in names},
              "load_before": check_quiet("the option comparison"), "runs": []}
    for r in range(args.rounds):
        for name in names:
            load = load_average()
            parts = run_parts(OPTION_SETS[name], args.reps_parts)
            record["runs"].append({"round": r, "options": name, "load_before": round(load, 2), "parts": parts})
            print(f"[round {r}] {name:11s} (load {load:.2f}) "
                  + ", ".join(f"{p.split(' [')[0]} {v['ratio']:.2f}x" for p, v in parts.items()), flush=True)
    # Per option set and part: the median over rounds of (ratio / the default's ratio that round).
    relative: Dict[str, Dict[str, float]] = {}
    for name in names:
        per_part: Dict[str, List[float]] = {}
        for r in range(args.rounds):
            base = next(x["parts"] for x in record["runs"] if x["round"] == r and x["options"] == "default")
            mine = next(x["parts"] for x in record["runs"] if x["round"] == r and x["options"] == name)
            for part, v in mine.items():
                per_part.setdefault(part, []).append(v["ratio"] / base[part]["ratio"])
        relative[name] = {part: round(float(np.median(v)), 3) for part, v in per_part.items()}
    record["relative_to_default"] = relative
    record["load_after"] = check_quiet("the option comparison")
    parts = list(relative["default"])
    print("| option set | " + " | ".join(parts) + " |")
    print("|---|" + "---:|" * len(parts))
    for name in names:
        print(f"| `{name}` | " + " | ".join(f"{relative[name][p]:.2f}" for p in parts) + " |")
    print(f"wrote {write_record(record, args.out, 'xla_flags-cpu.json')}")


if __name__ == "__main__":
    main()
