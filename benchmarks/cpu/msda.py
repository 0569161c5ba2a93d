"""CPU timing of the deformable-attention sampling core: XLA op vs the torch C++ CPU kernel.

    pip install --no-build-isolation --no-deps torch-ms-deform-attn
    python -m benchmarks.cpu.msda            # full run (a few minutes on 2 cores)
    python -m benchmarks.cpu.msda --quick    # smoke run

Compares ``jax_adapter.nn.msda.ms_deform_attn(..., impl="xla")`` (jitted) with
``torch_ms_deform_attn.ms_deform_attn`` (its C++ CPU kernel, with autograd) at the seed shapes of
the ViT-S adapter at 256x704 with six cameras, in float32. Both implementations first have to
agree on the outputs and on all three gradients; then forward, backward and forward+backward are
timed, interleaving the two implementations repetition by repetition so that load from other
processes hits both alike. Prints a table and writes ``benchmarks/results/msda-cpu.json``.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.common import check_quiet, machine_info, now, rel_err, write_record
from jax_adapter.nn import msda as ops

try:
    import torch_ms_deform_attn
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("needs torch-ms-deform-attn: "
             "pip install --no-build-isolation --no-deps torch-ms-deform-attn")

Levels = Tuple[Tuple[int, int], ...]

# Seed shapes: ViT-S adapter at 256x704, B=6 cameras. The injector queries are the 19x51 ViT
# tokens over the three SPM levels; the extractor queries are the SPM tokens over the ViT map.
SHAPES: Dict[str, Tuple[int, Levels]] = {
    "injector": (969, ((34, 90), (17, 45), (9, 23))),
    "extractor": (4032, ((19, 51),)),
}
BATCH, HEADS, HEAD_DIM, POINTS = 6, 6, 64, 4
PHASES = ("fwd", "bwd", "fwd+bwd")
# float32 agreement required before timing (relative to each array's largest magnitude).
TOLERANCE = 1e-4


def make_inputs(q: int, levels: Levels, seed: int) -> Dict[str, np.ndarray]:
    """Random float32 inputs; locations uniform over [-0.05, 1.05] (so some fall off the map)."""
    rng = np.random.default_rng(seed)
    s = sum(h * w for h, w in levels)
    n_l = len(levels)
    logits = rng.standard_normal((BATCH, q, HEADS, n_l * POINTS))
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    return {
        "value": rng.standard_normal((BATCH, s, HEADS, HEAD_DIM)).astype(np.float32),
        "loc": rng.uniform(-0.05, 1.05, (BATCH, q, HEADS, n_l, POINTS, 2)).astype(np.float32),
        "attn": attn.reshape(BATCH, q, HEADS, n_l, POINTS).astype(np.float32),
        "cotangent": rng.standard_normal((BATCH, q, HEADS * HEAD_DIM)).astype(np.float32),
    }


def jax_fns(levels: Levels, x: Dict[str, np.ndarray]) -> Tuple[Dict[str, Callable[[], object]], Tuple]:
    """Jitted forward, backward (residuals precomputed) and forward+backward thunks."""
    v, l, a, g = (jnp.asarray(x[k]) for k in ("value", "loc", "attn", "cotangent"))

    def f(v, l, a):
        return ops.ms_deform_attn(v, levels, l, a, impl="xla")

    fwd = jax.jit(f)

    @jax.jit
    def fwd_bwd(v, l, a, g):
        out, vjp = jax.vjp(f, v, l, a)
        return out, vjp(g)

    # The backward alone: the vjp closure (a pytree of residuals) goes through jit as an argument.
    _, vjp = jax.vjp(fwd, v, l, a)
    bwd = jax.jit(lambda vjp, g: vjp(g))
    fns = {
        "fwd": lambda: jax.block_until_ready(fwd(v, l, a)),
        "bwd": lambda: jax.block_until_ready(bwd(vjp, g)),
        "fwd+bwd": lambda: jax.block_until_ready(fwd_bwd(v, l, a, g)),
    }
    out, grads = fwd_bwd(v, l, a, g)
    return fns, (np.asarray(out), *(np.asarray(t) for t in grads))


def torch_fns(levels: Levels, x: Dict[str, np.ndarray]) -> Tuple[Dict[str, Callable[[], object]], Tuple]:
    """Forward (no grad), backward (graph kept) and forward+backward thunks of the C++ kernel."""
    shapes = torch.tensor(levels, dtype=torch.int64)
    starts = torch.tensor(np.cumsum([0] + [h * w for h, w in levels])[:-1], dtype=torch.int64)
    v, l, a = (torch.from_numpy(x[k]).requires_grad_() for k in ("value", "loc", "attn"))
    g = torch.from_numpy(x["cotangent"])

    def f():
        return torch_ms_deform_attn.ms_deform_attn(v, shapes, starts, l, a)

    def fwd():
        with torch.no_grad():
            return f()

    kept = f()
    fns = {
        "fwd": fwd,
        "bwd": lambda: torch.autograd.grad(kept, (v, l, a), g, retain_graph=True),
        "fwd+bwd": lambda: torch.autograd.grad(f(), (v, l, a), g),
    }
    out = f()
    grads = torch.autograd.grad(out, (v, l, a), g)
    return fns, (out.detach().numpy(), *(t.numpy() for t in grads))


def time_interleaved(
    fns: Dict[str, Dict[str, Callable[[], object]]], reps: int, warmup: int
) -> Dict[str, Dict[str, List[float]]]:
    """Milliseconds per call, ``{impl: {phase: [reps]}}``, alternating implementations per rep."""
    for impl in fns.values():
        for fn in impl.values():
            for _ in range(warmup):
                fn()
    times = {impl: {phase: [] for phase in PHASES} for impl in fns}
    for _ in range(reps):
        for phase in PHASES:
            for impl, impl_fns in fns.items():
                t0 = time.perf_counter()
                impl_fns[phase]()
                times[impl][phase].append((time.perf_counter() - t0) * 1e3)
    return times


def summary(ms: Sequence[float]) -> Dict[str, float]:
    q = np.percentile(ms, [25, 50, 75])
    return {"median": float(q[1]), "q1": float(q[0]), "q3": float(q[2]), "min": float(min(ms))}


def run_shape(name: str, reps: int, warmup: int, seed: int) -> Dict[str, object]:
    q, levels = SHAPES[name]
    x = make_inputs(q, levels, seed)
    print(f"\n{name}: B={BATCH} Q={q} M={HEADS} Dh={HEAD_DIM} P={POINTS} levels={list(levels)}",
          flush=True)
    t0 = time.perf_counter()
    jfns, jres = jax_fns(levels, x)
    compile_s = time.perf_counter() - t0
    tfns, tres = torch_fns(levels, x)
    names = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
    check = {n: rel_err(j, t) for n, j, t in zip(names, jres, tres)}
    print("  agreement (max |jax - torch| / max |torch|): "
          + ", ".join(f"{n} {e:.1e}" for n, e in check.items()), flush=True)
    bad = {n: e for n, e in check.items() if not e <= TOLERANCE}
    if bad:
        raise SystemExit(f"{name}: implementations disagree beyond {TOLERANCE}: {bad}")
    times = time_interleaved({"jax": jfns, "torch": tfns}, reps, warmup)
    stats = {impl: {phase: summary(ms) for phase, ms in ph.items()} for impl, ph in times.items()}
    ratio = {phase: stats["jax"][phase]["median"] / stats["torch"][phase]["median"] for phase in PHASES}
    return {
        "name": name, "queries": q, "levels": [list(hw) for hw in levels],
        "check_rel_err": check, "jax_compile_and_first_run_s": round(compile_s, 2),
        "ms": stats, "ratio_jax_over_torch": ratio,
    }


def print_table(results: List[Dict[str, object]], markdown: bool = False) -> None:
    """Median ms (interquartile range) per shape, implementation and phase, then JAX/torch."""
    def ms(r, impl: str, p: str) -> str:
        t = r["ms"][impl][p]
        return f"{t['median']:.1f} ({t['q1']:.0f}-{t['q3']:.0f})"

    if markdown:
        print("\n| shape | impl | " + " | ".join(f"{p} ms" for p in PHASES) + " |")
        print("|---|---|" + "---:|" * len(PHASES))
        for r in results:
            for impl in ("jax", "torch"):
                print(f"| {r['name']} | {impl} | " + " | ".join(ms(r, impl, p) for p in PHASES) + " |")
            ratios = " | ".join(f"**{r['ratio_jax_over_torch'][p]:.2f}x**" for p in PHASES)
            print(f"| {r['name']} | jax / torch | {ratios} |")
        return
    head = f"{'shape':<10} {'impl':<7}" + "".join(f"{p + ' ms':>20}" for p in PHASES)
    print("\nmedian ms (q1-q3)\n" + head + "\n" + "-" * len(head))
    for r in results:
        for impl in ("jax", "torch"):
            print(f"{r['name']:<10} {impl:<7}" + "".join(ms(r, impl, p).rjust(20) for p in PHASES))
        ratios = "".join(f"{r['ratio_jax_over_torch'][p]:>19.2f}x" for p in PHASES)
        print(f"{r['name']:<10} {'ratio':<7}" + ratios)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    p.add_argument("--reps", type=int, default=15, help="timed repetitions per phase and implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per phase and implementation")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 repetitions, 1 warm-up call")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: schedulable cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    p.add_argument("--out", default=None, help="results file (default results/msda-cpu.json)")
    args = p.parse_args()
    if args.quick:
        args.reps, args.warmup = 2, 1
    if jax.default_backend() != "cpu":
        raise SystemExit(f"a CPU benchmark; JAX runs on {jax.default_backend()} (set JAX_PLATFORMS=cpu)")

    if args.threads:
        torch.set_num_threads(args.threads)
    # XLA:CPU sizes its intra-op pool from the schedulable cores; it has no runtime setter.
    machine = machine_info(torch_ms_deform_attn=getattr(torch_ms_deform_attn, "__version__", "?"))
    print(f"{machine['cpu_model']} ({', '.join(machine['cpu_flags'])}), {machine['cores']} cores; "
          f"jax {machine['jax']}; torch {machine['torch']} ({machine['torch_threads']} threads); "
          f"torch-ms-deform-attn {machine['torch_ms_deform_attn']}")
    load_before = check_quiet("the JAX / torch ratio")
    results = [run_shape(name, args.reps, args.warmup, args.seed) for name in args.shapes]
    print_table(results)
    if args.markdown:
        print_table(results, markdown=True)
    record = {
        "benchmark": "ms_deform_attn sampling core, CPU, float32",
        "date": now(),
        "machine": machine,
        # Other processes on the machine inflate both implementations; the 1-minute load average
        # around the run says how much.
        "load_average_1min": {"before": load_before, "after": check_quiet("the JAX / torch ratio")},
        "config": {
            "batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM, "points": POINTS, "dtype": "float32",
            "reps": args.reps, "warmup": args.warmup, "seed": args.seed, "quick": args.quick,
            "timing": "median wall time per call; implementations interleaved per repetition",
        },
        "results": results,
    }
    print(f"\nwrote {write_record(record, args.out, 'msda-cpu.json')}")


if __name__ == "__main__":
    main()
