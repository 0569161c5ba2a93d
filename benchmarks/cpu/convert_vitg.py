"""Time and peak memory of converting a DINOv2 ViT-g/14 (1.1B parameters) hub checkpoint.

    python -m benchmarks.cpu.convert_vitg --workdir WORKDIR [--peer OTHER_CHECKOUT]

Writes a synthetic ViT-g hub ``.pth`` (the real shapes: 40 blocks, SwiGLU hidden 4096; random
values, about 4.5 GB in float32) into ``--workdir``, then runs, each in a fresh process so that
its peak RSS is its own:

- ``convert --trunk-only`` (float32) and ``convert --trunk-only --dtype bfloat16``;
- ``export`` of the float32 checkpoint to ``.safetensors`` (hub names), checked bit for bit
  against the source on a sample of tensors (read with the ``safetensors`` package and torch,
  not with this library's reader);
- ``convert --trunk-only`` of that ``.safetensors`` file (the safetensors reading path);
- ``load_pretrained`` of the float32 checkpoint;
- ``convert`` into a DinoAdapter (ViT-g trunk, fresh adapter).

``--peer`` names another checkout of this repository (for instance the commit before a change,
from ``git worktree add``, with the links that :func:`_check_origin` asks for): every step then
also runs with its code, right after this
checkout's, on the same source file, so that both see the same machine load; the record gets
the peer's numbers and this checkout's time and memory as ratios of the peer's. Each step's
record holds the 1-minute load average before and after it. ``--repeat N`` times every step N
times (alternating with the peer) and records the medians with all runs; ``--only STEP,...``
times only those steps (running what they read from once, first).

    python -m benchmarks.cpu.convert_vitg --peer OLD --repeat 3 \
        --only export_safetensors,convert_trunk_from_safetensors \
        --out benchmarks/results/convert-vitg-safetensors-cpu.json

Results go to ``benchmarks/results/convert-vitg-cpu.json``; the work directory is deleted
afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import child_step, cli, machine_info, measured

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
# Timed steps, in the order they run (record keys).
STEPS = ("convert_trunk_float32", "convert_trunk_bfloat16", "export_safetensors", "export_matches_source",
         "convert_trunk_from_safetensors", "load_pretrained", "convert_adapter_float32")


def _dir_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def make_source(path: str, preset: str = "dinov2_vitg14") -> dict:
    """A hub-format state dict of random values (ViT-g by default), saved with ``torch.save``."""
    import torch

    from jax_adapter import DinoV2Config
    from jax_adapter.models.build import abstract_model
    from jax_adapter.convert.keys import slots

    cfg = DinoV2Config.preset(preset)
    expected = slots(abstract_model("dinov2", cfg))
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s.torch_shape, generator=g) * 0.02 for k, s in expected.items()}
    sd["mask_token"] = torch.zeros(1, cfg.embed_dim)
    torch.save(sd, path)
    return {"tensors": len(sd), "parameters": sum(v.numel() for v in sd.values())}


def check_export(src: str, exported: str) -> dict:
    """Bit-exact comparison of the exported file with the source, on every 7th tensor."""
    import numpy as np
    import torch
    from safetensors import safe_open

    ref = torch.load(src, weights_only=True, mmap=True)
    last = [k for k in ref if k.startswith(("blocks.39.mlp", "norm."))]  # the end of the file
    keys = sorted(set(sorted(ref)[::7] + ["pos_embed"] + last))
    with safe_open(exported, framework="numpy") as out:
        for k in keys:
            if not np.array_equal(out.get_tensor(k), ref[k].numpy()):
                raise SystemExit(f"export differs from the source at {k}")
        exported_tensors = len(out.keys())
    return {"checked_tensors": len(keys), "exported_tensors": exported_tensors, "source_tensors": len(ref)}


def _check_origin(code: str) -> None:
    """Stop unless every project module this process ran came from the checkout at ``code``.

    An editable install maps ``jax_adapter.convert`` to its own checkout's ``convert/``: a peer
    checkout with the package layout needs the links ``jax_adapter/convert -> ../convert`` and
    ``jax_adapter/pallas_kernels -> ../pallas_kernels`` to run its own conversion code.
    """
    root = os.path.realpath(code) + os.sep
    stray = sorted(n for n, m in list(sys.modules.items())
                   if n.split(".")[0] in ("jax_adapter", "convert", "pallas_kernels")
                   and getattr(m, "__file__", None) and not os.path.realpath(m.__file__).startswith(root))
    if stray:
        raise SystemExit(f"{code}: modules {stray[:4]} come from another checkout (link "
                         f"jax_adapter/convert -> ../convert and jax_adapter/pallas_kernels -> ../pallas_kernels)")


def _load(path: str) -> dict:
    import jax
    from flax import nnx

    from jax_adapter import load_pretrained

    model = load_pretrained(path)
    return {"type": type(model).__name__, "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(model))))}


STEPS = {"make": make_source, "cli": cli, "load": _load, "check": check_export}


def step(name: str, args: list, code: str = ROOT) -> dict:
    """Run one operation in this process; report its wall time and this process's peak RSS."""
    result = measured(lambda: STEPS[name](*args))
    _check_origin(code)
    return result


