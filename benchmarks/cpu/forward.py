"""Compile and forward time of registered models, jitted, side by side (a benchmark, not a test).

    python -m benchmarks.cpu.forward --models dinov2_vitb14_adapter --batch 6 --sizes 256x704
    python -m benchmarks.cpu.forward --sizes 256x704 518x518     # DINOv3 adapters vs DINOv2 peers

Random weights, eval mode, the demo's street picture. The models' calls go round-robin (one call
of each per round), so that load from other processes hits all alike; pairs of the same width
and depth (``PAIRS``) also get their ratio. Appends one record to
``benchmarks/results/forward-<backend>.json`` (earlier runs: ``backbone-cpu.json``,
``dinov3_adapter_forward-cpu.json``).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

import jax_adapter
from benchmarks.common import append_record, check_quiet, machine_info, now, summary
from jax_adapter.cli.common import parse_size
from jax_adapter.training.synthetic import street_image

# DINOv3 adapter -> its DINOv2 peer of the same width and depth.
PAIRS = {"dinov3_vits16_adapter": "dinov2_vits14_adapter", "dinov3_vitb16_adapter": "dinov2_vitb14_adapter"}


def jitted_forward(name: str):
    from flax import nnx

    graph, state = nnx.split(jax_adapter.create_model(name))
    return jax.jit(lambda state, images: nnx.merge(graph, state)(images)), state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(PAIRS) + list(PAIRS.values()))
    p.add_argument("--sizes", nargs="+", default=["256x704", "518x518"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None, help="results file (default results/forward-<backend>.json)")
    args = p.parse_args()
    load_before = check_quiet("the timings")
    models = {name: jitted_forward(name) for name in args.models}
    results = []
    for size in args.sizes:
        h, w = parse_size(size)
        images = np.repeat(street_image(h, w), args.batch, axis=0)
        compiled, compile_s = {}, {}
        for name, (fwd, state) in models.items():
            t0 = time.perf_counter()
            compiled[name] = fwd.lower(state, images).compile()
            compile_s[name] = time.perf_counter() - t0
            jax.block_until_ready(compiled[name](state, images))  # warm-up
        times = {name: [] for name in models}
        for _ in range(args.reps):
            for name, (_, state) in models.items():
                t = time.perf_counter()
                jax.block_until_ready(compiled[name](state, images))
                times[name].append(time.perf_counter() - t)
        for name in models:
            results.append({"model": name, "size": [h, w], "batch": args.batch,
                            "compile_s": round(compile_s[name], 2), **summary(times[name])})
            print(json.dumps(results[-1]), flush=True)
        for a, b in PAIRS.items():
            if a in times and b in times:
                value = float(np.median(times[a]) / np.median(times[b]))
                results.append({"ratio": f"{a} / {b}", "size": [h, w], "value": round(value, 3)})
                print(json.dumps(results[-1]), flush=True)
    record = {"benchmark": "forward", "date": now(), "machine": machine_info(), "dtype": "float32",
              "reps": args.reps, "load_before": load_before, "load_after": check_quiet("the timings"),
              "results": results}
    print(f"wrote {append_record(record, args.out, f'forward-{jax.default_backend()}.json')}")


if __name__ == "__main__":
    main()
