"""Step 6: the adapter train step on the GPU, the sampling core on Pallas and on XLA."""

from __future__ import annotations

import time
from typing import Any, Dict

import numpy as np

from .common import (_on_gpu)


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
            if True:
                model = synthetic.SegmentationModel(cfg, rngs=nnx.Rngs(0))
                model.train()
                step = training.adapter_step(model, synthetic.segmentation_loss, training.OptimizerConfig(),
                                             freeze_trunk=True, mesh=training.make_mesh(jax.devices()[:1]))
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
    for preset in presets:
        p, x = res["runs"][f"{preset}/pallas"], res["runs"][f"{preset}/xla"]
        res["runs"][f"{preset}/pallas_vs_xla"] = p["step_ms_median"] / x["step_ms_median"]
    bad = [k for k, v in res["runs"].items() if isinstance(v, dict) and not np.isfinite(v["loss"])]
    return {"status": "failed" if bad else "ok", **res, **({"reason": f"non-finite loss: {bad}"} if bad else {})}
