"""Memory of one jitted train step with and without activation checkpointing (``with_cp``).

    python -m benchmarks.cpu.train_memory --preset dinov2_vitb14 --batch 6 --image-size 256x704

Lowers and compiles the step of ``jax-adapter train``'s model (DinoAdapter + dense head) for an
abstract model (no weights are materialised) and reads XLA's compiled memory analysis:
``temp`` is the peak of the step's temporary buffers (activations kept for the backward pass
among them), ``total`` = arguments + outputs - aliased (donated) + temp. Where the device
reports allocator statistics (GPU), the peak bytes in use after running the step are recorded
too. Prints one JSON record per configuration; ``--out FILE`` also appends them to a JSON list
in ``FILE`` (the recorded results are ``benchmarks/results/train_memory-<backend>.json``).
The options are those of ``jax-adapter train``.

On CPU, XLA's default concurrency-optimised scheduler is free to run the recomputation of a
checkpointed block early (the optimisation barriers are gone by then), which hides the saving;
``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`` selects the
memory-minimising scheduler. Records carry the ``XLA_FLAGS`` they ran with.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jax_adapter import AdapterConfig, training
from jax_adapter.cli.common import parse_size
from jax_adapter.training import synthetic


def measure(cfg: AdapterConfig, batch: int, h: int, w: int, freeze: bool, run: bool) -> dict:
    make = lambda: synthetic.SegmentationModel(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    model = make() if run else nnx.eval_shape(make)
    model.train()
    step = training.adapter_step(model, synthetic.segmentation_loss, training.OptimizerConfig(),
                                 freeze_trunk=freeze, mesh=training.make_mesh(jax.devices()[:1]))
    abstract_batch = {
        "images": jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32, sharding=step.batch_sharding),
        "masks": jax.ShapeDtypeStruct((batch, h, w), jnp.int32, sharding=step.batch_sharding),
    }
    t0 = time.perf_counter()
    compiled = step.lower(step.abstract_state(), abstract_batch).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    record = {
        "compile_s": round(compile_s, 1),
        "argument_bytes": ma.argument_size_in_bytes, "output_bytes": ma.output_size_in_bytes,
        "alias_bytes": ma.alias_size_in_bytes, "temp_bytes": ma.temp_size_in_bytes,
        "total_bytes": ma.argument_size_in_bytes + ma.output_size_in_bytes
        - ma.alias_size_in_bytes + ma.temp_size_in_bytes,
    }
    stats = jax.devices()[0].memory_stats()
    if run and stats is not None:
        state = step.init(0)
        data = step.shard_batch(synthetic.synthetic_batch(0, 0, range(batch), h, w))
        jax.block_until_ready(step(state, data))
        record["peak_bytes_in_use"] = jax.devices()[0].memory_stats().get("peak_bytes_in_use")
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="dinov2_vits14", help="preset name (as jax-adapter train)")
    p.add_argument("--batch", type=int, default=6, help="batch size")
    p.add_argument("--image-size", default="256x704", help="HxW (as jax-adapter train)")
    p.add_argument("--freeze-trunk", action="store_true", help="freeze the DINOv2 trunk")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 parameters")
    p.add_argument("--run", action="store_true",
                   help="also build real weights and run the step (peak bytes where reported)")
    p.add_argument("--out", default=None,
                   help="append the records to this JSON file, e.g. "
                        "benchmarks/results/train_memory-cpu.json (default: print only)")
    args = p.parse_args()
    h, w = parse_size(args.image_size, "--image-size")
    base = AdapterConfig.preset(args.preset)
    if args.bf16:
        base = base.replace(dtype="bfloat16")
    records = []
    for remat in (False, True):
        rec = {
            "preset": args.preset, "batch": args.batch, "size": [h, w], "remat": remat,
            "freeze_trunk": args.freeze_trunk, "dtype": base.dtype,
            "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            **measure(base.replace(with_cp=remat), args.batch, h, w, args.freeze_trunk, args.run),
        }
        print(json.dumps(rec), flush=True)
        records.append(rec)
    if args.out:
        old = json.load(open(args.out)) if os.path.exists(args.out) else []
        with open(args.out, "w") as f:
            json.dump(old + records, f, indent=1)


if __name__ == "__main__":
    main()
