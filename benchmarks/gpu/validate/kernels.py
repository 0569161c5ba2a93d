"""Steps 1-4: the Pallas tests compiled, the hard cases under compute-sanitizer, the PyTorch CUDA
reference kernel, the sampling-core timings."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .common import (PARITY_TOL, ROOT, SEED, SEED_DIMS, TOY, TOY_DIMS, Levels, _nvcc, _on_gpu, _rel,
                     _sanitizer, _tail)


# --- 1. the Pallas test file -----------------------------------------------------------------


def step_tests(args) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit/test_pallas_kernels.py"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    out = run.stdout + run.stderr
    summary = [line for line in out.splitlines() if " passed" in line or " failed" in line or " error" in line]
    return {"status": "ok" if run.returncode == 0 else "failed", "compiled": _on_gpu(),
            "summary": summary[-1] if summary else "", "output_tail": _tail(out),
            **({"reason": f"pytest exit {run.returncode}"} if run.returncode else {})}


# --- 2. hard cases (under compute-sanitizer on GPU) ----------------------------------------


def hard_cases() -> dict:
    """Both entry points, forward+backward, float32/bfloat16, on locations that are off the map,
    far, NaN or infinite and on many queries sharing one pixel; compared with XLA."""
    import jax
    import jax.numpy as jnp

    from jax_adapter.nn import msda

    rng = np.random.default_rng(0)
    results = {}
    for shapes, (b, q, m, dh, p) in [(((5, 6), (2, 3)), (2, 70, 2, 5, 2)), (((7, 9),), (2, 45, 4, 12, 4))]:
        n_l, s = len(shapes), sum(h * w for h, w in shapes)
        loc = rng.uniform(-0.3, 1.3, size=(b, q, m, n_l, p, 2)).astype(np.float32)
        loc[0, 0, 0, 0, 0] = [1e9, -1e9]
        loc[0, 1, 0, 0, 0] = [-1e9, 1e9]
        loc[1, 0, m - 1, n_l - 1, p - 1] = [np.nan, 0.5]
        loc[1, 1, 0, 0, p - 1] = [np.inf, 0.5]
        loc[1, 2, m - 1, 0, 0] = [0.5, -np.inf]
        loc[0, 2, 0, n_l - 1, 0] = [-5.0, 7.0]
        loc[:, 10:, 0, 0, :] = [0.37, 0.61]  # many queries (and points) on one pixel
        ref = rng.uniform(size=(b, q, 2)).astype(np.float32)
        norm = np.array([[w, h] for h, w in shapes], np.float32)[None, None, None, :, None]
        offsets = (loc - ref[:, :, None, None, None]) * norm
        logits = rng.normal(size=(b, q, m, n_l * p)).astype(np.float32)
        for dtype in ("float32", "bfloat16"):
            value = jnp.asarray(rng.normal(size=(b, s, m, dh)), dtype)
            attn = jnp.asarray(rng.uniform(size=(b, q, m, n_l, p)), dtype)
            ct = jnp.asarray(rng.normal(size=(b, q, m * dh)), dtype)
            cases = {
                "ms_deform_attn": (lambda impl: lambda v, l, a: msda.ms_deform_attn(v, shapes, l, a, impl=impl),
                                   (value, jnp.asarray(loc), attn)),
                "ms_deform_attn_fused": (
                    lambda impl: lambda v, r, o, z: msda.ms_deform_attn_fused(v, shapes, r, o, z, impl=impl),
                    (value, jnp.asarray(ref), jnp.asarray(offsets), jnp.asarray(logits))),
            }
            for entry, (make, fargs) in cases.items():

                def run(fn, args):
                    out, vjp = jax.vjp(fn, *args)
                    return (out, *vjp(ct.astype(out.dtype)))

                got = jax.block_until_ready(jax.jit(lambda a: run(make("pallas"), a))(fargs))
                f32 = tuple(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in fargs)
                want = jax.jit(lambda a: run(make("xla"), a))(f32)
                errs = [_rel(np.asarray(g, np.float32), np.asarray(w, np.float32)) for g, w in zip(got, want)]
                finite = all(bool(np.isfinite(np.asarray(g, np.float32)).all()) for g in got)
                tol = 1e-4 if dtype == "float32" else 3e-2
                # Location gradients are one-sided where a location sits exactly on a pixel
                # centre; random locations do not, so all arrays are compared.
                results[f"{entry}/{dtype}/L{n_l}"] = {"max_rel_err": max(errs), "finite": finite,
                                                      "ok": finite and max(errs) < tol}
    return results


def step_sanitizer(args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.gpu.validate", "--hard-cases"]
    env = dict(os.environ)
    if args.dry_run or not _on_gpu():
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        res = _hard_case_result(run)
        res["sanitizer"] = "skipped (no GPU): hard cases run without compute-sanitizer"
        return res
    tool = _sanitizer()
    if tool is None:
        return {"status": "failed", "reason": "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda)"}
    # One cudaMalloc per buffer (no pooled arena) so that memcheck knows every buffer's bounds.
    env.update(XLA_PYTHON_CLIENT_PREALLOCATE="false", XLA_PYTHON_CLIENT_ALLOCATOR="platform")
    full = [tool, "--tool", "memcheck", "--error-exitcode", "99", "--leak-check", "no"] + cmd
    run = subprocess.run(full, cwd=ROOT, capture_output=True, text=True, env=env)
    res = _hard_case_result(run)
    summary = [line for line in (run.stdout + run.stderr).splitlines() if "ERROR SUMMARY" in line]
    res["sanitizer"] = summary[-1].strip() if summary else "no ERROR SUMMARY line"
    if run.returncode == 99 or (summary and " 0 errors" not in summary[-1]):
        res.update(status="failed", reason="memcheck reported errors")
    return res


def _hard_case_result(run: subprocess.CompletedProcess) -> dict:
    out = run.stdout + run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("HARD_CASES ")]
    if run.returncode != 0 or not lines:
        return {"status": "failed", "reason": f"hard cases exit {run.returncode}", "output_tail": _tail(out)}
    cases = json.loads(lines[-1][len("HARD_CASES "):])
    bad = [k for k, v in cases.items() if not v["ok"]]
    return {"status": "failed" if bad else "ok", "cases": cases,
            **({"reason": f"mismatch or non-finite: {bad}"} if bad else {})}


# --- 3. the PyTorch CUDA reference kernel ------------------------------------------------------


def _find_sdist(path: Optional[str]) -> Optional[str]:
    if path:
        return path if os.path.exists(path) else None
    found = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "gpu", "torch_ms_deform_attn-*.tar.gz")))
    return found[-1] if found else None


def step_reference(args, state: dict) -> dict:
    import tarfile

    sdist = _find_sdist(args.sdist)
    if sdist is None:
        return {"status": "failed" if not args.dry_run else "skipped",
                "reason": "sdist not found (see the header: pip download ... torch-ms-deform-attn)"}
    with tarfile.open(sdist) as tf:
        names = tf.getnames()
    cuda_sources = [n for n in names if "/csrc/cuda/" in n and n.endswith(".cu")]
    res = {"sdist": os.path.basename(sdist), "cuda_sources": [os.path.basename(n) for n in cuda_sources]}
    if not cuda_sources:
        return {**res, "status": "failed", "reason": "no CUDA sources in the sdist"}
    import torch

    if args.dry_run or not torch.cuda.is_available() or _nvcc() is None:
        return {**res, "status": "skipped", "reason": "needs a CUDA torch, a GPU and nvcc (sdist checked)"}
    major, minor = torch.cuda.get_device_capability()
    target = tempfile.mkdtemp(prefix="msda-ref-")
    env = dict(os.environ, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=f"{major}.{minor}",
               MAX_JOBS=str(os.cpu_count() or 4))
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
           "--target", target, sdist]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        return {**res, "status": "failed", "reason": f"build exit {run.returncode}",
                "output_tail": _tail(run.stdout + run.stderr)}
    sys.path.insert(0, target)
    import torch_ms_deform_attn
    from torch_ms_deform_attn import _C

    state["torch_ms_deform_attn"] = torch_ms_deform_attn
    return {**res, "status": "ok" if _C.with_cuda else "failed", "with_cuda": bool(_C.with_cuda),
            "arch": f"sm_{major}{minor}"}


# --- 4. sampling-core timings --------------------------------------------------------------


def _inputs(rng, q: int, levels: Levels, b: int, m: int, dh: int, p: int):
    n_l, s = len(levels), sum(h * w for h, w in levels)
    value = rng.normal(size=(b, s, m, dh)).astype(np.float32)
    loc = rng.uniform(-0.05, 1.05, size=(b, q, m, n_l, p, 2)).astype(np.float32)
    logits = rng.normal(size=(b, q, m, n_l * p))
    attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    attn = attn.reshape(b, q, m, n_l, p).astype(np.float32)
    ct = rng.normal(size=(b, q, m * dh)).astype(np.float32)
    return value, loc, attn, ct


def _jax_fns(impl: str, levels: Levels, dtype: str):
    import jax
    import jax.numpy as jnp

    from jax_adapter.nn import msda

    core = lambda v, l, a: msda.ms_deform_attn(v, levels, l, a, impl=impl)  # noqa: E731
    fwd = jax.jit(core)

    @jax.jit
    def fwd_bwd(v, l, a, g):
        out, vjp = jax.vjp(core, v, l, a)
        return (out, *vjp(g))

    def prepare(value, loc, attn, ct):
        cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
        return cast(value), jnp.asarray(loc), cast(attn), cast(ct)

    def run_fwd(x):
        return jax.block_until_ready(fwd(*x[:3]))

    def run_fwd_bwd(x):
        return jax.block_until_ready(fwd_bwd(*x))

    return prepare, run_fwd, run_fwd_bwd


def _torch_fns(mod, levels: Levels):
    import torch

    shapes = torch.tensor(levels, dtype=torch.int64, device="cuda")
    starts = torch.tensor(np.cumsum([0] + [h * w for h, w in levels[:-1]]), dtype=torch.int64, device="cuda")

    def prepare(value, loc, attn, ct):
        return tuple(torch.from_numpy(x).cuda() for x in (value, loc, attn, ct))

    def run_fwd(x):
        with torch.no_grad():
            out = mod.ms_deform_attn(x[0], shapes, starts, x[1], x[2])
        torch.cuda.synchronize()
        return out

    def run_fwd_bwd(x):
        v, l, a = (t.detach().requires_grad_(True) for t in x[:3])
        out = mod.ms_deform_attn(v, shapes, starts, l, a)
        grads = torch.autograd.grad(out, (v, l, a), x[3])
        torch.cuda.synchronize()
        return (out, *grads)

    return prepare, run_fwd, run_fwd_bwd


def _to_np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, np.float32)


def step_timing(args, state: dict) -> dict:
    import jax

    dry = args.dry_run or not _on_gpu()
    shapes, dims = (TOY, TOY_DIMS) if dry else (SEED, SEED_DIMS)
    reps = 2 if dry else args.reps
    rng = np.random.default_rng(0)
    out: Dict[str, Any] = {"dims": dims, "reps": reps, "warmup": 1 if dry else 3, "shapes": {}}
    ref_mod = state.get("torch_ms_deform_attn")
    for name, (q, levels) in shapes.items():
        data = _inputs(rng, q, levels, **dims)
        impls: Dict[str, Tuple] = {}
        for impl in ("pallas", "xla"):
            for dtype in ("float32", "bfloat16"):
                impls[f"{impl}/{dtype}"] = _jax_fns(impl, levels, dtype)
        if ref_mod is not None:
            impls["cuda/float32"] = _torch_fns(ref_mod, levels)
        prepared = {k: fns[0](*data) for k, fns in impls.items()}
        # Agreement in float32 before timing (each against XLA float32).
        base = [_to_np(x) for x in impls["xla/float32"][2](prepared["xla/float32"])]
        parity = {}
        for k in impls:
            if k.endswith("float32") and k != "xla/float32":
                got = [_to_np(x) for x in impls[k][2](prepared[k])]
                parity[k] = max(_rel(g, w) for g, w in zip(got, base))
        rec: Dict[str, Any] = {"q": q, "levels": levels, "parity_vs_xla_f32": parity, "ms": {}}
        if any(e > PARITY_TOL for e in parity.values()):
            rec["error"] = f"implementations disagree beyond {PARITY_TOL}"
        for phase, idx in (("fwd", 1), ("fwd+bwd", 2)):
            times: Dict[str, List[float]] = {k: [] for k in impls}
            for _ in range(out["warmup"]):
                for k, fns in impls.items():
                    fns[idx](prepared[k])
            budget = time.perf_counter() + args.phase_budget
            for r in range(reps):
                for k, fns in impls.items():
                    t0 = time.perf_counter()
                    fns[idx](prepared[k])
                    times[k].append((time.perf_counter() - t0) * 1e3)
                if r >= 2 and time.perf_counter() > budget:
                    break
            stats = {k: {"median": float(np.median(v)), "q25": float(np.percentile(v, 25)),
                         "q75": float(np.percentile(v, 75)), "n": len(v)} for k, v in times.items()}
            if "cuda/float32" in stats:
                for k in stats:
                    stats[k]["vs_cuda_f32"] = stats[k]["median"] / stats["cuda/float32"]["median"]
            rec["ms"][phase] = stats
        out["shapes"][name] = rec
        del prepared
    bad = [n for n, r in out["shapes"].items() if "error" in r]
    status = "failed" if bad else "ok"
    if ref_mod is None:
        out["note"] = "CUDA reference not built: timed without it"
    out["backend"] = jax.default_backend()
    return {"status": status, **out, **({"reason": f"disagreement at {bad}"} if bad else {})}
