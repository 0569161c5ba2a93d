"""``jax-adapter train``: the training example and smoke test, a thin wrapper of
:class:`jax_adapter.training.Trainer`.

A :class:`~jax_adapter.training.synthetic.SegmentationModel` (an adapter + a small dense head)
learns the masks of synthetic shapes, generated on the fly from ``(seed, step)``. One JSON line
per step on stdout (``step``, ``loss``, ``accuracy``, ``step_time_s``); a progress bar on stderr
when it is a terminal. Checkpoints go to ``--workdir``; ``--resume`` continues from the latest.

This module imports JAX only inside :func:`cmd_train`, after the device options are applied.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jax_adapter.cli.common import CliError, model_config, parse_size

HEAD_HIDDEN = 64


def add_parser(sub) -> argparse.ArgumentParser:
    t = sub.add_parser(
        "train",
        help="train the backbone with a small dense head on synthetic data (example, smoke test)",
        description="Train the backbone with a small dense head on synthetic shapes: the training "
                    "example and smoke test. One JSON line per step on stdout.",
    )
    t.add_argument("--preset", default="dinov2_tiny_adapter",
                   help="an adapter (or a trunk, meaning its adapter) of `jax_adapter.list_models()`, or a "
                        "config JSON path (default dinov2_tiny_adapter)")
    t.add_argument("--steps", type=int, default=20, help="total number of steps (with --resume too)")
    t.add_argument("--batch", type=int, default=8, help="global batch size (all devices together)")
    t.add_argument("--image-size", default="64x64", help="HxW of the synthetic images (e.g. 256x704)")
    t.add_argument("--devices", type=int, default=0,
                   help="use N devices (0: all); on CPU, N virtual devices are created")
    t.add_argument("--workdir", default=None, help="checkpoint directory (default: no checkpoints)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    t.add_argument("--checkpoint-every", type=int, default=0,
                   help="also write a checkpoint every N steps (0: only at the end)")
    t.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    t.add_argument("--freeze-trunk", action="store_true",
                   help="freeze the DINOv2 trunk (a DINOv3 adapter's trunk is always frozen, as upstream)")
    t.add_argument("--remat", action="store_true", help="activation checkpointing (with_cp)")
    t.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 parameters")
    t.add_argument("--drop-path", type=float, default=None, help="drop path rate (default: the config's)")
    t.add_argument("--seed", type=int, default=0, help="seed of the weights, data and drop path")
    t.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    t.add_argument("--warmup", type=int, default=0, help="warmup steps")
    t.add_argument("--schedule-steps", type=int, default=None,
                   help="length of the cosine learning-rate schedule (default: --steps; with --resume, "
                        "the resumed run's length; give it to extend a finished run)")
    t.add_argument("--layer-decay", type=float, default=1.0, help="layer-wise lr decay (e.g. 0.65)")
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--stop-after", type=int, default=None,
                   help="stop after this step as if interrupted (a checkpoint is written)")
    t.add_argument("--release-memory", action="store_true",
                   help="give glibc back its defaults for large blocks (by default jax_adapter keeps freed "
                        "memory for reuse, which makes CPU steps much faster; see jax_adapter.memory)")
    t.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (see also the next three)")
    t.add_argument("--coordinator-address", default=None, help="host:port of process 0 (multi-host)")
    t.add_argument("--num-processes", type=int, default=None, help="number of processes (multi-host)")
    t.add_argument("--process-id", type=int, default=None, help="this process's index (multi-host)")
    t.set_defaults(func=cmd_train)
    return t


def _setup_devices(args) -> None:
    """Multi-host initialisation and virtual CPU devices, before any JAX backend starts."""
    import jax

    if args.distributed:
        jax.distributed.initialize(
            coordinator_address=args.coordinator_address, num_processes=args.num_processes,
            process_id=args.process_id,
        )
    elif args.devices > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # Only the CPU backend reads this; on GPU/TPU the real devices are used.
        jax.config.update("jax_num_cpu_devices", args.devices)


def cmd_train(args) -> int:
    h, w = parse_size(args.image_size, "--image-size")
    _setup_devices(args)

    import jax
    from flax import nnx

    from jax_adapter import training
    from jax_adapter.training import synthetic

    devices = jax.devices()
    n = args.devices or len(devices)
    if n > len(devices):
        raise CliError(f"--devices {n}: only {len(devices)} {jax.default_backend()} devices are available")
    if jax.process_count() > 1 and n != len(devices):
        raise CliError("multi-host runs use all devices: leave --devices at 0")
    if args.batch % n:
        raise CliError(f"--batch {args.batch} is not divisible by the {n} devices")

    cfg = training.recipe_config(model_config(args.preset), remat=args.remat, bf16=args.bf16,
                                 drop_path=args.drop_path)
    train_cfg = training.TrainConfig(
        steps=args.steps, batch=args.batch, seed=args.seed, freeze_trunk=args.freeze_trunk,
        optimizer=training.OptimizerConfig(learning_rate=args.lr, weight_decay=args.weight_decay,
                                           warmup_steps=args.warmup, layer_decay=args.layer_decay),
        schedule_steps=args.schedule_steps, workdir=args.workdir, resume=args.resume,
        checkpoint_every=args.checkpoint_every, keep=args.keep, stop_after=args.stop_after,
    )
    model = synthetic.SegmentationModel(cfg, hidden=HEAD_HIDDEN, rngs=nnx.Rngs(args.seed))
    model.train()
    trainer = training.Trainer(model, synthetic.segmentation_loss, train_cfg,
                               mesh=training.make_mesh(devices[:n]),
                               task={"image_size": [h, w], "head_hidden": HEAD_HIDDEN}, log=_log)
    del model  # its arrays now belong to the train state (and are donated to each step)
    indices = trainer.local_indices()

    def report(step: int, metrics, seconds: float) -> None:
        if jax.process_index() == 0:
            print(json.dumps({"step": step, "loss": metrics["loss"], "accuracy": metrics["accuracy"],
                              "step_time_s": round(seconds, 4)}), flush=True)

    trainer.fit(lambda step: synthetic.synthetic_batch(args.seed, step, indices, h, w), on_step=report)
    return 0


def _log(msg: str) -> None:
    print(f"jax-adapter train: {msg}", file=sys.stderr, flush=True)
