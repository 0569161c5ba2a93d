"""GPU validation of the deformable-attention sampling core and of the trunks' attention core.

Runs in one call on a bare GPU machine.

Needs jax with CUDA, torch with CUDA and nvcc (for the reference kernel); no network. Before
going there, fetch the source distribution of the PyTorch CUDA reference kernel where there is
network, and carry the file along (it is another project's code: ``benchmarks/gpu/.gitignore``
keeps it out of the repository, so copy it to the GPU machine explicitly):

    pip download --no-deps --no-binary :all: --no-build-isolation torch-ms-deform-attn==0.1.1 -d benchmarks/gpu/

(``--no-build-isolation``: pip reads the sdist's metadata with the torch already installed
instead of fetching one.) Then, on the GPU machine, from the repository root:

    python -m benchmarks.gpu.validate                 # everything (the train step compiles
                                                      # four models: may pass 10 minutes)
    python -m benchmarks.gpu.validate --only timing   # one step (tests sanitizer reference timing attention train)
    python -m benchmarks.gpu.validate --dry-run       # on CPU: every step at toy sizes, GPU parts skipped

Steps (each recorded with its status, ``ok`` / ``failed`` / ``skipped`` and a reason, and its
wall time; a failing step does not stop the others; the exit code is 1 if any step failed):

1. ``tests``: ``pytest tests/unit/test_pallas_kernels.py`` (on a GPU the kernels run compiled).
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
   the sampling core on Pallas and on XLA; its compiled memory analysis and the device's peak,
   beside what ``jax-adapter plan`` predicts for the same step and card without a GPU (the
   plan runs in a CPU process; ``peak_over_compiled`` is the ratio).

Writes one JSON (default ``benchmarks/results/gpu-validate-<backend>.json``; in dry mode
``gpu-validate-dry.json``), rewritten after every step so that a timeout keeps what was done.

jaxlib 0.10.2 lowers float32 scatter-add on GPU to a compare-and-swap loop, which makes the XLA
path's backward very slow under contention; unless ``--no-ftz-atomics``, this script sets
``XLA_FLAGS=--xla_backend_extra_options=-nvptx-allow-ftz-atomics`` (hardware atomics; flushes
denormals) before JAX starts, and records the flags.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Dict

from .attention import step_attention
from .common import FTZ_FLAG, ROOT, _nvcc, _sanitizer, _tail
from .kernels import hard_cases, step_reference, step_sanitizer, step_tests, step_timing
from .train import step_train

STEPS = ("tests", "sanitizer", "reference", "timing", "attention", "train")


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
