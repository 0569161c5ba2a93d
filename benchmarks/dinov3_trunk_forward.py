"""Jitted forward time of the DINOv3 trunks (ViT-S/16, ViT-B/16), with Hugging Face's PyTorch
``DINOv3ViTModel`` of the same architecture as the peer, side by side in one run (a benchmark,
not a test).

    python benchmarks/dinov3_trunk_forward.py --sizes 256x704 518x518

Random weights, batch 1, float32 (torch: eval mode, ``no_grad``, ``--torch-threads`` threads,
default one per core). For each
size every JAX model is compiled first and every model gets a warm-up call; then the timed calls
go round-robin (one call of each model per round), so that load on a shared machine hits all
models alike. Writes ``benchmarks/results/dinov3_trunk_forward-<backend>.json`` (appending one
record per run) with each model's median, all times and the JAX / torch ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_adapter.models.dinov3 import DinoV3, hub_config

VARIANTS = ("vits16", "vitb16")


def build_jax(variant: str, seed: int = 0):
    """A jitted forward of ``dinov3_<variant>`` with random weights (filled without the op-by-op
    initialisation, which is slow on CPU)."""
    cfg = hub_config(variant)
    model = nnx.eval_shape(lambda: DinoV3(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        shape = var.get_value().shape
        value = np.ones(shape, np.float32) if path[-1] == "scale" else 0.02 * rng.standard_normal(shape)
        var.set_value(jnp.asarray(value, jnp.float32))
    nnx.update(model, state)
    graph, state = nnx.split(model)
    return jax.jit(lambda state, images: nnx.merge(graph, state)(images)), state


def build_torch(variant: str):
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    cfg = hub_config(variant)
    hf = DINOv3ViTConfig(
        hidden_size=cfg.embed_dim, intermediate_size=cfg.ffn_hidden, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads, patch_size=cfg.patch_size, num_register_tokens=cfg.n_storage_tokens,
        layer_norm_eps=cfg.norm_eps, rope_theta=cfg.pos_embed_rope_base,
    )
    torch.manual_seed(0)
    model = DINOv3ViTModel(hf).eval()

    def forward(images):
        with torch.no_grad():
            return model(pixel_values=images).last_hidden_state

    return forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["256x704", "518x518"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-torch", action="store_true", help="time the JAX trunks only")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                   help="torch intra-op threads (default: one per core)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()

    torch_version = None
    if not args.no_torch:
        import torch

        torch.set_num_threads(args.torch_threads)
        torch_version = torch.__version__
    models = {}
    for v in args.variants:
        models[f"jax_{v}"] = ("jax",) + build_jax(v)
        if not args.no_torch:
            models[f"torch_{v}"] = ("torch", build_torch(v), None)

    load_before = os.getloadavg()[0]
    results = []
    for size in args.sizes:
        h, w = (int(s) for s in size.split("x"))
        x = np.random.default_rng(1).standard_normal((1, h, w, 3)).astype(np.float32)
        calls, compile_s = {}, {}
        for name, (kind, fn, state) in models.items():
            if kind == "jax":
                t0 = time.perf_counter()
                compiled = fn.lower(state, x).compile()
                compile_s[name] = round(time.perf_counter() - t0, 2)
                calls[name] = lambda c=compiled, s=state: jax.block_until_ready(c(s, x))
            else:
                import torch

                xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
                calls[name] = lambda f=fn, xt=xt: f(xt)
            calls[name]()  # warm-up
        times = {name: [] for name in calls}
        for _ in range(args.reps):
            for name, call in calls.items():
                t = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        record = {
            "size": [h, w], "batch": 1,
            "median_ms": {k: round(1e3 * v, 1) for k, v in med.items()},
            "all_ms": {k: [round(1e3 * t, 1) for t in ts] for k, ts in times.items()},
            "compile_s": compile_s,
            "jax_over_torch": {v: round(med[f"jax_{v}"] / med[f"torch_{v}"], 3)
                               for v in args.variants if f"torch_{v}" in med},
        }
        print(json.dumps(record))
        results.append(record)
    run = {
        "benchmark": "dinov3_trunk_forward", "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(), "jax": jax.__version__, "torch": torch_version,
        "torch_threads": None if args.no_torch else args.torch_threads,
        "reps": args.reps, "loadavg_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "date": time.strftime("%Y-%m-%d"), "results": results,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"dinov3_trunk_forward-{jax.default_backend()}.json")
    records = json.load(open(path)) if os.path.exists(path) else []
    records.append(run)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
