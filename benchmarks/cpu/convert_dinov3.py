"""Time and peak memory of converting a synthetic DINOv3 hub trunk checkpoint (Meta ``.pth``).

    python -m benchmarks.cpu.convert_dinov3 [--preset dinov3_vith16plus] [--dtype float32] [--repeats 3]

Writes a Meta-format ``.pth`` of the preset's real shapes with random values (buffers included:
``rope_embed.periods``, ``qkv.bias_mask``, ``mask_token``, ``local_cls_norm`` where the hub model
has them), named ``dinov3_<arch>_pretrain_synthetic-<sha256[:8]>.pth`` so that the conversion
checks the hash in the name as it would for a download. Then, each in a fresh process so that
its peak RSS is its own, alternating so that both see the same machine load:

- ``torch_load``: ``torch.load(weights_only=True)`` of the file, every tensor read (the baseline:
  what merely loading the checkpoint into PyTorch costs);
- ``convert``: ``jax-adapter convert --trunk-only`` (hash, metadata checks, tensor by tensor
  conversion, orbax write);

``--repeats`` times each (medians and the ratio convert / torch_load are recorded), then once:
``export --trunk-only`` back to Meta names (checked bit for bit against the source on every
tensor, read with torch) and ``load_pretrained``.

ViT-7B in float32 (27 GB) does not fit a 24 GB machine; ``--dtype bfloat16`` makes it 13.4 GB.
Results go to ``benchmarks/results/convert-dinov3-<preset>-<dtype>-cpu.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

from benchmarks.common import child_step, cli, machine_info, measured

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def make_source(workdir: str, preset: str, dtype: str) -> dict:
    """A Meta hub state dict of random values for ``preset``, saved with ``torch.save``."""
    import numpy as np
    import torch

    from jax_adapter.convert.formats.dinov3.export import export_trunk
    from jax_adapter.models.build import abstract_model
    from jax_adapter.convert.keys import slots
    from jax_adapter.models.dinov3 import DinoV3Config

    cfg = DinoV3Config.preset(preset)
    expected = slots(abstract_model("dinov3", cfg))
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, s in expected.items():
        sd[k] = (torch.randn(s.torch_shape, generator=g) * 0.02).to(tdtype)
    # The buffers Meta's state_dict holds, by the library's own exporter (periods, bias masks).
    shapes = {k: np.zeros((1,), np.float32) for k in sd}
    buffers = {k: v for k, v in export_trunk(shapes, cfg).items() if k not in sd}
    for k, v in buffers.items():
        sd[k] = torch.from_numpy(np.asarray(v)).to(torch.float32 if k.endswith("periods") else tdtype)
    tmp = os.path.join(workdir, "source.pth")
    torch.save(sd, tmp)
    h = hashlib.sha256()
    with open(tmp, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    arch = preset.removeprefix("dinov3_")
    path = os.path.join(workdir, f"dinov3_{arch}_pretrain_synthetic-{h.hexdigest()[:8]}.pth")
    os.replace(tmp, path)
    return {"path": path, "tensors": len(sd), "parameters": int(sum(v.numel() for v in sd.values())),
            "bytes": os.path.getsize(path)}


def torch_load(path: str) -> dict:
    import torch

    sd = torch.load(path, weights_only=True)
    total = sum(float(v.float().abs().sum()) for v in sd.values())  # every tensor read
    return {"tensors": len(sd), "checksum": total}


def check_export(src: str, exported: str) -> dict:
    """Every tensor of the export equals the source's, bit for bit (keys, dtypes, bytes)."""
    import torch

    a = torch.load(src, weights_only=True, mmap=True)
    b = torch.load(exported, weights_only=True, mmap=True)
    if set(a) != set(b):
        raise SystemExit(f"export keys differ: {sorted(set(a) ^ set(b))[:5]}")
    for k in a:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(
                x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)):
            raise SystemExit(f"export differs from the source at {k}")
    return {"checked_tensors": len(a), "bit_exact": True}


def _load(path: str) -> dict:
    from jax_adapter import load_pretrained

    return {"type": type(load_pretrained(path)).__name__}


STEPS = {"make": make_source, "torch_load": torch_load, "cli": cli, "load": _load, "check": check_export}


def step(name: str, args: list) -> dict:
    """Run one operation in this process; report its wall time and this process's peak RSS."""
    return measured(lambda: STEPS[name](*args))


def run_step(name: str, *args: str) -> dict:
    return child_step("benchmarks.cpu.convert_dinov3", "--step", name, "--", *args)


def _median(runs: list, key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="dinov3_vith16plus")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.step:
        result = step(args.step, args.rest)
        sys.stdout.flush()
        print(json.dumps(result))
        return

    workdir = args.workdir or tempfile.mkdtemp(prefix="jax-adapter-dinov3-bench-")
    os.makedirs(workdir, exist_ok=True)
    out = args.out or os.path.join(RESULTS, f"convert-dinov3-{args.preset}-{args.dtype}-cpu.json")
    load_start = round(os.getloadavg()[0], 2)
    record = {"benchmark": "convert_dinov3", "preset": args.preset, "dtype": args.dtype,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        made = run_step("make", workdir, args.preset, args.dtype)
        src = made.pop("path")
        record["source"] = {"name": os.path.basename(src), **made}
        ckpt = os.path.join(workdir, "ckpt")
        loads, converts = [], []
        for _ in range(args.repeats):
            loads.append(run_step("torch_load", src))
            converts.append(run_step("cli", "convert", src, ckpt, "--trunk-only", "--overwrite"))
        record["torch_load"] = {"runs": loads, "median_seconds": _median(loads, "seconds"),
                                "median_peak_rss_gb": _median(loads, "peak_rss_gb")}
        record["convert"] = {"runs": converts, "median_seconds": _median(converts, "seconds"),
                             "median_peak_rss_gb": _median(converts, "peak_rss_gb")}
        record["convert_over_torch_load"] = {
            "seconds": round(record["convert"]["median_seconds"] / record["torch_load"]["median_seconds"], 2),
            "peak_rss": round(record["convert"]["median_peak_rss_gb"] / record["torch_load"]["median_peak_rss_gb"], 2),
        }
        exported = os.path.join(workdir, "export.pth")
        record["export_trunk"] = run_step("cli", "export", ckpt, exported, "--trunk-only", "--overwrite")
        record["export_matches_source"] = run_step("check", src, exported)
        record["load_pretrained"] = run_step("load", ckpt)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    record["machine"] = {**machine_info(), "platform": platform.platform(), "cpus": os.cpu_count(),
                         "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
                         "load_1min": [load_start, round(os.getloadavg()[0], 2)]}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
