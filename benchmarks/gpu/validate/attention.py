"""Step 5: the trunks' attention core on the GPU (dispatch, cuDNN lowering, accuracy, timing)."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .common import (_on_gpu, _tail)


# --- 5. the trunks' attention core -------------------------------------------------------------

# [B, N, H, Dh]: the ViT-S and ViT-B trunks at 256x704 (19x51 patches and the class token) and
# ViT-B at 900x1600 (7,475 tokens), where the float32 logits of one layer are 16 GB.
ATTN_SHAPES: Dict[str, Tuple[int, int, int, int]] = {
    "vits": (2, 970, 6, 64),
    "vitb": (6, 970, 12, 64),
    "vitb_900x1600": (6, 7475, 12, 64),
}
# Dry mode: the second toy shape pretends that nothing fits, to run the slice-reference path.
ATTN_TOY: Dict[str, Tuple[int, int, int, int]] = {"toy": (1, 37, 2, 16), "toy_no_room": (2, 45, 3, 16)}
ATTN_TOL = 2e-2       # bfloat16 (and, on a GPU, everything) against the float32 reference
ATTN_F32_TOL = 1e-5   # float32 against float32 on CPU (same sums, another order)
ATTN_SLICE = (1, 2)   # batch and heads kept when the float32 reference cannot hold the whole shape
FMHA_FWD, FMHA_BWD = "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"


def _oom(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _attn_core(impl: str) -> Callable:
    """``impl``: an implementation name, or ``chunked:<queries>`` for a given chunk size."""
    from jax_adapter.nn import attention

    if impl.startswith("chunked:"):
        chunk = int(impl.split(":")[1])
        return lambda q, k, v: attention.chunked_attention(q, k, v, chunk=chunk)
    return lambda q, k, v: attention.dot_product_attention(q, k, v, implementation=impl)


def _attn_compile(impl: str, phase: str, args: tuple, strict: bool, highest: bool = False):
    """Lowers and compiles one implementation and phase (``fwd``: q, k, v; ``fwd+bwd``: q, k, v,
    g -> out, dq, dk, dv). ``strict``: an AttentionFallbackWarning raises (cuDNN must run).
    ``highest``: float32 matmuls at full precision (no TF32), for the reference.
    Returns the compiled executable and the lowered StableHLO text."""
    import contextlib
    import warnings

    import jax

    from jax_adapter.nn.attention import AttentionFallbackWarning

    core = _attn_core(impl)
    if phase == "fwd":
        fn = core
    else:
        def fn(q, k, v, g):
            out, vjp = jax.vjp(core, q, k, v)
            return (out, *vjp(g))
    prec = jax.default_matmul_precision("highest") if highest else contextlib.nullcontext()
    with warnings.catch_warnings(), prec:
        if strict:
            warnings.simplefilter("error", AttentionFallbackWarning)
        lowered = jax.jit(fn).lower(*args)
        compiled = lowered.compile()
    return compiled, lowered.as_text()


def _attn_memory(compiled) -> dict:
    import jax

    res: Dict[str, Any] = {}
    try:
        m = compiled.memory_analysis()
        res.update(compiled_temp_bytes=int(m.temp_size_in_bytes),
                   compiled_output_bytes=int(m.output_size_in_bytes))
        peak = getattr(m, "peak_memory_in_bytes", None)
        if peak:
            res["compiled_peak_bytes"] = int(peak)
    except Exception as e:  # noqa: BLE001 - a missing analysis is not a failure
        res["compiled"] = f"no memory analysis: {type(e).__name__}"
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        # The process's high-water mark so far (never reset): an upper bound for this call.
        res["device_peak_bytes_so_far"] = int(stats["peak_bytes_in_use"])
    return res


def _free_bytes() -> Optional[int]:
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def _attn_inputs(shape, seed: int):
    """bfloat16 q, k, v and cotangent g, and the same values in float32."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    bf = tuple(jax.random.normal(kk, shape, jnp.float32).astype(jnp.bfloat16) for kk in keys)
    return bf, tuple(x.astype(jnp.float32) for x in bf)


