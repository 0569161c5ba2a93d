"""``MSDeformAttn``: multi-scale deformable attention with the PyTorch parameterisation."""

from __future__ import annotations

import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_adapter.nn import msda
from jax_adapter.nn.layers import DType, compute_dtype
from jax_adapter.sharding import batch_axis_in_context
from jax_adapter.errors import ConfigError, InputError


def _offset_bias(n_heads: int, n_levels: int, n_points: int) -> np.ndarray:
    """PyTorch ``_reset_parameters``: head m points along angle 2*pi*m/M, point p at p+1 steps."""
    theta = np.arange(n_heads, dtype=np.float64) * (2.0 * math.pi / n_heads)
    grid = np.stack([np.cos(theta), np.sin(theta)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, n_levels, n_points, 1))
    grid = grid * np.arange(1, n_points + 1, dtype=np.float64)[None, None, :, None]
    return grid.reshape(-1).astype(np.float32)


class MSDeformAttn(nnx.Module):
    """Multi-scale deformable attention.

    ``query [B, Q, D]`` attends to ``feat [B, S, D]`` (levels of ``spatial_shapes`` flattened
    row-major and concatenated) around ``reference_points [Q, 2]`` or ``[B, Q, 2]`` (x, y in
    [0, 1], shared by all levels) -> ``[B, Q, D]``.

    With a compute ``dtype`` below float32, the value and attention-logit projections run in
    it, while the sampling locations (reference + offset / level size) stay float32: a bfloat16
    location would be off by up to half a pixel on the larger levels. Under a mesh whose
    ``BATCH_AXIS`` splits the batch, the sampling core runs per device on its local batch
    (``jax.shard_map``): it is a gather over data-dependent rows, which the SPMD partitioner
    would otherwise answer by gathering the whole batch onto every device.
    """

    def __init__(
        self, d_model: int, n_levels: int, n_heads: int, n_points: int, ratio: float = 1.0,
        *, impl: str = "auto", rngs: nnx.Rngs, dtype: DType = None,
        param_dtype: DType = jnp.float32,
    ):
        dv = int(d_model * ratio)
        if dv % n_heads:
            raise ConfigError(f"value width {dv} is not divisible by n_heads {n_heads}")
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.impl = impl
        zeros = nnx.initializers.zeros
        dt = dict(dtype=compute_dtype(dtype), param_dtype=jnp.dtype(param_dtype))
        # Offsets are computed in float32 whatever the compute dtype (see the class docstring);
        # the projection is small (M*L*P*2 outputs).
        self.sampling_offsets = nnx.Linear(
            d_model, n_heads * n_levels * n_points * 2, kernel_init=zeros,
            bias_init=lambda *_: jnp.asarray(_offset_bias(n_heads, n_levels, n_points)),
            dtype=jnp.float32 if dt["dtype"] is not None else None,
            param_dtype=dt["param_dtype"], rngs=rngs,
        )
        self.attention_weights = nnx.Linear(
            d_model, n_heads * n_levels * n_points, kernel_init=zeros, rngs=rngs, **dt
        )
        xavier = nnx.initializers.xavier_uniform()
        self.value_proj = nnx.Linear(d_model, dv, kernel_init=xavier, rngs=rngs, **dt)
        self.output_proj = nnx.Linear(dv, d_model, kernel_init=xavier, rngs=rngs, **dt)

    def __call__(
        self,
        query: jax.Array,
        reference_points: jax.Array,
        feat: jax.Array,
        spatial_shapes: Tuple[Tuple[int, int], ...],
    ) -> jax.Array:
        b, q, _ = query.shape
        if len(spatial_shapes) != self.n_levels:
            raise InputError(f"expected {self.n_levels} levels, got spatial_shapes {spatial_shapes}")
        m, l, p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(feat)
        value = value.reshape(b, feat.shape[1], m, -1)
        offsets = self.sampling_offsets(query).reshape(b, q, m, l, p, 2)
        logits = self.attention_weights(query).reshape(b, q, m, l * p)
        loc_dtype = jnp.promote_types(offsets.dtype, jnp.float32)
        offsets = offsets.astype(loc_dtype)
        ref = jnp.broadcast_to(jnp.asarray(reference_points, loc_dtype), (b, q, 2))

        # Under a batch-splitting mesh the core runs per device (ops keeps a Pallas custom_vjp
        # outside the shard_map).
        out = msda.ms_deform_attn_fused(value, spatial_shapes, ref, offsets, logits, impl=self.impl,
                                       batch_axis=batch_axis_in_context())
        return self.output_proj(out)
