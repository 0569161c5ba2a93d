"""Jitted forward time of the DINOv3 trunks (ViT-S/16, ViT-B/16), with Hugging Face's PyTorch
``DINOv3ViTModel`` of the same architecture as the peer, side by side in one run (a benchmark,
not a test).

    python -m benchmarks.cpu.dinov3_trunk_forward --sizes 256x704 518x518

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
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import append_record, check_quiet, machine_info, now
from jax_adapter.cli.common import parse_size
from jax_adapter.models.dinov3 import DinoV3
from jax_adapter.models.dinov3.presets import hub_config

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
    p.add_argument("--out", default=None, help="results file (default results/dinov3_trunk_forward-<backend>.json)")
    args = p.parse_args()

    if not args.no_torch:
        import torch

        torch.set_num_threads(args.torch_threads)
    models = {}
    for v in args.variants:
        models[f"jax_{v}"] = ("jax",) + build_jax(v)
        if not args.no_torch:
            models[f"torch_{v}"] = ("torch", build_torch(v), None)

    load_before = check_quiet("the JAX / torch ratio")
    results = []
    for size in args.sizes:
        h, w = parse_size(size)
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
        "benchmark": "dinov3_trunk_forward", "date": now(), "machine": machine_info(),
        "torch_threads": None if args.no_torch else args.torch_threads, "reps": args.reps,
        "load_average": [round(load_before, 2), round(check_quiet("the JAX / torch ratio"), 2)],
        "results": results,
    }
    print(f"wrote {append_record(run, args.out, f'dinov3_trunk_forward-{jax.default_backend()}.json')}")


if __name__ == "__main__":
    main()