def _rel_dev(a, b) -> float:
    """max |a - b| / max |b|, on the device."""
    import jax.numpy as jnp

    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def _interleaved(calls: Dict[str, Callable[[], Any]], warmup: int, reps: int, budget_s: float) -> dict:
    times: Dict[str, List[float]] = {k: [] for k in calls}
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    budget = time.perf_counter() + budget_s
    for r in range(reps):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
        if r >= 2 and time.perf_counter() > budget:
            break
    return {k: {"median": float(np.median(v)), "q25": float(np.percentile(v, 25)),
                "q75": float(np.percentile(v, 75)), "n": len(v)} for k, v in times.items()}


def _attn_case(shape, impls: Tuple[str, ...], args, *, dry: bool, strict: bool,
               no_room: bool = False, seed: int = 0) -> dict:
    """One shape: the float32 XLA reference (or, where its logits cannot fit, the chunked float32
    path on a slice of batch and heads), agreement of every implementation (``<impl>/<dtype>``),
    interleaved timings of forward and forward+backward, memory. ``no_room`` (dry mode only)
    pretends that no logits fit."""
    import jax

    b, n, h, _ = shape
    logits = 4 * b * h * n * n
    free = _free_bytes()
    rec: Dict[str, Any] = {"shape": list(shape), "logits_f32_bytes": logits, "free_bytes": free}
    if no_room:
        free = logits - 1
        rec.update(free_bytes=free, free_bytes_note="simulated (dry run): nothing fits")
    elif free is None:
        rec["free_bytes_note"] = "the device reports no memory_stats(): assumed to fit"
    fits = free is None or logits <= free
    bf, f32 = _attn_inputs(shape, seed)
    skipped: Dict[str, str] = {}

    # The reference: float32 XLA at full precision on the bfloat16-rounded values.
    ref, sl = None, (slice(None), slice(None), slice(None))
    if fits:
        try:
            ref = _attn_compile("xla", "fwd+bwd", f32, False, highest=True)[0](*f32)
            rec["reference"] = "xla/float32 (highest precision), whole shape"
        except Exception as e:
            if not _oom(e):
                raise
            rec["reference_oom"] = f"{type(e).__name__}: {e}"[:500]
            ref = None
    if ref is None:
        bs, hs = min(ATTN_SLICE[0], b), min(ATTN_SLICE[1], h)
        sl = (slice(0, bs), slice(None), slice(0, hs))
        part = tuple(x[sl] for x in f32)
        ref = _attn_compile("chunked", "fwd+bwd", part, False, highest=True)[0](*part)
        rec["reference"] = (f"chunked/float32 (highest precision) on batch[:{bs}], heads[:{hs}]: the float32 "
                            f"logits of the whole shape ({logits} bytes) do not fit"
                            + (f" in {free} free bytes" if free is not None else "")
                            + ("; the XLA reference ran out of memory" if "reference_oom" in rec else ""))

    parity: Dict[str, Dict[str, float]] = {}
    memory: Dict[str, dict] = {}
    calls: Dict[str, Dict[str, Callable[[], Any]]] = {"fwd": {}, "fwd+bwd": {}}
    errors: List[str] = []
    for key in impls:
        impl, dtype = key.split("/")
        if impl == "xla" and dtype == "bfloat16" and not fits:
            skipped[key] = (f"float32 logits need {logits} bytes, free {free}"
                            + (" (simulated)" if no_room else ""))
            continue
        x = bf if dtype == "bfloat16" else f32
        tol = ATTN_F32_TOL if (dtype == "float32" and dry) else ATTN_TOL
        try:
            errs: Dict[str, float] = {}
            for phase, fargs in (("fwd", x[:3]), ("fwd+bwd", x)):
                compiled, text = _attn_compile(impl, phase, fargs, strict and impl in ("cudnn", "auto")
                                               and dtype == "bfloat16")
                if strict and impl == "cudnn":
                    want = FMHA_FWD if phase == "fwd" else FMHA_BWD
                    if want not in text:
                        errors.append(f"{key} {phase}: no {want} custom call in the lowered program")
                got = compiled(*fargs)
                got = (got,) if phase == "fwd" else got
                for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
                    errs[f"{phase}/{name}"] = _rel_dev(g[sl], r)
                memory[f"{key}/{phase}"] = _attn_memory(compiled)
                calls[phase][key] = (lambda c=compiled, a=fargs: jax.block_until_ready(c(*a)))
                del got
            worst = float(np.max(list(errs.values())))  # NaN if any is NaN
            parity[key] = {**errs, "max": worst, "tol": tol}
            if not worst < tol:
                errors.append(f"{key}: max error {worst:.3g} not below {tol}")
        except Exception as e:
            # One implementation failing (cuDNN refusing, raised as AttentionFallbackWarning) must
            # not stop the others; out of memory in XLA is a skip, anything else a failure.
            for phase_calls in calls.values():
                phase_calls.pop(key, None)
            if impl == "xla" and _oom(e):
                skipped[key] = f"out of memory: {type(e).__name__}: {str(e)[:300]}"
            else:
                import traceback

                errors.append(f"{key}: {type(e).__name__}: {str(e)[:1000]}")
                rec.setdefault("tracebacks", {})[key] = _tail(traceback.format_exc(), 2000)
    del ref
    rec.update(parity_vs_reference=parity, memory=memory, skipped=skipped)
    warmup = 1 if dry else 3
    reps = 2 if dry else args.reps
    rec["ms"] = {}
    for phase, phase_calls in calls.items():
        stats = _interleaved(phase_calls, warmup, reps, args.phase_budget)
        base = stats.get("xla/bfloat16")
        if base:
            for k in stats:
                stats[k]["vs_xla_bf16"] = stats[k]["median"] / base["median"]
        rec["ms"][phase] = stats
    if errors:
        rec["errors"] = errors
    del bf, f32, calls
    return rec


