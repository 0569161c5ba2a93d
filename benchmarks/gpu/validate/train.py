"""Step 6: the adapter train step on the GPU, the sampling core on Pallas and on XLA, and its
compiled memory beside what ``jax-adapter plan`` predicts for the same step without the GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, Optional

import numpy as np

from .common import _on_gpu

# Device kind (as JAX names it) -> the plan target of the same card.
PLAN_TARGETS = (("H100", "h100"), ("H200", "h200"), ("B200", "b200"), ("A100-SXM4-40GB", "a100-40"),
                ("A100", "a100"), ("A6000", "a6000"), ("L4", "l4"), ("4090", "rtx4090"))


def plan_target(device_kind: str) -> Optional[str]:
    return next((t for k, t in PLAN_TARGETS if k in device_kind), None)


def planned(preset: str, batch: int, h: int, w: int, target: str) -> Dict[str, Any]:
    """``jax-adapter plan``'s record of the step (bfloat16, frozen trunk), in a CPU process."""
    argv = [sys.executable, "-m", "jax_adapter.cli", "plan", "--target", target, "--preset", preset,
            "--batch", str(batch), "--image-size", f"{h}x{w}", "--bf16", "--freeze-trunk", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout)["programs"]["train"]["memory"]


# --- 6. train steps ------------------------------------------------------------------------


def step_train(args) -> dict:
    import jax
    from flax import nnx

    from jax_adapter import AdapterConfig, training
    from jax_adapter.training import synthetic

    dry = args.dry_run or not _on_gpu()
    presets = ("dinov2_tiny_adapter",) if dry else ("dinov2_vits14_adapter", "dinov2_vitb14_adapter")
    batch, (h, w) = (2, (56, 84)) if dry else (6, (256, 704))
    steps = 2 if dry else args.train_steps
    res: Dict[str, Any] = {"batch": batch, "size": [h, w], "dtype": "bfloat16", "freeze_trunk": True,
                           "runs": {}}
    for preset in presets:
        for impl in ("pallas", "xla"):
            cfg = AdapterConfig.preset(preset).replace(dtype="bfloat16", msda_impl=impl)
            model = synthetic.SegmentationModel(cfg, rngs=nnx.Rngs(0))
            model.train()
            step = training.adapter_step(model, synthetic.segmentation_loss, training.OptimizerConfig(),
                                         freeze_trunk=True, mesh=training.make_mesh(jax.devices()[:1]))
            state = step.init(0)
            data = step.shard_batch(synthetic.synthetic_batch(0, 0, range(batch), h, w))
            ma = step.lower(state, data).compile().memory_analysis()
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
            run = {
                "compile_and_first_step_s": round(first, 1), "step_ms_median": float(np.median(times)),
                "step_ms": [round(t, 2) for t in times], "loss": float(metrics["loss"]),
                "compiled_memory": {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in
                                    ("argument", "output", "alias", "temp")} if ma is not None else None,
                "device_peak_bytes": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"),
            }
            target = None if dry else plan_target(jax.devices()[0].device_kind)
            if impl == "pallas" and target and ma is not None:
                # What the plan said without the GPU, against what this GPU's compiler said.
                plan = planned(preset, batch, h, w, target)
                run["plan"] = {"target": target, **plan}
                if "peak" in plan:
                    real = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes \
                        + ma.temp_size_in_bytes
                    run["plan"]["peak_over_compiled"] = round(plan["peak"] / real, 3)
            res["runs"][f"{preset}/{impl}"] = run
            del state, step, model
    for preset in presets:
        p, x = res["runs"][f"{preset}/pallas"], res["runs"][f"{preset}/xla"]
        res["runs"][f"{preset}/pallas_vs_xla"] = p["step_ms_median"] / x["step_ms_median"]
    bad = [k for k, v in res["runs"].items() if isinstance(v, dict) and not np.isfinite(v["loss"])]
    return {"status": "failed" if bad else "ok", **res, **({"reason": f"non-finite loss: {bad}"} if bad else {})}
