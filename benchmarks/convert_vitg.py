"""Time and peak memory of converting a DINOv2 ViT-g/14 (1.1B parameters) hub checkpoint.

    python benchmarks/convert_vitg.py --workdir /tmp/vitg-bench

Writes a synthetic ViT-g hub ``.pth`` (the real shapes: 40 blocks, SwiGLU hidden 4096; random
values, about 4.5 GB in float32) into ``--workdir``, then runs, each in a fresh process so that
its peak RSS is its own:

- ``convert --trunk-only`` (float32) and ``convert --trunk-only --dtype bfloat16``;
- ``export`` of the float32 checkpoint to ``.safetensors`` (hub names), checked bit for bit
  against the source on a sample of tensors;
- ``load_pretrained`` of the float32 checkpoint;
- ``convert`` into a DinoAdapter (ViT-g trunk, fresh adapter).

Results go to ``benchmarks/results/convert-vitg-cpu.json``; the work directory is deleted
afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _dir_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def make_source(path: str) -> dict:
    """A hub-format ViT-g state dict of random values, saved with ``torch.save``."""
    import torch

    from jax_adapter.convert.keys import slots
    from jax_adapter import DinoV2Config
    from jax_adapter.checkpoint import abstract_model

    expected = slots(abstract_model("dinov2", DinoV2Config.preset("dinov2_vitg14")))
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s.torch_shape, generator=g) * 0.02 for k, s in expected.items()}
    sd["mask_token"] = torch.zeros(1, 1536)
    torch.save(sd, path)
    return {"tensors": len(sd), "parameters": sum(v.numel() for v in sd.values())}


def step(name: str, args: list) -> dict:
    """Run one operation in this process; report its wall time and this process's peak RSS."""
    t0 = time.perf_counter()
    extra = {}
    if name == "make":
        extra = make_source(args[0])
    elif name == "cli":
        from jax_adapter.cli import main

        if main(args) != 0:
            raise SystemExit(f"failed: jax-adapter {' '.join(args)}")
    elif name == "load":
        import jax

        from jax_adapter import load_pretrained

        model = load_pretrained(args[0])
        extra = {"type": type(model).__name__,
                 "parameters": int(sum(x.size for x in jax.tree.leaves(__import__("flax").nnx.state(model))))}
    elif name == "check":
        extra = check_export(*args)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(peak / 1e9, 2), **extra}


def check_export(src: str, exported: str) -> dict:
    """Bit-exact comparison of the exported file with the source, on every 7th tensor."""
    import numpy as np
    import torch

    from jax_adapter.convert.safetensors_io import read_safetensors

    ref = torch.load(src, weights_only=True, mmap=True)
    out = read_safetensors(exported)
    keys = sorted(ref)[::7] + ["blocks.39.mlp.w12.weight", "blocks.39.mlp.w3.weight", "pos_embed"]
    for k in keys:
        if not np.array_equal(out[k].load(), ref[k].numpy()):
            raise SystemExit(f"export differs from the source at {k}")
    return {"checked_tensors": len(keys), "exported_tensors": len(out), "source_tensors": len(ref)}


def run_step(name: str, *args: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--step", name, "--", *args]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/jax-adapter-vitg-bench")
    p.add_argument("--out", default=os.path.join(HERE, "results", "convert-vitg-cpu.json"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.step:
        result = step(args.step, args.rest)
        sys.stdout.flush()
        print(json.dumps(result))
        return

    os.makedirs(args.workdir, exist_ok=True)
    src = os.path.join(args.workdir, "dinov2_vitg14_synthetic.pth")
    f32, bf16 = os.path.join(args.workdir, "vitg_f32"), os.path.join(args.workdir, "vitg_bf16")
    exported = os.path.join(args.workdir, "vitg_export.safetensors")
    results = {}
    try:
        results["make_source"] = run_step("make", src)
        results["source_bytes"] = _dir_bytes(src)
        results["convert_trunk_float32"] = run_step("cli", "convert", src, f32, "--trunk-only", "--overwrite")
        results["checkpoint_bytes_float32"] = _dir_bytes(f32)
        results["convert_trunk_bfloat16"] = run_step("cli", "convert", src, bf16, "--trunk-only", "--dtype",
                                                     "bfloat16", "--overwrite")
        results["checkpoint_bytes_bfloat16"] = _dir_bytes(bf16)
        shutil.rmtree(bf16)
        results["export_safetensors"] = run_step("cli", "export", f32, exported, "--overwrite")
        results["export_bytes"] = _dir_bytes(exported)
        results["export_matches_source"] = run_step("check", src, exported)
        os.remove(exported)
        results["load_pretrained"] = run_step("load", f32)
        shutil.rmtree(f32)
        # The trunk inside a DinoAdapter whose adapter is initialised fresh (only the adapter's
        # initialisation runs; the trunk's is skipped).
        adapter = os.path.join(args.workdir, "vitg_adapter")
        results["convert_adapter_float32"] = run_step("cli", "convert", src, adapter, "--overwrite")
        results["checkpoint_bytes_adapter_float32"] = _dir_bytes(adapter)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    record = {
        "benchmark": "convert_vitg", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)},
        **results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
