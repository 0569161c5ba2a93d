"""AdamW with warmup + cosine decay and layer-wise learning-rate decay (the ViT-Adapter recipe)."""

from __future__ import annotations

import dataclasses
from typing import Any, Hashable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from jax_adapter.training.params import lr_scales, weight_decay_mask

@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup + cosine decay and layer-wise learning-rate decay.

    ``total_steps`` is the schedule's length (warmup included); ``layer_decay`` 1.0 turns the
    layer-wise decay off (ViT-Adapter uses 0.65 for ViT-B, 0.9 for ViT-L).
    """

    learning_rate: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 0
    total_steps: int = 1000
    end_lr_ratio: float = 0.0
    layer_decay: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_grad_norm: Optional[float] = None


def lr_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then cosine decay to ``end_lr_ratio`` of it."""
    total = max(cfg.total_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.warmup_steps, total, end_value=cfg.learning_rate * cfg.end_lr_ratio
    )


def _scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiply each update by a fixed per-leaf factor (stateless)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(
    cfg: OptimizerConfig, params: Any, *, depth: int, backbone_path: Sequence[Hashable] = ()
) -> optax.GradientTransformation:
    """The ViT-Adapter AdamW for the trained ``params`` (the state to be optimised).

    The update of a parameter with layer id ``i`` is ``-lr(t) * decay**(depth+1-i) * (adam +
    wd * p)``, as PyTorch's AdamW computes it for a parameter group with that learning rate.
    """
    parts = []
    if cfg.clip_grad_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    parts += [
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=weight_decay_mask(params)),
        optax.scale_by_learning_rate(lr_schedule(cfg)),
    ]
    if cfg.layer_decay != 1.0:
        parts.append(_scale_by_tree(lr_scales(params, depth, cfg.layer_decay, backbone_path)))
    return optax.chain(*parts)
