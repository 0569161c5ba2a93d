"""``ms_deform_attn_fused``: the sampling core from reference points, raw offsets and raw logits.

Locations ``ref + offsets / (W_l, H_l)`` and the softmax over the ``L*P`` logits of a query and
head are formed in registers by every kernel that needs them; neither the ``[B, Q, M, L, P, 2]``
locations nor the softmaxed weights ever exist in memory.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp

from . import _kernels
from ._common import Config, Dims, at, load, resolve_interpret, static_shapes, store
from ._kernels import Samples


class _Fused:
    """Source reading ``ref [B, Q, 2]``, ``offsets [B, Q, M, L, P, 2]``, ``logits [B, Q, M, L*P]``."""

    n_in = 3

    def dims(self, value, inputs, shapes) -> Dims:
        b, _, m, dh = value.shape
        off = inputs[1]
        return Dims(b=b, q=off.shape[1], m=m, dh=dh, shapes=shapes, p=off.shape[4])

    def grad_shapes(self, inputs, d: Dims, cdt) -> tuple:
        _, off, lg = inputs
        return (
            jax.ShapeDtypeStruct((d.b, d.q, d.m, 2), cdt),  # per-head partial sums
            jax.ShapeDtypeStruct(off.shape, off.dtype),
            jax.ShapeDtypeStruct(lg.shape, lg.dtype),
        )

    def samples(self, refs, m, rows, ok, d: Dims, cdt) -> Samples:
        ref_ref, off_ref, lg_ref = refs  # [B*Q, 2], [B*Q, M*L*P*2], [B*Q, M*L*P]
        rx = load(at(ref_ref, rows, 0), ok, cdt)
        ry = load(at(ref_ref, rows, 1), ok, cdt)
        x = [[rx + load(at(off_ref, rows, d.loc_col(m, l, p, 0)), ok, cdt) / w for p in range(d.p)]
             for l, (h, w) in enumerate(d.shapes)]
        y = [[ry + load(at(off_ref, rows, d.loc_col(m, l, p, 1)), ok, cdt) / h for p in range(d.p)]
             for l, (h, w) in enumerate(d.shapes)]
        z = [[load(at(lg_ref, rows, d.lp_col(m, l, p)), ok, cdt) for p in range(d.p)] for l in range(d.l)]
        top = functools.reduce(jnp.maximum, [v for row in z for v in row])
        e = [[jnp.exp(v - top) for v in row] for row in z]
        total = functools.reduce(jnp.add, [v for row in e for v in row])
        return Samples(x=x, y=y, a=[[v / total for v in row] for row in e])

    def write_grads(self, refs, m, rows, ok, smp, gx, gy, ga, d: Dims) -> None:
        gref_ref, goff_ref, glg_ref = refs
        # Softmax backward: dz_k = a_k (ga_k - sum_j a_j ga_j).
        mean = sum(smp.a[l][p] * ga[l][p] for l in range(d.l) for p in range(d.p))
        for l, (h, w) in enumerate(d.shapes):
            for p in range(d.p):
                store(at(goff_ref, rows, d.loc_col(m, l, p, 0)), gx[l][p] / w, ok)
                store(at(goff_ref, rows, d.loc_col(m, l, p, 1)), gy[l][p] / h, ok)
                store(at(glg_ref, rows, d.lp_col(m, l, p)), smp.a[l][p] * (ga[l][p] - mean), ok)
        # The reference point is shared by all heads, which live in different programs: write
        # one partial sum per head (a [B, Q, M, 2] output), reduced outside.
        store(at(gref_ref, rows, 2 * m), sum(v for row in gx for v in row), ok)
        store(at(gref_ref, rows, 2 * m + 1), sum(v for row in gy for v in row), ok)


_SOURCE = _Fused()


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 5))
def _fused(value, shapes, ref, offsets, logits, cfg: Config):
    return _kernels.forward(_SOURCE, shapes, value, (ref, offsets, logits), cfg)


def _fused_fwd(value, shapes, ref, offsets, logits, cfg):
    return _fused(value, shapes, ref, offsets, logits, cfg), (value, ref, offsets, logits)


def _fused_bwd(shapes, cfg, res, g):
    value, ref, offsets, logits = res
    inputs = (ref, offsets, logits)
    g_ref_heads, g_off, g_logits = _kernels.grad_inputs(_SOURCE, shapes, value, g, inputs, cfg)
    g_value = _kernels.grad_value(_SOURCE, shapes, value, g, inputs, cfg)
    return g_value, g_ref_heads.sum(axis=2).astype(ref.dtype), g_off, g_logits


_fused.defvjp(_fused_fwd, _fused_bwd)


def ms_deform_attn_fused(
    value: jax.Array,
    spatial_shapes: Sequence[Tuple[int, int]],
    reference_points: jax.Array,
    offsets: jax.Array,
    logits: jax.Array,
    *,
    interpret: bool | None = None,
    block_q: int = 64,
    block_q_value: int = 8,
    mesh: Any = None,
    batch_axis: Any = None,
) -> jax.Array:
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
    cfg = Config(interpret=resolve_interpret(interpret), block_q=block_q,
                 block_q_value=block_q_value, mesh=mesh, batch_axis=batch_axis)
    return _fused(value, shapes, reference_points, offsets, logits, cfg)