def _dry_checks() -> dict:
    """CPU only: the dispatch rule, chunked against XLA in float32, forced cuDNN's fallback."""
    import warnings

    import jax
    import jax.numpy as jnp

    from jax_adapter.nn.attention import (
        AttentionFallbackWarning,
        choose_implementation,
        chunked_attention,
        dot_product_attention,
        xla_attention,
    )

    shape = ATTN_TOY["toy"]
    bf, f32 = _attn_inputs(shape, 1)
    res: Dict[str, Any] = {}
    backend = jax.default_backend()
    picks = {dt: choose_implementation(backend, getattr(jnp, dt), shape[-1]) for dt in ("bfloat16", "float32")}
    same = {dt: bool(jnp.array_equal(dot_product_attention(*x[:3]), chunked_attention(*x[:3])))
            for dt, x in (("bfloat16", bf), ("float32", f32))}
    res["auto_picks_chunked"] = {"choose_implementation": picks, "auto_equals_chunked": same,
                                 "ok": all(p == "chunked" for p in picks.values()) and all(same.values())}
    ref = _attn_compile("xla", "fwd+bwd", f32, False)[0](*f32)
    agree = {}
    for impl in ("chunked", "chunked:8"):
        got = _attn_compile(impl, "fwd+bwd", f32, False)[0](*f32)
        agree[impl] = max(_rel_dev(g, r) for g, r in zip(got, ref))
    res["chunked_vs_xla_float32"] = {"max_err": agree, "tol": ATTN_F32_TOL,
                                     "ok": all(e < ATTN_F32_TOL for e in agree.values())}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        forced = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, implementation="cudnn"))(*bf[:3])
    fell_back = [str(w.message) for w in caught if issubclass(w.category, AttentionFallbackWarning)]
    equal = bool(jnp.array_equal(forced, jax.jit(xla_attention)(*bf[:3])))
    res["forced_cudnn_falls_back"] = {"warning": fell_back[0] if fell_back else None, "equals_xla": equal,
                                      "ok": bool(fell_back) and equal}
    return res


