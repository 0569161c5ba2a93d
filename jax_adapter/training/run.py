"""Training as a library object: :class:`Trainer` owns the loop, resuming, the learning-rate
schedule's rules, checkpoints and the run's record; ``jax-adapter train`` is a thin wrapper.

A run directory (``TrainConfig.workdir``) holds orbax checkpoints of the whole train state and
``run.json``, the options that change what is computed. A resumed run must agree with it (the
model, batch, seed, freeze, optimizer and the task's own options), except for the schedule's
length, which ``schedule_steps`` may change: the optimizer's state does not depend on it.

The schedule: a cosine over ``schedule_steps`` (default ``steps``) that ends at 0. A resumed
run keeps the recorded length unless ``schedule_steps`` is given; a run that would go past the
schedule's end (steps at learning rate 0) is refused with the length to pass instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, Hashable, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from jax_adapter.errors import ConfigError, TrainingError
from jax_adapter.files import read_json
from jax_adapter.progress import progress_bar
from jax_adapter.training.checkpoints import Checkpoints
from jax_adapter.training.optim import OptimizerConfig, lr_schedule, make_optimizer
from jax_adapter.training.params import trainable_filter
from jax_adapter.training.step import Batch, LossFn, TrainState, TrainStep

RUN_FILE = "run.json"
# Entries of the run record that a resumed run must repeat (the optimizer's schedule length
# aside).
RUN_KEYS = ("model", "batch", "seed", "freeze_trunk", "optimizer", "task")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What a training run does (the model and the data are the :class:`Trainer`'s arguments).

    ``steps``: the total (a resumed run continues up to it); ``batch``: the global batch (all
    devices of all processes); ``optimizer``: AdamW and its schedule (its ``total_steps`` is set
    by ``schedule_steps`` and the resume rules); ``freeze_trunk``: the trunk gets no gradient
    and no optimizer state (a DINOv3 adapter's trunk never trains, whatever this says);
    ``workdir``: checkpoints and the run record (``None``: none); ``resume``: continue from the
    latest checkpoint there (an empty workdir starts at step 0); ``checkpoint_every``: also save
    every so many steps (0: only at the end); ``keep``: checkpoints kept; ``stop_after``: stop
    after this step as if interrupted.
    """

    steps: int = 20
    batch: int = 8
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule_steps: Optional[int] = None
    freeze_trunk: bool = False
    seed: int = 0
    workdir: Optional[str] = None
    resume: bool = False
    checkpoint_every: int = 0
    keep: int = 3
    stop_after: Optional[int] = None

    def __post_init__(self):
        if self.steps < 0 or self.batch < 1:
            raise ConfigError("steps must be >= 0 and batch >= 1")
        if self.resume and not self.workdir:
            raise ConfigError("resume needs a workdir (--resume needs --workdir)")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ConfigError("schedule_steps (--schedule-steps) must be >= 1")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def read_run_record(workdir: str) -> Optional[Dict[str, Any]]:
    """The options recorded by the run in ``workdir`` (None before its first run)."""
    path = os.path.join(workdir, RUN_FILE)
    return read_json(path, ConfigError) if os.path.exists(path) else None


def schedule_length(cfg: TrainConfig, old: Optional[Mapping[str, Any]]) -> int:
    """The cosine schedule's length: ``schedule_steps`` when given; on resume the recorded length,
    so that the learning rates of a resumed run continue unchanged; else ``steps``."""
    if cfg.schedule_steps is not None:
        return cfg.schedule_steps
    recorded = (old or {}).get("optimizer", {}).get("total_steps")
    return recorded if isinstance(recorded, int) else cfg.steps


def check_schedule(opt: OptimizerConfig, steps: int, *, recorded: bool) -> None:
    """Refuse steps that would run at learning rate 0 after the end of the cosine schedule."""
    end = max(opt.total_steps, opt.warmup_steps + 1)
    if steps > end and opt.end_lr_ratio == 0:
        source = "the length recorded by the run being resumed" if recorded else "schedule_steps"
        raise ConfigError(
            f"steps {steps} goes past the end of the learning-rate schedule ({end} steps, {source}): "
            f"steps {end + 1}-{steps} would run at learning rate 0; set schedule_steps={steps} "
            f"(--schedule-steps {steps}) to stretch the cosine schedule to the new end")


