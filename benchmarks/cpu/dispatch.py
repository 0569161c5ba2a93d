"""What a train-step call costs in Python before the compiled program runs: ``nnx.jit`` on the
module (a user's own loop) against ``jax.jit`` of the split state (``jax_adapter.training``'s
``TrainStep`` form).

    python -m benchmarks.cpu.dispatch                          # ViT-S adapter, trunk frozen
    python -m benchmarks.cpu.dispatch --preset dinov2_vitb14 --unfrozen

``nnx.jit`` walks the module graph on every call (to find the state going in and to write the
updated state back); ``jax.jit`` of a pure function of the split state only flattens the arrays.
Both steps are the same forward+backward (loss ``sum_i <out_i, cot_i>`` over the five outputs)
on tiny images, so that the program itself is short; the figure is the time until the call
returns, before its result is waited for (JAX dispatches asynchronously), median over
``--reps`` calls after warm-up. Writes ``benchmarks/results/dispatch-cpu.json`` with ``--out``
or by default; ``--no-write`` prints only.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.cpu.step_forms import jax_step
from benchmarks.common import check_quiet, load_average, machine_info, now, summary, write_record
from jax_adapter import AdapterConfig, DinoAdapter


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dinov2_vits14")
    ap.add_argument("--unfrozen", action="store_true", help="train the trunk too (default: frozen)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None, help="results file (default results/dispatch-cpu.json)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    # Before anything compiles: the build and the compile below raise the load average themselves.
    load_before = check_quiet("the dispatch timing")

    model = DinoAdapter(AdapterConfig.preset(args.preset), rngs=nnx.Rngs(0))
    model.train()
    images = jnp.zeros((1, 56, 84, 3), jnp.float32)
    out = model(images)
    cots = [jnp.ones(o.shape, o.dtype) for o in (*out.features, out.vit)]
    frozen = not args.unfrozen
    calls = {"nnx.jit": jax_step(model, frozen, "user")[0], "jax.jit": jax_step(model, frozen, "split")[0]}
    for f in calls.values():  # compile and warm up
        jax.block_until_ready(f(images, cots))
        jax.block_until_ready(f(images, cots))
    dispatch = {k: [] for k in calls}
    whole = {k: [] for k in calls}
    for _ in range(args.reps):
        for k, f in calls.items():
            t0 = time.perf_counter()
            r = f(images, cots)
            t1 = time.perf_counter()
            jax.block_until_ready(r)
            dispatch[k].append(t1 - t0)
            whole[k].append(time.perf_counter() - t0)
    nodes = sum(1 for _ in nnx.iter_graph(model))
    arrays = len(jax.tree.leaves(nnx.state(model)))
    record = {"date": now(), "machine": machine_info(), "preset": args.preset, "frozen": not args.unfrozen,
              "images": list(images.shape), "reps": args.reps, "graph_nodes": nodes, "arrays": arrays,
              "load_before": load_before,
              "dispatch": {k: summary(v) for k, v in dispatch.items()},
              "whole_call": {k: summary(v) for k, v in whole.items()},
              "load_after": load_average()}
    d = {k: record["dispatch"][k]["median_s"] * 1e3 for k in calls}
    w = {k: record["whole_call"][k]["median_s"] * 1e3 for k in calls}
    print(f"{args.preset} ({nodes} graph nodes, {arrays} arrays), trunk {'frozen' if not args.unfrozen else 'trained'}:")
    for k in calls:
        print(f"  {k:8s} returns after {d[k]:6.1f} ms; whole call {w[k]:6.1f} ms")
    print(f"  nnx.jit costs {d['nnx.jit'] - d['jax.jit']:.1f} ms more per call in Python")
    if not args.no_write:
        print(f"wrote {write_record(record, args.out, 'dispatch-cpu.json')}")


if __name__ == "__main__":
    main()
