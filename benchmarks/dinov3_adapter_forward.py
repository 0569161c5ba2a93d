"""Jitted forward time of the DINOv3 adapters (ViT-S/16, ViT-B/16), with the DINOv2 adapters of
the same widths as peers, measured side by side in one run (a benchmark, not a test).

    python benchmarks/dinov3_adapter_forward.py --sizes 256x704 518x518

Random weights, batch 1, float32. For each size every model is compiled first, then the timed
calls go round-robin (one call of each model per round), so that load on a shared machine hits
all models alike. Writes ``benchmarks/results/dinov3_adapter_forward-<backend>.json`` (appending
one record per run) with each model's median and the DINOv3 / DINOv2 ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
from flax import nnx

from jax_adapter import presets
from jax_adapter.models.dinov2_adapter import DinoAdapter
from jax_adapter.models.dinov3_adapter import DinoV3Adapter, DinoV3AdapterConfig
from jax_adapter.training.synthetic import street_image

# DINOv3 adapter preset -> its DINOv2 peer of the same width and depth.
PAIRS = {"dinov3_vits16_adapter": "dinov2_vits14", "dinov3_vitb16_adapter": "dinov2_vitb14"}


def build(name: str):
    cfg = presets.get(name)
    model = (DinoV3Adapter if isinstance(cfg, DinoV3AdapterConfig) else DinoAdapter)(cfg, rngs=nnx.Rngs(0))
    model.eval()
    graph, state = nnx.split(model)
    return jax.jit(lambda state, images: nnx.merge(graph, state)(images)), state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["256x704", "518x518"])
    p.add_argument("--models", nargs="+", default=list(PAIRS) + list(PAIRS.values()))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()

    models = {name: build(name) for name in args.models}
    results = []
    for size in args.sizes:
        h, w = (int(v) for v in size.split("x"))
        images = street_image(h, w)
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
            med = statistics.median(times[name])
            results.append({"model": name, "size": [h, w], "batch": 1, "compile_s": round(compile_s[name], 2),
                            "forward_s_median": round(med, 3), "forward_s_all": [round(t, 3) for t in times[name]]})
            print(json.dumps(results[-1]), flush=True)
        for v3, v2 in PAIRS.items():
            if v3 in times and v2 in times:
                ratio = statistics.median(times[v3]) / statistics.median(times[v2])
                results.append({"ratio": f"{v3} / {v2}", "size": [h, w], "value": round(ratio, 3)})
                print(json.dumps(results[-1]), flush=True)
    record = {
        "benchmark": "dinov3_adapter_forward", "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(), "jax": jax.__version__,
        "dtype": "float32", "reps": args.reps, "results": results,
        "note": "random weights; shared, loaded machine (other jobs running): medians and ratios only",
        "date": time.strftime("%Y-%m-%d"),
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"dinov3_adapter_forward-{jax.default_backend()}.json")
    records = []
    if os.path.exists(path):
        with open(path) as f:
            records = json.load(f)
    records.append(record)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