def step_attention(args) -> dict:
    import jax
    import jax.numpy as jnp

    from jax_adapter.nn.attention import choose_implementation

    dry = args.dry_run or not _on_gpu()
    backend = jax.default_backend()
    cc = getattr(jax.devices()[0], "compute_capability", None)
    res: Dict[str, Any] = {
        "backend": backend, "compute_capability": cc,
        "choose_bf16_dh64": choose_implementation(backend, jnp.bfloat16, 64, cc),
        "choose_f32_dh64": choose_implementation(backend, jnp.float32, 64, cc),
        "tol": ATTN_TOL, "reps": 2 if dry else args.reps, "warmup": 1 if dry else 3,
    }
    failures: List[str] = []
    if dry:
        res["skipped_parts"] = {
            "cudnn": "needs a CUDA GPU: chunked/bfloat16 stands in for it at toy sizes",
            "auto_bf16_runs_cudnn": "needs a CUDA GPU",
            "gpu_shapes": "toy shapes instead of " + ", ".join(f"{k} {list(v)}" for k, v in ATTN_SHAPES.items()),
        }
        res["checks"] = _dry_checks()
        failures += [f"check {k}" for k, v in res["checks"].items() if not v["ok"]]
        cases = {name: (shape, ("chunked/bfloat16", "xla/bfloat16", "auto/float32", "chunked:8/float32"),
                        name == "toy_no_room") for name, shape in ATTN_TOY.items()}
        res["expected_auto"] = {"bfloat16": "chunked", "float32": "chunked"}
    else:
        if res["choose_bf16_dh64"] != "cudnn":
            failures.append(f"choose_implementation picks {res['choose_bf16_dh64']} for bfloat16, Dh 64")
        if res["choose_f32_dh64"] != "xla":
            failures.append(f"choose_implementation picks {res['choose_f32_dh64']} for float32, Dh 64")
        # "auto" in bfloat16 must lower to cuDNN's kernels without falling back.
        bf, _ = _attn_inputs(ATTN_SHAPES["vits"], 2)
        auto: Dict[str, Any] = {"shape": list(ATTN_SHAPES["vits"])}
        try:
            for phase, fargs, want in (("fwd", bf[:3], FMHA_FWD), ("fwd+bwd", bf, FMHA_BWD)):
                compiled, text = _attn_compile("auto", phase, fargs, True)
                out = jax.block_until_ready(compiled(*fargs))
                out = (out,) if phase == "fwd" else out
                auto[phase] = {"cudnn_call": want in text,
                               "finite": all(bool(jnp.isfinite(o).all()) for o in out)}
                if not (auto[phase]["cudnn_call"] and auto[phase]["finite"]):
                    failures.append(f"auto bfloat16 {phase}: {auto[phase]}")
        except Exception as e:  # noqa: BLE001 - AttentionFallbackWarning raised as an error lands here
            auto["error"] = f"{type(e).__name__}: {e}"[:2000]
            failures.append("auto bfloat16 fell back or failed")
        res["auto_bf16_runs_cudnn"] = auto
        del bf
        cases = {name: (shape, ("cudnn/bfloat16", "xla/bfloat16") + (("auto/float32",) if name == "vits" else ()),
                        False) for name, shape in ATTN_SHAPES.items()}
        res["expected_auto"] = {"bfloat16": "cudnn", "float32": "xla"}
    res["shapes"] = {}
    for name, (shape, impls, no_room) in cases.items():
        try:
            rec = _attn_case(shape, impls, args, dry=dry, strict=not dry, no_room=no_room)
        except Exception as e:  # noqa: BLE001 - one shape failing must not stop the others
            import traceback

            rec = {"shape": list(shape), "errors": [f"{type(e).__name__}: {e}"[:2000]],
                   "traceback": _tail(traceback.format_exc())}
        res["shapes"][name] = rec
        failures += [f"{name}: {err}" for err in rec.get("errors", [])]
        for phase, stats in rec.get("ms", {}).items():
            if "cudnn/bfloat16" in stats and "xla/bfloat16" in stats:
                res.setdefault("cudnn_vs_xla", {}).setdefault(name, {})[phase] = \
                    stats["cudnn/bfloat16"]["median"] / stats["xla/bfloat16"]["median"]
    return {"status": "failed" if failures else "ok", **res,
            **({"reason": "; ".join(failures)[:2000]} if failures else {})}
