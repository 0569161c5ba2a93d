"""``ms_deform_attn_fused``: the sampling core from reference points, raw offsets and raw logits.

Locations ``ref + offsets / (W_l, H_l)`` and the softmax over the ``L*P`` logits of a query and
head are formed in registers by every kernel that needs them; neither the ``[B, Q, M, L, P, 2]``
locations nor the softmaxed weights ever exist in memory.
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _kernels
from ._common import Dims, Level, at, load, make_config, next_pow2, static_shapes, store
from ._kernels import Point


class _Fused:
    """Source reading ``ref [B, Q, 2]``, ``offsets [B, Q, M, L, P, 2]``, ``logits [B, Q, M, L*P]``."""

    n_in = 3
    points_input = 1

    def grad_shapes(self, inputs, d: Dims, cdt) -> tuple:
        _, off, lg = inputs
        return (
            jax.ShapeDtypeStruct((d.b, d.q, d.m, 2), cdt),  # per-head partial sums
            jax.ShapeDtypeStruct(off.shape, off.dtype),
            jax.ShapeDtypeStruct(lg.shape, lg.dtype),
        )

    @staticmethod
    def _logits(lg_ref, m, rows, ok, d: Dims, cdt):
        """The head's ``L*P`` logits as ``[..., K]`` (``K`` a power of two; -inf past L*P), and
        the column index and mask ``[K]``."""
        n = d.lp
        kcol = lax.broadcasted_iota(jnp.int32, (next_pow2(n),), 0)
        kok = kcol < n
        z = load(at(lg_ref, rows, pl.ds(m * n, kcol.shape[0])), jnp.expand_dims(ok, -1) & kok, cdt)
        return jnp.where(kok, z, -jnp.inf), kcol, kok

    def prepare(self, refs, m, rows, ok, d: Dims, cdt):
        """Reference point and the softmax statistics (max, sum of exponentials) of the head."""
        ref_ref, _, lg_ref = refs  # [B*Q, 2], [B*Q, M*L*P*2], [B*Q, M*L*P]
        z, _, _ = self._logits(lg_ref, m, rows, ok, d, cdt)
        top = jnp.max(z, axis=-1)
        total = jnp.sum(jnp.exp(z - jnp.expand_dims(top, -1)), axis=-1)
        return (load(at(ref_ref, rows, 0), ok, cdt), load(at(ref_ref, rows, 1), ok, cdt), top, total)

    def point(self, refs, st, m, rows, ok, k, lv: Level, d: Dims, cdt) -> Point:
        _, off_ref, lg_ref = refs
        rx, ry, top, total = st
        col = m * d.lp + k
        return Point(x=rx + load(at(off_ref, rows, 2 * col), ok, cdt) / lv.wf,
                     y=ry + load(at(off_ref, rows, 2 * col + 1), ok, cdt) / lv.hf,
                     a=jnp.exp(load(at(lg_ref, rows, col), ok, cdt) - top) / total)

    def grad_init(self, st, ok, d: Dims, cdt):
        """Reference-point gradient sums ``[n]`` and the weight gradients ``[n, K]`` (the softmax
        backward needs all of them: kept in registers, one column per point)."""
        zero = jnp.zeros(ok.shape, cdt)
        return zero, zero, jnp.zeros(ok.shape + (next_pow2(d.lp),), cdt)

    def grad_point(self, in_refs, refs, st, m, rows, ok, k, lv, pt, gx, gy, ga, carry, d: Dims):
        _, goff_ref, _ = refs
        grx, gry, ga_all = carry
        col = m * d.lp + k
        store(at(goff_ref, rows, 2 * col), gx / lv.wf, ok)
        store(at(goff_ref, rows, 2 * col + 1), gy / lv.hf, ok)
        kcol = lax.broadcasted_iota(jnp.int32, ga_all.shape, ga_all.ndim - 1)
        return grx + gx, gry + gy, jnp.where(kcol == k, jnp.expand_dims(ga, -1), ga_all)

    def grad_finish(self, in_refs, refs, st, m, rows, ok, carry, d: Dims, cdt) -> None:
        gref_ref, _, glg_ref = refs
        grx, gry, ga_all = carry
        _, _, top, total = st
        n = d.lp
        z, _, kok = self._logits(in_refs[2], m, rows, ok, d, cdt)
        a = jnp.exp(z - jnp.expand_dims(top, -1)) / jnp.expand_dims(total, -1)
        # Softmax backward: dz_k = a_k (ga_k - sum_j a_j ga_j).
        mean = jnp.sum(a * ga_all, axis=-1)
        store(at(glg_ref, rows, pl.ds(m * n, kok.shape[0])), a * (ga_all - jnp.expand_dims(mean, -1)),
              jnp.expand_dims(ok, -1) & kok)
        # The reference point is shared by all heads, which live in different programs: write
        # one partial sum per head (a [B, Q, M, 2] output), reduced outside.
        store(at(gref_ref, rows, 2 * m), grx, ok)
        store(at(gref_ref, rows, 2 * m + 1), gry, ok)


def _finish(grads: tuple, inputs: tuple) -> tuple:
    """The reference point's gradient is one partial sum per head (the heads live in different
    programs): reduce them here."""
    g_ref_heads, g_off, g_logits = grads
    return g_ref_heads.sum(axis=2).astype(inputs[0].dtype), g_off, g_logits


# ``core(value, shapes, (reference_points, offsets, logits), cfg)``, differentiable.
_CORE = _kernels.differentiable(_Fused(), _finish)


def ms_deform_attn_fused(value: jax.Array, spatial_shapes: Sequence[Tuple[int, int]], reference_points: jax.Array,
                         offsets: jax.Array, logits: jax.Array, *, interpret: bool | None = None,
                         block_q: int | None = None, block_q_value: int | None = None, mesh: Any = None,
                         batch_axis: Any = None) -> jax.Array:
    """Sampling core with ``loc = ref + offsets / (W_l, H_l)`` and the softmax done in-kernel.

    Args:
      value: ``[B, S, M, Dh]`` (float32 or bfloat16).
      spatial_shapes: static ``(H, W)`` per level.
      reference_points: ``[B, Q, 2]`` normalised (x, y), shared by all heads and levels.
      offsets: ``[B, Q, M, L, P, 2]`` raw offsets in pixels of each level.
      logits: ``[B, Q, M, L*P]`` raw attention logits (softmax over the last axis).
      interpret, block_q, block_q_value, mesh, batch_axis: as for
        :func:`pallas_kernels.ms_deform_attn`.

    Returns:
      ``[B, Q, M*Dh]`` in ``value.dtype``.
    """
    shapes = static_shapes(spatial_shapes)
    cfg = make_config("fused", value.shape[-1], interpret, block_q, block_q_value, mesh, batch_axis)
    return _CORE(value, shapes, (reference_points, offsets, logits), cfg)
