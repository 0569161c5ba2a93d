"""Whole-train-state checkpoints: an orbax ``CheckpointManager`` over :class:`TrainState`."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import jax
import numpy as np

from jax_adapter.training.step import TrainState


def _flat(tree: Any) -> Dict[str, Any]:
    """A pytree as ``{"params.blocks.0.attn.qkv.kernel.value": leaf}`` (orbax wants plain
    containers; nnx ``State`` and optax named tuples are not)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(kp, simple=True, separator="."): x for kp, x in leaves}


class Checkpoints:
    """Periodic, keep-last-N, atomic checkpoints of :class:`TrainState` under ``directory``.

    Each checkpoint is a step directory written by orbax into a temporary name and renamed when
    complete, so an interrupted save never appears as the latest checkpoint. ``save`` writes
    when ``step % save_every == 0`` (or when forced); writing continues in the background
    (``wait()`` blocks until it is done). All processes of a multi-host run call the same
    methods.
    """

    def __init__(self, directory: str, *, max_to_keep: Optional[int] = 3, save_every: int = 1):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self.save_every = max(int(save_every), 1)
        self._mgr = ocp.CheckpointManager(
            self.directory,
            item_handlers=ocp.StandardCheckpointHandler(),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def all_steps(self) -> Sequence[int]:
        return list(self._mgr.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._mgr.latest_step()

    def save(self, state: TrainState, *, force: bool = False) -> bool:
        """Save ``state`` under its step if due (or ``force``); returns whether it saved."""
        step = int(jax.device_get(state.step))
        if step in self._mgr.all_steps() or not (force or step % self.save_every == 0):
            return False
        # The manager's own interval logic also saves the first step it sees; decide here.
        return self._mgr.save(step, args=self._ocp.args.StandardSave(_flat(state)), force=True)

    def restore(self, like: TrainState, step: Optional[int] = None) -> TrainState:
        """The checkpoint of ``step`` (default: the latest) with ``like``'s structure and
        shardings (``like``: a state or :meth:`TrainStep.abstract_state`)."""
        step = self._latest_or(step)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
        target = {
            jax.tree_util.keystr(kp, simple=True, separator="."): jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=getattr(x, "sharding", None)
            )
            for kp, x in leaves
        }
        flat = self._mgr.restore(step, args=self._ocp.args.StandardRestore(target))
        return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in target])

    def read(self, step: Optional[int] = None) -> Dict[str, np.ndarray]:
        """The arrays of a checkpoint as ``{flat name: numpy array}`` (no model needed; read on
        this process's first device whatever the devices that wrote it)."""
        step = self._latest_or(step)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
                  for k, m in self._mgr.item_metadata(step).items()}
        flat = self._mgr.restore(step, args=self._ocp.args.StandardRestore(target))
        return {k: np.asarray(v) for k, v in flat.items()}

    def _latest_or(self, step: Optional[int]) -> int:
        step = self._mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()