def run_step(code: str, name: str, *args: str) -> dict:
    """``step`` in a fresh process whose ``jax_adapter`` is the checkout at ``code``."""
    return child_step("benchmarks.cpu.convert_vitg", "--step", name, "--code", code, "--", *args)


# Steps that the named one reads the output of (they run first, once, when it is chosen alone).
NEEDS = {"export_safetensors": ("convert_trunk_float32",),
         "convert_trunk_from_safetensors": ("convert_trunk_float32", "export_safetensors"),
         "load_pretrained": ("convert_trunk_float32",)}


def plan(code: str, src: str, workdir: str, name: str) -> list:
    """``(record key, function filling a results dict)`` for the steps after ``make``, with the
    checkout at ``code``. Each function can run again (outputs are overwritten); the work
    directory is removed at the end."""
    f32, bf16 = os.path.join(workdir, f"{name}_f32"), os.path.join(workdir, f"{name}_bf16")
    exported = os.path.join(workdir, f"{name}_export.safetensors")
    from_st, adapter = os.path.join(workdir, f"{name}_from_st"), os.path.join(workdir, f"{name}_adapter")

    def convert_f32(r):
        r["convert_trunk_float32"] = run_step(code, "cli", "convert", src, f32, "--trunk-only", "--overwrite")
        r["checkpoint_bytes_float32"] = _dir_bytes(f32)

    def convert_bf16(r):
        r["convert_trunk_bfloat16"] = run_step(code, "cli", "convert", src, bf16, "--trunk-only", "--dtype",
                                               "bfloat16", "--overwrite")
        r["checkpoint_bytes_bfloat16"] = _dir_bytes(bf16)
        shutil.rmtree(bf16)

    def export(r):
        r["export_safetensors"] = run_step(code, "cli", "export", f32, exported, "--overwrite")
        r["export_bytes"] = _dir_bytes(exported)
        r["export_matches_source"] = run_step(ROOT, "check", src, exported)

    def convert_exported(r):
        r["convert_trunk_from_safetensors"] = run_step(code, "cli", "convert", exported, from_st,
                                                       "--trunk-only", "--overwrite")
        shutil.rmtree(from_st)

    def load(r):
        r["load_pretrained"] = run_step(code, "load", f32)

    def convert_adapter(r):
        # The trunk inside a DinoAdapter whose adapter is initialised fresh (only the adapter's
        # initialisation runs; the trunk's is skipped).
        r["convert_adapter_float32"] = run_step(code, "cli", "convert", src, adapter, "--overwrite")
        r["checkpoint_bytes_adapter_float32"] = _dir_bytes(adapter)
        shutil.rmtree(adapter)

    return [("convert_trunk_float32", convert_f32), ("convert_trunk_bfloat16", convert_bf16),
            ("export_safetensors", export), ("convert_trunk_from_safetensors", convert_exported),
            ("load_pretrained", load), ("convert_adapter_float32", convert_adapter)]


