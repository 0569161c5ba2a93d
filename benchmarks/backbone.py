"""Compile and step time of a jitted DinoAdapter forward (a benchmark, not a test).

    python benchmarks/backbone.py --preset dinov2_vitb14 --batch 6 --size 256x704

Writes ``benchmarks/results/backbone-<backend>.json`` (appending one record per run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np
from flax import nnx

from jax_adapter import AdapterConfig, DinoAdapter
from jax_adapter.training.synthetic import street_image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="dinov2_vitb14")
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--size", default="256x704")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    h, w = (int(v) for v in args.size.split("x"))

    cfg = AdapterConfig.preset(args.preset)
    model = DinoAdapter(cfg, rngs=nnx.Rngs(0))
    model.eval()
    graph, state = nnx.split(model)

    @jax.jit
    def forward(state, images):
        return nnx.merge(graph, state)(images)

    images = np.repeat(street_image(h, w), args.batch, axis=0)
    t0 = time.perf_counter()
    compiled = forward.lower(state, images).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(state, images))  # warm-up
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        jax.block_until_ready(compiled(state, images))
        times.append(time.perf_counter() - t)
    record = {
        "preset": args.preset, "batch": args.batch, "size": [h, w], "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(), "jax": jax.__version__,
        "compile_s": round(compile_s, 2), "step_s_median": round(statistics.median(times), 3),
        "step_s_all": [round(t, 3) for t in times],
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(record))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"backbone-{jax.default_backend()}.json")
    records = json.load(open(path)) if os.path.exists(path) else []
    records.append(record)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
