"""Training with the backbone: a jitted functional train step, the ViT-Adapter optimizer recipe,
data parallelism over a device mesh and whole-train-state checkpoints.

The pieces, smallest first:

* :func:`trainable_filter`, :func:`layer_id`: which parameters train (the DINOv2 trunk can be
  frozen) and which ViT depth each one sits at (for layer-wise learning-rate decay).
* :func:`make_optimizer`: AdamW, linear warmup then cosine decay, layer-wise decay
  ``decay ** (depth + 1 - layer_id)``, no weight decay on vectors and embeddings.
* :class:`TrainStep`: splits an NNX model into its graph and state and jits one pure function
  ``(TrainState, batch) -> (TrainState, metrics)`` over a 1-D device mesh (batch split over
  ``BATCH_AXIS``, state replicated), donating the state. Frozen parameters get no gradient and no
  optimizer state. BatchNorm statistics are taken over the global batch (SyncBatchNorm
  semantics): the SPMD partitioner inserts the cross-device reductions.
* :class:`Checkpoints`: orbax ``CheckpointManager`` over the whole :class:`TrainState`
  (parameters, batch statistics, optimizer state, step, rng): periodic, keep-last-N, atomic.
* :class:`Trainer` with a :class:`TrainConfig`: a whole run (the loop, resuming, the schedule's
  rules, checkpoints, the run record); :func:`adapter_step` builds the recipe's step alone and
  :func:`recipe_config` applies its switches (remat, bfloat16, drop path) to a config.
"""


from jax_adapter.sharding import BATCH_AXIS
from jax_adapter.training.checkpoints import Checkpoints
from jax_adapter.training.optim import OptimizerConfig, lr_schedule, make_optimizer
from jax_adapter.training.params import (
    EMBEDDING_NAMES, NESTED_TRUNK, NO_DECAY_NAMES, TRUNK_NAMES, exclude_frozen, frozen_paths,
    is_trunk, layer_id, lr_scales, map_with_path, path_names, trainable_filter, weight_decay_mask,
)
from jax_adapter.training.run import TrainConfig, Trainer, adapter_step, recipe_config
from jax_adapter.training.step import LossFn, TrainState, TrainStep, make_mesh, replicate, reseed_streams

__all__ = [
    "BATCH_AXIS", "Checkpoints", "EMBEDDING_NAMES", "LossFn", "NESTED_TRUNK", "NO_DECAY_NAMES",
    "OptimizerConfig", "TRUNK_NAMES", "TrainConfig", "TrainState", "TrainStep", "Trainer", "adapter_step",
    "exclude_frozen", "frozen_paths", "is_trunk", "layer_id", "lr_schedule", "lr_scales",
    "make_mesh", "make_optimizer", "map_with_path", "path_names", "recipe_config", "replicate", "reseed_streams",
    "trainable_filter", "weight_decay_mask",
]