def _medians(runs: list) -> dict:
    """One results dict from several: timed steps get the median seconds and peak RSS, and the
    list of all their seconds; everything else is taken from the last run that has it."""
    out = {}
    for r in runs:
        out.update(r)
    for k, v in out.items():
        got = [r[k] for r in runs if k in r]
        if isinstance(v, dict) and "seconds" in v and len(got) > 1:
            out[k] = {**v, "seconds": round(statistics.median(g["seconds"] for g in got), 1),
                      "peak_rss_gb": round(statistics.median(g["peak_rss_gb"] for g in got), 2),
                      "runs_seconds": [g["seconds"] for g in got],
                      "runs_peak_rss_gb": [g["peak_rss_gb"] for g in got]}
    return out


def _ratios(ours: dict, peer: dict) -> dict:
    """This checkout's seconds and peak RSS over the peer's, per step."""
    out = {}
    for k in STEPS:
        if k in ours and k in peer:
            out[k] = {m: round(ours[k][m] / peer[k][m], 2) for m in ("seconds", "peak_rss_gb") if peer[k][m]}
    return out


def _git_head(path: str) -> str:
    """The checkout's commit, with ``+changes`` when its tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", path, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode:
            return "unknown"
        # diff-index only reads the index (status and describe --dirty may rewrite it).
        return head.stdout.strip() + ("+changes" if git("diff-index", "--quiet", "HEAD", "--").returncode else "")
    except OSError:
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jax-adapter-vitg-bench"))
    p.add_argument("--out", default=os.path.join(RESULTS, "convert-vitg-cpu.json"))
    p.add_argument("--peer", help="another checkout of this repository to run every step with as well")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--preset", default="dinov2_vitg14", help="another hub trunk, for a quick run of the script")
    p.add_argument("--only", help="comma-separated steps to time (the steps they need run once first)")
    p.add_argument("--repeat", type=int, default=1,
                   help="time each chosen step this many times (medians recorded, with every run)")
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--code", default=ROOT, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.step:
        sys.path.insert(0, os.path.abspath(args.code))
        result = step(args.step, args.rest, args.code)
        sys.stdout.flush()
        print(json.dumps(result))
        return

    os.makedirs(args.workdir, exist_ok=True)
    src = os.path.join(args.workdir, "dinov2_vitg14_synthetic.pth")
    results, peer = {}, {}
    load_start = round(os.getloadavg()[0], 2)
    try:
        results["make_source"] = run_step(ROOT, "make", src, args.preset)
        results["source_bytes"] = _dir_bytes(src)
        ours = plan(ROOT, src, args.workdir, "this")
        theirs = plan(os.path.abspath(args.peer), src, args.workdir, "peer") if args.peer else []
        chosen = set(args.only.split(",")) if args.only else {k for k, _ in ours}
        unknown = chosen - {k for k, _ in ours}
        if unknown:
            raise SystemExit(f"--only: unknown steps {sorted(unknown)} (steps: {', '.join(k for k, _ in ours)})")
        needed = {d for k in chosen for d in NEEDS.get(k, ())} - chosen
        runs_ours, runs_theirs = [{} for _ in range(args.repeat)], [{} for _ in range(args.repeat)]
        # Step by step, this checkout then the peer, repetition by repetition: both see about
        # the same machine load.
        for i, (key, do) in enumerate(ours):
            if key not in chosen and key not in needed:
                continue
            for rep in range(args.repeat if key in chosen else 1):
                do(runs_ours[rep])
                if theirs:
                    theirs[i][1](runs_theirs[rep])
        results.update(_medians([r for r in runs_ours if r]))
        if theirs:
            peer.update(_medians([r for r in runs_theirs if r]))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    record = {
        "benchmark": "convert_vitg", "preset": args.preset, "repeat": args.repeat,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "code": _git_head(ROOT),
        "machine": {**machine_info(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
                    "load_1min": [load_start, round(os.getloadavg()[0], 2)]},
        **results,
    }
    if args.peer:
        record["peer"] = {"code": _git_head(args.peer), **peer}
        record["ratio_to_peer"] = _ratios(results, peer)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
