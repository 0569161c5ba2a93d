"""``jax-adapter train``: the training example and smoke test.

A :class:`~jax_adapter.training.synthetic.SegmentationModel` (DinoAdapter + a small dense head) learns
the masks of synthetic shapes, generated on the fly from ``(seed, step)``. One JSON line per
step on stdout (``step``, ``loss``, ``accuracy``, ``step_time_s``); a progress bar on stderr
when it is a terminal. Checkpoints go to ``--workdir``; ``--resume`` continues from the latest.

This module imports JAX only inside :func:`cmd_train`, after the device options are applied.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any, Dict, Optional

from jax_adapter.cli import CliError

RUN_FILE = "run.json"
# Options that change what is computed: a resumed run must agree with the recorded ones.
RUN_KEYS = ("model", "batch", "image_size", "seed", "freeze_trunk", "optimizer", "head_hidden")


def add_parser(sub) -> argparse.ArgumentParser:
    t = sub.add_parser(
        "train",
        help="train the backbone with a small dense head on synthetic data (example, smoke test)",
        description="Train the backbone with a small dense head on synthetic shapes: the training "
                    "example and smoke test. One JSON line per step on stdout.",
    )
    t.add_argument("--preset", default="tiny", help="preset name or a config JSON path (default tiny)")
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
                   help="leave glibc's allocator settings alone (by default the command runs with "
                        "MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1, which keep "
                        "freed memory for reuse and make CPU steps much faster; see jax_adapter.memory)")
    t.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (see also the next three)")
    t.add_argument("--coordinator-address", default=None, help="host:port of process 0 (multi-host)")
    t.add_argument("--num-processes", type=int, default=None, help="number of processes (multi-host)")
    t.add_argument("--process-id", type=int, default=None, help="this process's index (multi-host)")
    t.set_defaults(func=cmd_train)
    return t


def _size(s: str):
    try:
        h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise CliError(f"bad --image-size {s!r}: expected HxW, e.g. 256x704") from None
    return h, w


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


def _load_config(preset: str):
    from jax_adapter import AdapterConfig
    from jax_adapter.models.dinov3_adapter import DinoV3AdapterConfig
    from jax_adapter.presets import PRESETS, get, load_config_file

    if preset in PRESETS:
        cfg = get(preset)
    elif os.path.isfile(preset):
        cfg = load_config_file(preset)
    else:
        raise CliError(f"--preset {preset!r} is neither a preset ({', '.join(PRESETS)}) nor a config file")
    if not isinstance(cfg, (AdapterConfig, DinoV3AdapterConfig)):
        raise CliError(f"--preset {preset!r} is a {type(cfg).__name__} (a trunk alone): train needs an "
                       "adapter preset or config (e.g. dinov3_vits16_adapter)")
    return cfg


def _read_run_record(workdir: str) -> Optional[Dict[str, Any]]:
    """The options recorded by the run in ``workdir`` (None before its first run)."""
    path = os.path.join(workdir, RUN_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CliError(f"{path}: corrupt run record ({e})") from None


def _schedule_steps(args, old: Optional[Dict[str, Any]]) -> int:
    """The cosine schedule's length: ``--schedule-steps`` when given; on resume the recorded
    length, so that the learning rates of a resumed run continue unchanged; else ``--steps``."""
    if args.schedule_steps is not None:
        if args.schedule_steps < 1:
            raise CliError("--schedule-steps must be >= 1")
        return args.schedule_steps
    recorded = (old or {}).get("optimizer", {}).get("total_steps")
    return recorded if isinstance(recorded, int) else args.steps


def _check_schedule(opt_cfg, steps: int, *, recorded: bool) -> None:
    """Refuse steps that would run at learning rate 0 after the end of the cosine schedule."""
    end = max(opt_cfg.total_steps, opt_cfg.warmup_steps + 1)
    if steps > end and opt_cfg.end_lr_ratio == 0:
        source = "the length recorded by the run being resumed" if recorded else "--schedule-steps"
        raise CliError(
            f"--steps {steps} goes past the end of the learning-rate schedule ({end} steps, "
            f"{source}): steps {end + 1}-{steps} would run at learning rate 0; pass "
            f"--schedule-steps {steps} to stretch the cosine schedule to the new end")


def _schedule_note(opt_cfg, old: Optional[Dict[str, Any]], step: int, lr_schedule) -> str:
    """One phrase for the resume message: the schedule kept, or changed and what that does."""
    recorded = (old or {}).get("optimizer", {}).get("total_steps")
    if recorded is None or recorded == opt_cfg.total_steps:
        return f"learning-rate schedule of {opt_cfg.total_steps} steps kept"
    was = lr_schedule(dataclasses.replace(opt_cfg, total_steps=recorded))(step)
    return (f"learning-rate schedule changed from {recorded} to {opt_cfg.total_steps} steps: "
            f"step {step + 1} runs at {float(lr_schedule(opt_cfg)(step)):.3g} (was {float(was):.3g})")


def _check_run_record(workdir: str, record: Dict[str, Any], old: Optional[Dict[str, Any]]) -> None:
    """Refuse to resume with options that change what is computed. The schedule's length may
    change (``--schedule-steps``): the optimizer state does not depend on it."""
    if old is None:
        return

    def comparable(rec: Dict[str, Any]) -> Dict[str, Any]:
        opt = {k: v for k, v in (rec.get("optimizer") or {}).items() if k != "total_steps"}
        return {**rec, "optimizer": opt}

    old, new = comparable(old), comparable(record)
    diff = [k for k in RUN_KEYS if old.get(k) != new.get(k)]
    if diff:
        raise CliError(f"--resume with options that differ from the run in {workdir}: {', '.join(diff)}")


def cmd_train(args) -> int:
    h, w = _size(args.image_size)
    if args.steps < 0 or args.batch < 1:
        raise CliError("--steps must be >= 0 and --batch >= 1")
    if args.resume and not args.workdir:
        raise CliError("--resume needs --workdir")
    _setup_devices(args)

    import jax
    import numpy as np
    from flax import nnx

    from jax_adapter import training
    from jax_adapter.progress import progress_bar
    from jax_adapter.training import synthetic

    devices = jax.devices()
    n = args.devices or len(devices)
    if n > len(devices):
        raise CliError(
            f"--devices {n}: only {len(devices)} {jax.default_backend()} devices are available"
        )
    if jax.process_count() > 1 and n != len(devices):
        raise CliError("multi-host runs use all devices: leave --devices at 0")
    if args.batch % n:
        raise CliError(f"--batch {args.batch} is not divisible by the {n} devices")
    mesh = training.make_mesh(devices[:n])

    cfg = _load_config(args.preset)
    changes = {}
    if args.remat:
        changes["with_cp"] = True
    if args.bf16:
        changes["dtype"] = "bfloat16"
        if hasattr(cfg, "trunk_dtype"):
            changes["trunk_dtype"] = "bfloat16"  # the frozen DINOv3 trunk too, as upstream's autocast
    if args.drop_path is not None:
        changes["drop_path_rate"] = args.drop_path
    cfg = cfg.replace(**changes)
    # A DINOv3 adapter's trunk never trains (its config says so), whatever --freeze-trunk says.
    freeze_trunk = args.freeze_trunk or getattr(cfg, "frozen_trunk", False)
    hidden = 64
    old_record = _read_run_record(args.workdir) if args.resume else None
    opt_cfg = training.OptimizerConfig(
        learning_rate=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup,
        total_steps=_schedule_steps(args, old_record), layer_decay=args.layer_decay,
    )
    _check_schedule(opt_cfg, args.steps, recorded=args.schedule_steps is None and old_record is not None)
    record = {
        "model": {k: v for k, v in cfg.to_dict().items() if k != "with_cp"},
        "batch": args.batch, "image_size": [h, w], "seed": args.seed,
        "freeze_trunk": freeze_trunk, "head_hidden": hidden,
        "optimizer": {k: v for k, v in vars(opt_cfg).items()},
    }

    # Workdir checks first: they are cheap, building the model is not.
    ckpt: Optional[training.Checkpoints] = None
    latest = None
    if args.workdir:
        _check_run_record(args.workdir, record, old_record)
        ckpt = training.Checkpoints(args.workdir, max_to_keep=args.keep,
                                    save_every=args.checkpoint_every or (1 << 30))
        latest = ckpt.latest_step()
        if latest is not None and not args.resume:
            raise CliError(
                f"{args.workdir} already holds checkpoints (latest step {latest}): pass --resume "
                "or use another --workdir"
            )

    model = synthetic.SegmentationModel(cfg, hidden=hidden, rngs=nnx.Rngs(args.seed))
    model.train()
    step_fn = training.TrainStep(
        model, synthetic.segmentation_loss,
        lambda params: training.make_optimizer(opt_cfg, params, depth=cfg.depth, backbone_path=("backbone",)),
        trainable=training.trainable_filter(freeze_trunk, ("backbone",)), mesh=mesh,
    )
    del model  # its arrays now belong to the train state (and are donated to each step)

    if ckpt is not None and args.resume and latest is not None:
        state = ckpt.restore(step_fn.abstract_state(), latest)
        _log(f"resumed from step {latest} in {ckpt.directory}; "
             f"{_schedule_note(opt_cfg, old_record, latest, training.lr_schedule)}")
    else:
        if args.resume:
            # So that a preemptible job can always be launched with --resume.
            _log(f"no checkpoint in {ckpt.directory}: starting from step 0")
        state = step_fn.init(args.seed)
    if ckpt is not None and jax.process_index() == 0:
        with open(os.path.join(args.workdir, RUN_FILE), "w") as f:
            json.dump(record, f, indent=1)

    start = int(jax.device_get(state.step))
    stop = min(args.steps, args.stop_after) if args.stop_after is not None else args.steps
    # Each process builds its own slice of the global batch.
    per_process = args.batch // jax.process_count()
    first = jax.process_index() * per_process
    indices = range(first, first + per_process)

    if start >= stop:
        _log(f"already at step {start}: nothing to do for --steps {args.steps}")
    # SIGTERM (preemption) and Ctrl-C end the run after the current step, with a checkpoint.
    stop_signal = []
    handlers = {sig: signal.signal(sig, lambda num, _: stop_signal.append(signal.Signals(num).name))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    progress = progress_bar(args.steps, "training", unit="step", initial=start)
    completed = False
    try:
        for step in range(start, stop):
            batch = step_fn.shard_batch(synthetic.synthetic_batch(args.seed, step, indices, h, w))
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            metrics = jax.device_get(metrics)
            dt = time.perf_counter() - t0
            loss = float(metrics["loss"])
            if not np.isfinite(loss):
                raise CliError(f"non-finite loss {loss} at step {step + 1}")
            if jax.process_index() == 0:
                line = {"step": step + 1, "loss": loss, "accuracy": float(metrics["accuracy"]),
                        "step_time_s": round(dt, 4)}
                print(json.dumps(line), flush=True)
            progress.set_postfix(loss=f"{loss:.4f}", refresh=False)
            progress.update(1)
            if ckpt is not None:
                ckpt.save(state)
            if stop_signal:
                _log(f"{stop_signal[0]}: stopping after step {step + 1}")
                break
        completed = True
    finally:
        progress.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if ckpt is not None:
            # After an error the state may be non-finite or donated: only finish pending writes.
            if completed and ckpt.save(state, force=True):
                _log(f"checkpoint of step {int(jax.device_get(state.step))} in {ckpt.directory}")
            ckpt.close()
    return 0


def _log(msg: str) -> None:
    print(f"jax-adapter train: {msg}", file=sys.stderr, flush=True)
