"""``ms_deform_attn``: the sampling core from sampling locations and softmaxed weights."""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp

from . import _kernels
from ._common import Dims, Level, at, load, make_config, static_shapes, store
from ._kernels import Point


class _Direct:
    """Source reading ``locations [B, Q, M, L, P, 2]`` and ``weights [B, Q, M, L, P]``."""

    n_in = 2
    points_input = 0

    def grad_shapes(self, inputs, d: Dims, cdt) -> tuple:
        return tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs)

    def prepare(self, refs, m, rows, ok, d: Dims, cdt):
        return None

    def point(self, refs, st, m, rows, ok, k, lv: Level, d: Dims, cdt) -> Point:
        loc_ref, att_ref = refs  # [B*Q, M*L*P*2], [B*Q, M*L*P]
        col = m * d.lp + k
        return Point(x=load(at(loc_ref, rows, 2 * col), ok, cdt),
                     y=load(at(loc_ref, rows, 2 * col + 1), ok, cdt),
                     a=load(at(att_ref, rows, col), ok, cdt))

    def grad_init(self, st, ok, d: Dims, cdt):
        return jnp.int32(0)

    def grad_point(self, in_refs, refs, st, m, rows, ok, k, lv, pt, gx, gy, ga, carry, d: Dims):
        gl_ref, ga_ref = refs
        col = m * d.lp + k
        store(at(gl_ref, rows, 2 * col), gx, ok)
        store(at(gl_ref, rows, 2 * col + 1), gy, ok)
        store(at(ga_ref, rows, col), ga, ok)
        return carry

    def grad_finish(self, in_refs, refs, st, m, rows, ok, carry, d: Dims, cdt) -> None:
        pass


# ``core(value, shapes, (locations, weights), cfg)``, differentiable.
_CORE = _kernels.differentiable(_Direct())


def ms_deform_attn(value: jax.Array, spatial_shapes: Sequence[Tuple[int, int]], sampling_locations: jax.Array,
                   attention_weights: jax.Array, *, interpret: bool | None = None, block_q: int | None = None,
                   block_q_value: int | None = None, mesh: Any = None, batch_axis: Any = None) -> jax.Array:
    """Multi-scale deformable attention sampling core as Pallas (Triton) kernels.

    Args:
      value: ``[B, S, M, Dh]`` (float32 or bfloat16), levels flattened row-major, concatenated.
      spatial_shapes: static ``(H, W)`` per level.
      sampling_locations: ``[B, Q, M, L, P, 2]`` normalised (x, y); off-map, infinite or NaN
        locations contribute zero (and get zero gradient).
      attention_weights: ``[B, Q, M, L, P]``.
      interpret: run the Pallas interpreter; ``None`` -> everywhere but on GPU.
      block_q, block_q_value: queries per program (powers of two) of the forward and
        location/weight-gradient kernels, and of the value-gradient kernel; ``None``: the
        defaults for the head width (``_common.default_block``, from the kernel report).
      mesh, batch_axis: run every kernel under ``jax.shard_map`` split along the batch axis
        over mesh axis (or axes) ``batch_axis`` of ``mesh`` (``None``: the mesh in context).
        The ``custom_vjp`` stays outside the ``shard_map``.

    Returns:
      ``[B, Q, M*Dh]`` in ``value.dtype``, accumulated in float32 (float64 for float64 value).
    """
    shapes = static_shapes(spatial_shapes)
    cfg = make_config("plain", value.shape[-1], interpret, block_q, block_q_value, mesh, batch_axis)
    return _CORE(value, shapes, (sampling_locations, attention_weights), cfg)
