"""``jax-adapter plan``: will a config fit a GPU or TPU, and what will it run there, answered on this
machine by compiling for the device without it (:func:`jax_adapter.plan.plan`).

JAX must run on the CPU for the GPU compiler to load without a GPU: the command sets
``JAX_PLATFORMS=cpu`` before JAX starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict

from jax_adapter.cli.common import model_config, parse_size

GIB = 1 << 30


def add_parser(sub) -> argparse.ArgumentParser:
    from jax_adapter.plan.targets import TARGETS

    names = ", ".join(f"{k} ({t.note})" for k, t in TARGETS.items())
    p = sub.add_parser(
        "plan",
        help="compile the forward or train step for a GPU or TPU without one: memory, fit, kernels",
        description="Compile a model's forward and/or train step for a GPU or TPU this machine does not "
                    "have and print the compiler's plan: memory per device against the device's, compile "
                    "time, code size, the implementation each dispatch site chose, the kernels, FLOPs. "
                    "Figures are the compiler's (untuned kernels; cuDNN workspace not counted), not speed. "
                    f"Targets: {names}.",
    )
    p.add_argument("--target", required=True, choices=sorted(TARGETS), metavar="TARGET",
                   help="the device: " + ", ".join(TARGETS))
    p.add_argument("--preset", default="dinov2_tiny_adapter",
                   help="an adapter (or a trunk, meaning its adapter) of `jax_adapter.list_models()`, or a "
                        "config JSON path (default dinov2_tiny_adapter)")
    p.add_argument("--program", choices=("train", "forward", "both"), default="train",
                   help="what to compile: jax-adapter train's step, the forward alone, or both (default train)")
    p.add_argument("--batch", type=int, default=1, help="global batch size (all devices together)")
    p.add_argument("--image-size", default="256x704", help="HxW of the images (default 256x704)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 parameters")
    p.add_argument("--remat", action="store_true", help="activation checkpointing (with_cp)")
    p.add_argument("--freeze-trunk", action="store_true", help="freeze the DINOv2 trunk")
    p.add_argument("--topology", default=None,
                   help="several devices, the batch split over them: TPU chips as AxB (e.g. 2x2), "
                        "or a number of GPUs")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (sizes in bytes)")
    p.set_defaults(func=cmd_plan)
    return p


def _gib(n: Any) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def _counts(d: Dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"


def format_report(r: Dict[str, Any]) -> str:
    """The plan as text."""
    t = r["target"]
    lines = [f"{r['model']} on {t['name']} ({t['device']}, {_gib(t['memory'])} a device, "
             f"{t['devices']} device{'s' if t['devices'] > 1 else ''}): batch {r['batch']} "
             f"({r['per_device_batch']} a device), {r['image_size'][0]}x{r['image_size'][1]}, "
             + (", ".join(k for k in ("bf16", "remat", "freeze_trunk") if r[k]) or "float32")]
    for name, p in r["programs"].items():
        m, fits = p["memory"], p["fits"]
        verdict = "fits" if fits["device"] else "DOES NOT FIT"
        if fits["device"] and fits.get("default_pool") is False:
            verdict = "fits only above JAX's default 75% (set XLA_PYTHON_CLIENT_MEM_FRACTION)"
        least = "at least " if "temporaries" in m.get("reported_by", "") else ""
        lines.append(f"\n{name}: peak {least}{_gib(m['peak'])} a device: {verdict}")
        if "error" in p:
            lines.append(f"  {p['error']}")
        else:
            lines.append(f"  arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])} "
                         f"(aliased {_gib(m['aliased'])}), temporaries {_gib(m['temporaries'])}")
            code = m["generated_code"]
            lines.append(f"  compile {p['compile_s']} s (lowering {p['lower_s']} s), code "
                         + (f"{code / (1 << 20):.1f} MiB" if code else "size not reported for this platform"))
            k = p["kernels"]
            lines.append(f"  kernels {k['kernels']}: {_counts(k['families'])}")
            if k["pallas_kernels"]:
                lines.append(f"  Pallas kernels: {_counts(k['pallas_kernels'])}")
            lines.append(f"  gathers {k['gathers']['standalone'] + k['gathers']['fused']}, scatters "
                         f"{k['scatters']['standalone'] + k['scatters']['fused']}, loops {len(k['loops'])}")
            cost = p["cost"]
            if cost.get("flops") is not None:
                lines.append(f"  {cost['flops'] / 1e9:.1f} GFLOP, {cost.get('bytes_accessed', 0) / 1e9:.1f} GB "
                             f"accessed (XLA's count of the {cost['source']}; loop bodies once)")
        lines.append("  dispatch: " + "; ".join(f"{site}: {_counts(c)}" for site, c in p["dispatch"].items()))
        for w in p["warnings"]:
            lines.append(f"  warning: {w}")
    return "\n".join(lines)


def cmd_plan(args) -> int:
    h, w = parse_size(args.image_size, "--image-size")
    # Before JAX starts: the GPU compiler loads only when no GPU backend is asked for.
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if jax.config.jax_platforms != "cpu":  # imported earlier (in-process calls), not yet started
        jax.config.update("jax_platforms", "cpu")
    from jax_adapter import registry
    from jax_adapter.plan import plan

    named = registry.is_architecture(args.preset)
    model = registry.in_role(args.preset, "adapter") if named else model_config(args.preset)
    programs = ("forward", "train") if args.program == "both" else (args.program,)
    report = plan(model, args.target, programs=programs, batch=args.batch, image_size=(h, w), bf16=args.bf16,
                  remat=args.remat, freeze_trunk=args.freeze_trunk, topology=args.topology)
    print(json.dumps(report, indent=1) if args.json else format_report(report), file=sys.stdout)
    return 0