def schedule_note(opt: OptimizerConfig, old: Optional[Mapping[str, Any]], step: int) -> str:
    """One phrase for the resume message: the schedule kept, or changed and what that does."""
    recorded = (old or {}).get("optimizer", {}).get("total_steps")
    if recorded is None or recorded == opt.total_steps:
        return f"learning-rate schedule of {opt.total_steps} steps kept"
    was = lr_schedule(dataclasses.replace(opt, total_steps=recorded))(step)
    return (f"learning-rate schedule changed from {recorded} to {opt.total_steps} steps: "
            f"step {step + 1} runs at {float(lr_schedule(opt)(step)):.3g} (was {float(was):.3g})")


def check_run_record(workdir: str, record: Mapping[str, Any], old: Optional[Mapping[str, Any]]) -> None:
    """Refuse to resume with options that change what is computed (all of :data:`RUN_KEYS` but
    the schedule's length)."""
    if old is None:
        return

    def comparable(rec: Mapping[str, Any]) -> Dict[str, Any]:
        opt = {k: v for k, v in (rec.get("optimizer") or {}).items() if k != "total_steps"}
        return {**rec, "optimizer": opt}

    old, new = comparable(old), comparable(record)
    diff = [k for k in RUN_KEYS if old.get(k) != new.get(k)]
    if diff:
        raise ConfigError(f"resuming with options that differ from the run in {workdir}: {', '.join(diff)}")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _submodule(model: nnx.Module, path: Sequence[Hashable]) -> nnx.Module:
    for name in path:
        model = getattr(model, name) if isinstance(name, str) else model[name]
    return model


def recipe_config(cfg: Any, *, remat: bool = False, bf16: bool = False, drop_path: Optional[float] = None) -> Any:
    """An adapter config with the training switches applied: ``remat`` (``with_cp``, activation
    checkpointing), ``bf16`` (bfloat16 compute with float32 parameters; it reaches a frozen
    DINOv3 trunk too, as upstream's autocast does) and ``drop_path`` (the rate)."""
    changes: Dict[str, Any] = {}
    if remat:
        changes["with_cp"] = True
    if bf16:
        changes["dtype"] = "bfloat16"
        if getattr(cfg, "frozen_trunk", False):
            changes["trunk_dtype"] = "bfloat16"
    if drop_path is not None:
        changes["drop_path_rate"] = drop_path
    return cfg.replace(**changes)


def adapter_step(model: nnx.Module, loss_fn: LossFn, optimizer: OptimizerConfig, *,
                 freeze_trunk: bool = False, mesh: Any = None,
                 backbone_path: Sequence[Hashable] = ("backbone",)) -> TrainStep:
    """The ViT-Adapter recipe's train step for the adapter at ``backbone_path`` inside ``model``:
    AdamW with layer-wise decay by the trunk's depth, the trunk frozen when asked (a DINOv3
    adapter's always). ``model`` may be abstract (``nnx.eval_shape``) to lower the step only."""
    backbone = _submodule(model, backbone_path).cfg
    return TrainStep(
        model, loss_fn,
        lambda params: make_optimizer(optimizer, params, depth=backbone.depth, backbone_path=backbone_path),
        trainable=trainable_filter(freeze_trunk, backbone_path), mesh=mesh,
    )


