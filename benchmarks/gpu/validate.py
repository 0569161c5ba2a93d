"""GPU validation of the deformable-attention sampling core and of the trunks' attention core.

Runs in one call on a bare GPU machine.

Needs jax with CUDA, torch with CUDA and nvcc (for the reference kernel); no network. Before
going there, fetch the source distribution of the PyTorch CUDA reference kernel where there is
network, and carry the file along (it is another project's code: ``benchmarks/gpu/.gitignore``
keeps it out of the repository, so copy it to the GPU machine explicitly):

    pip download --no-deps --no-binary :all: --no-build-isolation torch-ms-deform-attn==0.1.1 -d benchmarks/gpu/

(``--no-build-isolation``: pip reads the sdist's metadata with the torch already installed
instead of fetching one.) Then, on the GPU machine, from the repository root:

    python benchmarks/gpu/validate.py                 # everything (the train step compiles
                                                      # four models: may pass 10 minutes)
    python benchmarks/gpu/validate.py --only timing   # one step (tests sanitizer reference timing attention train)
    python benchmarks/gpu/validate.py --dry-run       # on CPU: every step at toy sizes, GPU parts skipped

Steps (each recorded with its status, ``ok`` / ``failed`` / ``skipped`` and a reason, and its
wall time; a failing step does not stop the others; the exit code is 1 if any step failed):

1. ``tests``: ``pytest tests/test_pallas_kernels.py`` (on a GPU the kernels run compiled).
2. ``sanitizer``: this script's ``--hard-cases`` mode under ``compute-sanitizer --tool memcheck``:
   both entry points, forward and backward, float32 and bfloat16, with off-map, far (1e9), NaN
   and infinite locations and many queries on one pixel; XLA's allocator is switched to plain
   ``cudaMalloc`` per buffer so that memcheck sees every buffer's bounds. Also checks the
   results against the XLA path.
3. ``reference``: builds the CUDA kernel of ``torch-ms-deform-attn`` from the sdist
   (``--sdist``; default ``benchmarks/gpu/torch_ms_deform_attn-*.tar.gz``) into a temporary
   directory, for this GPU's architecture only.
4. ``timing``: forward and forward+backward at the seed shapes (ViT-S adapter, B=6, M=6,
   Dh=64, P=4; injector and extractor) for Pallas and XLA in float32 and bfloat16 and the CUDA
   kernel in float32, after checking that all agree in float32. Implementations are
   interleaved call by call; medians, interquartile ranges and ratios to the CUDA kernel.
5. ``attention``: the trunks' attention core (``jax_adapter.nn.attention``). The dispatch rule
   for bfloat16, Dh=64 on this GPU, and that ``"auto"`` in bfloat16 lowers to cuDNN's fused
   kernels (forward and backward) with ``AttentionFallbackWarning`` raised as an error. Then
   ViT-S ``[2, 970, 6, 64]``, ViT-B ``[6, 970, 12, 64]`` and ViT-B at 900x1600
   ``[6, 7475, 12, 64]`` in bfloat16: forward and forward+backward of ``"cudnn"`` and ``"xla"``,
   each against a float32 XLA reference (full matmul precision) on the same bfloat16-rounded
   inputs (max error over the largest reference magnitude < 2e-2). Where the float32 logits
   (4 x B x H x N x N bytes) do not fit in the free device memory, ``"xla"`` is skipped and the
   reference is the chunked path in float32 on batch[:1], heads[:2]. Interleaved timings,
   cudnn/xla ratios, compiled and device memory; float32 ``"auto"`` (XLA) timed at ViT-S.
6. ``train``: the ViT-S and ViT-B adapter train step (bfloat16, frozen trunk, 6x256x704), with
   the sampling core on Pallas and on XLA.

Writes one JSON (default ``benchmarks/results/gpu-validate-<backend>.json``; in dry mode
``gpu-validate-dry.json``), rewritten after every step so that a timeout keeps what was done.

jaxlib 0.10.2 lowers float32 scatter-add on GPU to a compare-and-swap loop, which makes the XLA
path's backward very slow under contention; unless ``--no-ftz-atomics``, this script sets
``XLA_FLAGS=--xla_backend_extra_options=-nvptx-allow-ftz-atomics`` (hardware atomics; flushes
denormals) before JAX starts, and records the flags.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
STEPS = ("tests", "sanitizer", "reference", "timing", "attention", "train")
FTZ_FLAG = "--xla_backend_extra_options=-nvptx-allow-ftz-atomics"

Levels = Tuple[Tuple[int, int], ...]
# Seed shapes: ViT-S adapter at 256x704 with six cameras (as benchmarks/msda_cpu.py).
SEED: Dict[str, Tuple[int, Levels]] = {
    "injector": (969, ((34, 90), (17, 45), (9, 23))),
    "extractor": (4032, ((19, 51),)),
}
SEED_DIMS = dict(b=6, m=6, dh=64, p=4)
# Dry mode: the same code paths at toy sizes.
TOY: Dict[str, Tuple[int, Levels]] = {"injector": (37, ((6, 8), (3, 4))), "extractor": (48, ((5, 6),))}
TOY_DIMS = dict(b=1, m=2, dh=8, p=2)
PARITY_TOL = 1e-4  # float32, relative to each array's largest magnitude


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


class Record:
    """The JSON record, rewritten after every step."""

    def __init__(self, path: str, meta: dict):
        self.path, self.data = path, {"meta": meta, "steps": {}}

    def step(self, name: str, fn: Callable[[], dict]) -> dict:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - a failing step must not stop the others
            import traceback

            res = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:2000],
                   "traceback": _tail(traceback.format_exc())}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        self.data["steps"][name] = res
        self.save()
        print(f"   {res['status']}" + (f": {res['reason']}" if res.get("reason") else "")
              + f" ({res['seconds']} s)", flush=True)
        return res

    def save(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


# --- environment ---------------------------------------------------------------------------


def environment() -> dict:
    import jax
    import jaxlib

    info: Dict[str, Any] = {
        "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", ""),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["torch_cuda_available"] = bool(torch.cuda.is_available())
        if torch.cuda.is_available():
            info["capability"] = list(torch.cuda.get_device_capability())
    except ImportError:
        info["torch"] = None
    nvcc = _nvcc()
    if nvcc:
        info["nvcc"] = _tail(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout, 200)
    info["compute_sanitizer"] = _sanitizer()
    return info


def _cuda_bin(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", name)):
            return os.path.join(home, "bin", name)
    return None


def _nvcc() -> Optional[str]:
    return _cuda_bin("nvcc")


def _sanitizer() -> Optional[str]:
    return _cuda_bin("compute-sanitizer")


def _on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


# --- 1. the Pallas test file -----------------------------------------------------------------


def step_tests(args) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_pallas_kernels.py"]
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
    cmd = [sys.executable, os.path.abspath(__file__), "--hard-cases"]
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


# --- 6. train steps ------------------------------------------------------------------------


def step_train(args) -> dict:
    import jax
    from flax import nnx

    from jax_adapter import AdapterConfig, training
    from jax_adapter.nn import msda
    from jax_adapter.training import synthetic

    dry = args.dry_run or not _on_gpu()
    presets = ("tiny",) if dry else ("dinov2_vits14", "dinov2_vitb14")
    batch, (h, w) = (2, (56, 84)) if dry else (6, (256, 704))
    steps = 2 if dry else args.train_steps
    res: Dict[str, Any] = {"batch": batch, "size": [h, w], "dtype": "bfloat16", "freeze_trunk": True,
                           "runs": {}}
    saved = os.environ.get(msda.IMPL_ENV)
    try:
        for preset in presets:
            cfg = AdapterConfig.preset(preset).replace(dtype="bfloat16")
            for impl in ("pallas", "xla"):
                os.environ[msda.IMPL_ENV] = impl  # read when the step is traced
                model = synthetic.SegmentationModel(cfg, rngs=nnx.Rngs(0))
                model.train()
                step = training.TrainStep(
                    model, synthetic.segmentation_loss,
                    lambda p: training.make_optimizer(training.OptimizerConfig(), p, depth=cfg.depth,
                                                      backbone_path=("backbone",)),
                    trainable=training.trainable_filter(True, ("backbone",)),
                    mesh=training.make_mesh(jax.devices()[:1]),
                )
                state = step.init(0)
                data = step.shard_batch(synthetic.synthetic_batch(0, 0, range(batch), h, w))
                t0 = time.perf_counter()
                state, metrics = step(state, data)
                jax.block_until_ready(metrics)
                first = time.perf_counter() - t0
                times = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    state, metrics = step(state, data)
                    jax.block_until_ready(metrics)
                    times.append((time.perf_counter() - t0) * 1e3)
                res["runs"][f"{preset}/{impl}"] = {
                    "compile_and_first_step_s": round(first, 1), "step_ms_median": float(np.median(times)),
                    "step_ms": [round(t, 2) for t in times], "loss": float(metrics["loss"]),
                }
                del state, step, model
    finally:
        if saved is None:
            os.environ.pop(msda.IMPL_ENV, None)
        else:
            os.environ[msda.IMPL_ENV] = saved
    for preset in presets:
        p, x = res["runs"][f"{preset}/pallas"], res["runs"][f"{preset}/xla"]
        res["runs"][f"{preset}/pallas_vs_xla"] = p["step_ms_median"] / x["step_ms_median"]
    bad = [k for k, v in res["runs"].items() if isinstance(v, dict) and not np.isfinite(v["loss"])]
    return {"status": "failed" if bad else "ok", **res, **({"reason": f"non-finite loss: {bad}"} if bad else {})}


# --- main -------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU: toy sizes, skip what needs a GPU")
    p.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS))
    p.add_argument("--sdist", default=None, help="torch-ms-deform-attn source distribution (.tar.gz)")
    p.add_argument("--reps", type=int, default=20, help="timed calls per implementation and phase")
    p.add_argument("--phase-budget", type=float, default=30.0,
                   help="seconds per shape and phase after which timing stops (at least 3 reps)")
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--no-ftz-atomics", action="store_true", help=f"do not add {FTZ_FLAG} to XLA_FLAGS")
    p.add_argument("--out", default=None)
    p.add_argument("--hard-cases", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    # This process, the test and hard-case subprocesses and torch share the GPU: no process may
    # take XLA's default 75% of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if not args.no_ftz_atomics and FTZ_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FTZ_FLAG).strip()
    if args.hard_cases:
        print("HARD_CASES " + json.dumps(hard_cases()), flush=True)
        return 0

    import jax

    if not args.dry_run and jax.default_backend() != "gpu":
        print("no GPU backend: use --dry-run on CPU", file=sys.stderr)
        return 2
    kind = "dry" if args.dry_run else jax.default_backend()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"gpu-validate-{kind}.json")
    record = Record(out, {"mode": "dry-run" if args.dry_run else "gpu", **environment()})
    state: Dict[str, Any] = {}
    steps = {
        "tests": lambda: step_tests(args),
        "sanitizer": lambda: step_sanitizer(args),
        "reference": lambda: step_reference(args, state),
        "timing": lambda: step_timing(args, state),
        "attention": lambda: step_attention(args),
        "train": lambda: step_train(args),
    }
    for name in STEPS:
        if name in args.only:
            record.step(name, steps[name])
    failed = [k for k, v in record.data["steps"].items() if v["status"] == "failed"]
    print(f"wrote {out}; failed steps: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
