"""Deviceless TPU compile report of the deformable-attention sampling core (forward + backward).

    # with the plan-tpu extra (libtpu; no TPU needed), from the repository root:
    python -m benchmarks.tpu.core                          # v5e:1x1, prints a table
    python -m benchmarks.tpu.core --topology v6e:1x1 --out benchmarks/results/tpu_core-v6e.json
    python -m benchmarks.tpu.core --impls pallas --shapes injector --fused

Compiles ``jax.vjp`` of the sampling core (output and all gradients in one program) for a TPU
topology with compile-only devices, at the ViT-S adapter seed shapes (6 cameras at 256x704,
M=6 heads of Dh=64, P=4, bfloat16 value and cotangent, float32 locations and weights), for
three implementations:

* ``xla``: :func:`jax_adapter.nn.msda_xla.ms_deform_attn_xla` (its per-(batch, head) gather loop,
  the formulation TPUs get);
* ``dense``: :func:`jax_adapter.nn.msda_dense.ms_deform_attn_dense` (sampling matrices, chunked);
* ``pallas``: :func:`jax_adapter.pallas_kernels.tpu.ms_deform_attn_tpu` (Mosaic kernels).

Reported per program: lower and compile time, generated code size, ``memory_analysis`` (peak),
``cost_analysis`` flops and bytes accessed (for Pallas kernels XLA counts the ``CostEstimate``
the kernels declare), the number of gather and scatter HLO instructions in the compiled
program, and for the Pallas kernels their MXU / VPU FLOPs and HBM bytes per call computed from
the grid and block specs (``tpu.call_costs``; an upper bound: chunks of rows outside a query
block's band are skipped at run time; ``band_at_init`` is the share of chunk steps run with the
layer's initial sampling offsets). ``--llo`` also dumps the Mosaic kernels and counts the
low-level vector ops (VALU, loads, MXU pushes, ...) in each chunk-loop iteration, and the VALU
ops per call they add up to: the elementwise work that the MXU roofline does not show.

XLA's cost analysis counts the body of a while loop once, whatever its trip count. The XLA core
loops over the ``B*M`` (batch, head) pairs and the dense core over query chunks, so their raw
``cost_*`` numbers undercount; ``scaled_*`` compiles the loop-free unit (one pair at B=M=1 /
one chunk of queries), checks that it has no loop, and multiplies by the number of units.
``roofline_s`` is ``max(scaled flops / peak, scaled bytes / bandwidth)`` for the chip's
bfloat16 peak and HBM bandwidth (v5e: 197 TFLOP/s, 819 GB/s; v6e: 918 TFLOP/s, 1640 GB/s): a
lower bound from XLA's counts, not a measurement; it ignores VPU work (the Pallas kernels'
tents) and gather throughput (the XLA core's), which is what bounds them in practice.

Nothing runs on a TPU here: these are compiler results, not timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

# Compile-only TPU devices in a CPU process (jax_adapter.plan.targets sets libtpu's host
# variables): the CPU platform for everything that runs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# --llo: libtpu must be told where to dump the Mosaic kernels before it is loaded.
LLO_DIR = None
if "--llo" in sys.argv:
    import tempfile

    LLO_DIR = tempfile.mkdtemp(prefix="mosaic-dump-")
    os.environ["LIBTPU_INIT_ARGS"] = (os.environ.get("LIBTPU_INIT_ARGS", "")
                                      + f" --xla_mosaic_dump_to={LLO_DIR}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

Levels = Tuple[Tuple[int, int], ...]

SHAPES: Dict[str, Tuple[int, Levels]] = {
    "injector": (969, ((34, 90), (17, 45), (9, 23))),
    "extractor": (4032, ((19, 51),)),
}
BATCH, HEADS, HEAD_DIM, POINTS = 6, 6, 64, 4
IMPLS = ("xla", "dense", "pallas")
# bfloat16 peak FLOP/s and HBM bytes/s per chip (public spec sheets).
PEAKS = {"v5e": (197e12, 819e9), "v6e": (918e12, 1640e9)}


def tpu_device(topology: str):
    """The first compile-only device of a topology such as ``v5e:1x1`` (needs libtpu)."""
    from jax_adapter.plan import targets

    gen, _, chips = topology.partition(":")
    spec = next((t for t in targets.TARGETS.values() if t.platform == "tpu" and t.device.topology == gen), None)
    if spec is None:
        raise SystemExit(f"unknown TPU generation {gen!r} in {topology!r}")
    return targets.devices(spec, chips or None)[0]


def core_fn(impl: str, shapes: Levels, fused: bool, chunk: int | None = None) -> Callable:
    """``fn(value, *inputs)`` of one implementation (plain or fused entry point)."""
    from jax_adapter.nn import msda, msda_dense, msda_xla
    from jax_adapter.pallas_kernels import tpu

    if not fused:
        return {
            "xla": lambda v, l, a: msda_xla.ms_deform_attn_xla(v, shapes, l, a),
            "dense": lambda v, l, a: msda_dense.ms_deform_attn_dense(v, shapes, l, a, chunk=chunk),
            "pallas": lambda v, l, a: tpu.ms_deform_attn_tpu(v, shapes, l, a),
        }[impl]
    if impl == "pallas":
        return lambda v, r, o, z: tpu.ms_deform_attn_fused_tpu(v, shapes, r, o, z)
    if impl == "dense":
        return lambda v, r, o, z: msda_dense.ms_deform_attn_dense_fused(v, shapes, r, o, z, chunk=chunk)
    return lambda v, r, o, z: msda_xla.ms_deform_attn_xla(v, shapes, *msda.sampling_inputs(shapes, r, o, z))


def input_structs(q: int, shapes: Levels, fused: bool, sharding, b: int = BATCH,
                  m: int = HEADS) -> List[jax.ShapeDtypeStruct]:
    """Value, per-query inputs and cotangent as the bfloat16 model passes them."""
    n_l, s = len(shapes), sum(h * w for h, w in shapes)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    value = sds((b, s, m, HEAD_DIM), jnp.bfloat16)
    ct = sds((b, q, m * HEAD_DIM), jnp.bfloat16)
    if fused:  # DeformAttn: float32 reference points and offsets, bfloat16 logits
        rest = [sds((b, q, 2), jnp.float32), sds((b, q, m, n_l, POINTS, 2), jnp.float32),
                sds((b, q, m, n_l * POINTS), jnp.bfloat16)]
    else:  # float32 locations and softmaxed weights
        rest = [sds((b, q, m, n_l, POINTS, 2), jnp.float32), sds((b, q, m, n_l, POINTS), jnp.float32)]
    return [value] + rest + [ct]


def hlo_op_count(text: str, op: str) -> int:
    """Instructions ``op(`` in compiled HLO text (fused computations included; ``all-gather``
    and ``reduce-scatter`` are other ops and not counted)."""
    return len(re.findall(rf"\s{op}\(", text))


def _compile(device, fn: Callable, args, ct) -> Tuple[Dict[str, Any], Any]:
    """Lower and compile ``jax.vjp(fn)`` (output and all gradients) for ``device``."""

    def fwd_bwd(args, ct):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(ct)

    t0 = time.perf_counter()
    with jax.default_device(device):  # Pallas TPU lowering asks the default device's kind
        lowered = jax.jit(fwd_bwd).lower(tuple(args), ct)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    rec: Dict[str, Any] = {"lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}
    ma = compiled.memory_analysis()
    for k in ("generated_code_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
              "alias_size_in_bytes", "temp_size_in_bytes", "peak_memory_in_bytes"):
        v = getattr(ma, k, None)
        if v is not None:
            rec[k] = int(v)
    ca = compiled.cost_analysis()
    ca = (ca[0] if isinstance(ca, (list, tuple)) else ca) or {}
    rec["cost_flops"] = float(ca.get("flops", 0.0))
    rec["cost_bytes_accessed"] = float(ca.get("bytes accessed", 0.0))
    text = compiled.as_text()
    rec.update(gathers=hlo_op_count(text, "gather"), scatters=hlo_op_count(text, "scatter"),
               mosaic_kernels=text.count('custom_call_target="tpu_custom_call"'),
               while_loops=hlo_op_count(text, "while"))
    return rec, compiled


def compile_one(device, impl: str, name: str, fused: bool) -> Dict[str, Any]:
    """Compile one implementation at one seed shape, plus (for the implementations with an XLA
    loop) the loop-free unit it repeats, for loop-corrected costs (see :func:`loop_unit`)."""
    from jax_adapter.nn import msda_dense

    q, shapes = SHAPES[name]
    s = sum(h * w for h, w in shapes)
    sharding = jax.sharding.SingleDeviceSharding(device)
    *args, ct = input_structs(q, shapes, fused, sharding)
    rec: Dict[str, Any] = {"impl": impl, "shape": name, "entry": "fused" if fused else "plain",
                           "queries": q, "levels": [list(x) for x in shapes]}
    before = set(os.listdir(LLO_DIR)) if LLO_DIR else set()
    res, _ = _compile(device, core_fn(impl, shapes, fused), args, ct)
    rec.update(res)
    dumped = ([os.path.join(LLO_DIR, f) for f in sorted(set(os.listdir(LLO_DIR)) - before)
               if f.endswith("post-finalize-llo.txt")] if LLO_DIR else [])
    # XLA's cost analysis counts a while loop's body once, whatever its trip count. The XLA
    # core loops over the B*M (batch, head) pairs, the dense core over query chunks: compile
    # the loop-free unit (one pair / one chunk, same per-unit shapes) and scale it.
    unit = None
    if impl == "xla":
        unit = dict(b=1, m=1, q=q, chunk=None, repeats=BATCH * HEADS, what="one (batch, head) pair")
    elif impl == "dense":
        chunk = msda_dense.default_chunk(BATCH, HEADS, s, q)
        unit = dict(b=BATCH, m=HEADS, q=chunk, chunk=chunk, repeats=-(-q // chunk),
                    what=f"one chunk of {chunk} queries")
    if unit is not None:
        *uargs, uct = input_structs(unit["q"], shapes, fused, sharding, b=unit["b"], m=unit["m"])
        ures, _ = _compile(device, core_fn(impl, shapes, fused, unit["chunk"]), uargs, uct)
        rec["loop_unit"] = {"what": unit["what"], "repeats": unit["repeats"],
                            "while_loops": ures["while_loops"], "cost_flops": ures["cost_flops"],
                            "cost_bytes_accessed": ures["cost_bytes_accessed"]}
        rec["scaled_flops"] = ures["cost_flops"] * unit["repeats"]
        rec["scaled_bytes_accessed"] = ures["cost_bytes_accessed"] * unit["repeats"]
    else:
        rec["scaled_flops"], rec["scaled_bytes_accessed"] = rec["cost_flops"], rec["cost_bytes_accessed"]
    if impl == "pallas":
        from jax_adapter.pallas_kernels import tpu

        rec["kernel_costs"] = tpu.call_costs((BATCH, s, HEADS, HEAD_DIM), jnp.bfloat16, shapes, q,
                                             POINTS, fused=fused)
        rec["band_at_init"] = band_fraction_at_init(name)
        if dumped:
            rec["llo"] = llo_report(llo_loop_stats(dumped), rec["kernel_costs"],
                                    rec["band_at_init"]["fraction"])
    return rec


# LLO op classes counted per chunk iteration (Mosaic's low-level ops before scheduling).
LLO_CLASSES = {
    "valu": ("vadd", "vmul", "vsub", "vselect", "vcmp", "vmax", "vmin", "vfloor", "vand", "vor",
             "vshrl", "vshll", "vcvt", "vmand", "vmor", "vmxor"),
    "vector_load": ("vector_load",), "vector_store": ("vector_store",),
    "mxu_push": ("vmatmul",), "mxu_result": ("vmatres",),
    "shuffle_pack": ("vrot", "vpack", "vunpack", "vslreplicate", "vpack_format"),
}


def llo_loop_stats(files: List[str]) -> Dict[str, List[Dict[str, int]]]:
    """Kernel name -> op counts of every innermost ``scf.for`` body (the chunk loops, one per
    level, in program order) in Mosaic's final LLO dumps."""
    import collections

    out: Dict[str, List[Dict[str, int]]] = {}
    for path in files:
        lines = open(path).read().splitlines()
        name = next((m.group(1) for m in (re.search(r"func.func @(\w+)", x) for x in lines[:3]) if m), "?")
        loops = []
        for i, line in enumerate(lines):
            if "scf.for" not in line:
                continue
            indent = len(line) - len(line.lstrip())
            j = i + 1
            while j < len(lines) and not (lines[j].strip().startswith("}")
                                          and len(lines[j]) - len(lines[j].lstrip()) == indent):
                j += 1
            body = "\n".join(lines[i + 1:j])
            if "scf.for" in body:  # not innermost
                continue
            ops = collections.Counter(re.findall(r"llo\.([a-z_0-9]+)", body))
            loops.append({k: sum(ops[o] for o in v) for k, v in LLO_CLASSES.items()})
        out[name] = loops
    return out


def llo_report(stats, kernel_costs, band: float) -> Dict[str, Any]:
    """Per kernel: op counts per chunk iteration of each level, and VALU ops per call (all
    chunks, and scaled by the share of chunk steps run at the initial offsets)."""
    rep = {}
    for name, phase in (("msda_tpu_forward", "forward"), ("msda_tpu_backward", "backward")):
        loops = stats.get(name, [])
        levels = kernel_costs["levels"]
        if len(loops) != len(levels):
            rep[phase] = {"error": f"{len(loops)} innermost loops for {len(levels)} levels"}
            continue
        per_step = kernel_costs[phase]["grid_steps"] * kernel_costs["head_group"]
        valu = sum(per_step * lv["chunks"] * lp["valu"] for lv, lp in zip(levels, loops))
        rep[phase] = {"per_chunk_iteration": loops, "valu_ops_all_chunks": valu,
                      "valu_ops_at_init_band": valu * band}
    return rep


def reference_points(name: str):
    """Query reference points of the adapter: ViT token centres (injector), SPM token centres of
    the three levels (extractor), normalised (x, y)."""
    import numpy as np

    grids = {"injector": ((19, 51),), "extractor": SHAPES["injector"][1]}[name]
    pts = []
    for h, w in grids:
        yy, xx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
        pts.append(np.stack([xx.ravel(), yy.ravel()], -1))
    return np.concatenate(pts, 0)


def band_fraction_at_init(name: str) -> Dict[str, float]:
    """Share of the (query block, head, level, chunk) steps that the kernels run (the rest are
    outside the band of rows a block touches) with the initial sampling offsets of
    ``MSDeformAttn`` (head m along angle 2*pi*m/M, point p at p+1 pixels) and the adapter's
    reference points. Trained offsets spread further; this is a property of the initialisation,
    not a measurement of a trained model."""
    import numpy as np
    from jax_adapter.nn.deform_attn import _offset_bias
    from jax_adapter.pallas_kernels import tpu

    q, shapes = SHAPES[name]
    ref = reference_points(name)
    assert ref.shape[0] == q
    off = _offset_bias(HEADS, len(shapes), POINTS).reshape(HEADS, len(shapes), POINTS, 2)
    levels = tpu.make_levels(shapes)
    bq = tpu.DEFAULT_BLOCK_Q
    active = total = 0
    for l, (lv, (h, w)) in enumerate(zip(levels, shapes)):
        for m in range(HEADS):
            y = ref[:, None, 1] + off[m, l, :, 1][None] / h  # [Q, P]
            y0 = np.floor(y * h - 0.5)
            for start in range(0, q, bq):
                yb = y0[start:start + bq]
                first = np.clip(yb, 0, h - 1).min() // lv.rows
                last = np.clip(yb + 1, 0, h - 1).max() // lv.rows
                active += int(last - first + 1)
                total += lv.chunks
    return {"active_chunk_steps": active, "all_chunk_steps": total, "fraction": active / total}


def roofline(rec: Dict[str, Any], topology: str) -> None:
    gen = topology.partition(":")[0]
    if gen not in PEAKS:
        return
    flops_s, bytes_s = PEAKS[gen]
    rec["roofline_s"] = max(rec["scaled_flops"] / flops_s, rec["scaled_bytes_accessed"] / bytes_s)
    kc = rec.get("kernel_costs")
    if kc:
        for phase in ("forward", "backward"):
            c = kc[phase]
            # MXU work at the bfloat16 peak; VPU work is not on the MXU and not in this bound.
            c["roofline_s"] = max(c["mxu_flops"] / flops_s, c["hbm_bytes"] / bytes_s)


def table(records: List[Dict[str, Any]]) -> str:
    """Markdown table of the records."""
    head = ["shape", "entry", "impl", "gathers", "scatters", "code MB", "peak MB", "GFLOP",
            "GB accessed", "GFLOP loop-corr.", "GB loop-corr.", "roofline ms", "compile s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        cells = [r["shape"], r["entry"], r["impl"]]
        if "error" in r:
            cells.append("error: " + r["error"][:100])
        else:
            roof = f"{r['roofline_s'] * 1e3:.4f}" if "roofline_s" in r else "n/a"
            cells += [r["gathers"], r["scatters"], f"{r.get('generated_code_size_in_bytes', 0) / 1e6:.2f}",
                      f"{r.get('peak_memory_in_bytes', 0) / 1e6:.1f}", f"{r['cost_flops'] / 1e9:.3f}",
                      f"{r['cost_bytes_accessed'] / 1e9:.4f}", f"{r['scaled_flops'] / 1e9:.3f}",
                      f"{r['scaled_bytes_accessed'] / 1e9:.4f}", roof, r["compile_s"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", default="v5e:1x1")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {tuple(SHAPES)}")
    p.add_argument("--fused", action="store_true", help="also the fused entry points")
    p.add_argument("--out", default=None, help="write the records as JSON here")
    p.add_argument("--llo", action="store_true",
                   help="count Mosaic LLO ops per chunk iteration of the Pallas kernels")
    a = p.parse_args(argv)
    impls = [i for i in a.impls.split(",") if i]
    names = [n for n in a.shapes.split(",") if n]
    bad = [i for i in impls if i not in IMPLS] + [n for n in names if n not in SHAPES]
    if bad:
        p.error(f"unknown impl or shape: {bad}")

    device = tpu_device(a.topology)
    print(f"{a.topology}: {device.device_kind}, jax {jax.__version__}", flush=True)
    records = []
    for name in names:
        for fused in ((False, True) if a.fused else (False,)):
            for impl in impls:
                try:
                    rec = compile_one(device, impl, name, fused)
                    roofline(rec, a.topology)
                except Exception as e:  # noqa: BLE001 - a failed compile is a result too
                    rec = {"impl": impl, "shape": name, "entry": "fused" if fused else "plain",
                           "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:500]}"}
                print(json.dumps(rec), flush=True)
                records.append(rec)
    print(table(records))
    if a.out:
        meta = {"topology": a.topology, "device_kind": device.device_kind, "jax": jax.__version__,
                "host": platform.node(), "batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM,
                "points": POINTS, "dtype": "bfloat16", "peaks": PEAKS.get(a.topology.partition(":")[0])}
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1)
        print(f"wrote {a.out}")
    if LLO_DIR:
        import shutil

        shutil.rmtree(LLO_DIR, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