class Trainer:
    """A training run of ``model`` (in train mode) under ``loss_fn(model, batch) -> (loss,
    {name: scalar})``, as ``cfg`` says: the optimizer is the ViT-Adapter recipe over the
    adapter at ``backbone_path`` inside ``model`` (layer-wise decay by its trunk's depth).

    Construction checks the run directory (the record, the schedule, an existing run without
    ``resume``) before building anything expensive, then builds the jitted step and the state
    (restored, or fresh from ``model``'s values, whose arrays it takes over). :meth:`fit` runs
    the loop. ``task``: the task's own options, recorded so that a resumed run must repeat them.
    ``log``: where messages go (default stderr). ``mesh``: the device mesh (default: all
    devices of all processes).
    """

    def __init__(self, model: nnx.Module, loss_fn: LossFn, cfg: TrainConfig, *, mesh: Any = None,
                 backbone_path: Sequence[Hashable] = ("backbone",), task: Optional[Mapping[str, Any]] = None,
                 log: Callable[[str], None] = _stderr):
        self.cfg, self.log = cfg, log
        backbone = _submodule(model, backbone_path).cfg
        old = read_run_record(cfg.workdir) if cfg.resume else None
        self.optimizer = dataclasses.replace(cfg.optimizer, total_steps=schedule_length(cfg, old))
        check_schedule(self.optimizer, cfg.steps, recorded=cfg.schedule_steps is None and old is not None)
        freeze = cfg.freeze_trunk or getattr(backbone, "frozen_trunk", False)
        self.record = {
            "model": {k: v for k, v in backbone.to_dict().items() if k != "with_cp"},
            "batch": cfg.batch, "seed": cfg.seed, "freeze_trunk": freeze,
            "optimizer": dataclasses.asdict(self.optimizer), "task": dict(task or {}),
        }
        # Workdir checks first: they are cheap, building the step is not.
        self.checkpoints: Optional[Checkpoints] = None
        latest = None
        if cfg.workdir:
            check_run_record(cfg.workdir, self.record, old)
            self.checkpoints = Checkpoints(cfg.workdir, max_to_keep=cfg.keep,
                                           save_every=cfg.checkpoint_every or (1 << 30))
            latest = self.checkpoints.latest_step()
            if latest is not None and not cfg.resume:
                raise ConfigError(f"{cfg.workdir} already holds checkpoints (latest step {latest}): "
                                  "resume it (--resume) or use another workdir")
        self.step = adapter_step(model, loss_fn, self.optimizer, freeze_trunk=freeze, mesh=mesh,
                                 backbone_path=backbone_path)
        if latest is not None:
            self.state = self.checkpoints.restore(self.step.abstract_state(), latest)
            self.log(f"resumed from step {latest} in {self.checkpoints.directory}; "
                     f"{schedule_note(self.optimizer, old, latest)}")
        else:
            if cfg.resume:
                # So that a preemptible job can always be launched with resume.
                self.log(f"no checkpoint in {self.checkpoints.directory}: starting from step 0")
            self.state = self.step.init(cfg.seed)
        if self.checkpoints is not None and jax.process_index() == 0:
            with open(os.path.join(cfg.workdir, RUN_FILE), "w") as f:
                json.dump(self.record, f, indent=1)

    @property
    def start(self) -> int:
        return int(jax.device_get(self.state.step))

    def local_indices(self) -> range:
        """This process's indices into the global batch (each process builds its own slice)."""
        per_process = self.cfg.batch // jax.process_count()
        first = jax.process_index() * per_process
        return range(first, first + per_process)

    def fit(self, local_batch: Callable[[int], Batch],
            on_step: Optional[Callable[[int, Dict[str, float], float], None]] = None) -> TrainState:
        """Run steps from the current one up to ``cfg.steps`` (or ``cfg.stop_after``).

        ``local_batch(step)``: this process's samples of ``step`` (numpy, batch on axis 0; see
        :meth:`local_indices`). ``on_step(step, metrics, seconds)`` after each step (``step`` is
        1-based; metrics are floats). SIGTERM and Ctrl-C (in the main thread) end the run after
        the current step; a checkpoint is written at the end, not after an error. Returns the
        final state (also :attr:`state`).
        """
        cfg = self.cfg
        start = self.start
        stop = min(cfg.steps, cfg.stop_after) if cfg.stop_after is not None else cfg.steps
        if start >= stop:
            self.log(f"already at step {start}: nothing to do for {cfg.steps} steps")
        stop_signal: list = []
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {sig: signal.signal(sig, lambda num, _: stop_signal.append(signal.Signals(num).name))
                        for sig in (signal.SIGTERM, signal.SIGINT)}
        progress = progress_bar(cfg.steps, "training", unit="step", initial=start)
        completed = False
        try:
            for step in range(start, stop):
                batch = self.step.shard_batch(local_batch(step))
                t0 = time.perf_counter()
                self.state, metrics = self.step(self.state, batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t0
                if not np.isfinite(metrics["loss"]):
                    raise TrainingError(f"non-finite loss {metrics['loss']} at step {step + 1}")
                if on_step is not None:
                    on_step(step + 1, metrics, dt)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                progress.update(1)
                if self.checkpoints is not None:
                    self.checkpoints.save(self.state)
                if stop_signal:
                    self.log(f"{stop_signal[0]}: stopping after step {step + 1}")
                    break
            completed = True
        finally:
            progress.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if self.checkpoints is not None:
                # After an error the state may be non-finite or donated: only finish pending writes.
                if completed and self.checkpoints.save(self.state, force=True):
                    self.log(f"checkpoint of step {self.start} in {self.checkpoints.directory}")
                self.checkpoints.close()
        return self.state

    def model(self, *, train: bool = False) -> nnx.Module:
        """The trained model (eval mode unless ``train``), sharing the state's arrays."""
        return self.step.model(self.state, train=train)
