"""Gather-free XLA sampling core of multi-scale deformable attention: bilinear sampling as a matrix.

Why: bilinear sampling at data-dependent locations is a gather, and a TPU does gathers worst of
all (the XLA core :mod:`jax_adapter.nn.msda_xla`, compiled for TPU, is a loop of about a hundred
gathers and a scatter). The same sums can be written as matrix products, which a TPU does best.

Formulation (tent functions). On a level of ``H x W`` pixels, ``px = x * W - 0.5`` (pixel-centre
convention, ``grid_sample(align_corners=False)``). Column ``j`` receives the weight
``tx_j = max(0, 1 - |px - j|)``, row ``i`` likewise ``ty_i``; the bilinear sample is
``sum_{i,j} ty_i tx_j V[i, j]``, and corners outside the map simply have no column or row, which
is the zero padding. Summed over the points of a query (attention weights ``a_p``)::

    A[q, i, j] = sum_p a_p ty_p[i] tx_p[j]        out[q] = sum_{i,j} A[q, i, j] V[i, j]

per level, (batch, head). The forward is elementwise work to build ``A`` (an ``einsum`` over the
points) and one matrix product; the backward is matrix products too: ``dV = A^T g`` and
``dA = g V^T``, from which the gradients of ``a_p``, ``ty_p`` and ``tx_p`` follow (the VJP of the
``A`` construction), and then of the locations.

Kinks: the tents are built from ``x0 = floor(px)`` and ``fx = px - x0`` exactly as the XLA core's
corners are (``tx_{x0} = 1 - fx``, ``tx_{x0+1} = fx``), so values agree bit for bit in the
weights and the derivative follows the same floor convention: ``d tx_j / d px`` is ``-1`` for
``px`` in ``[j, j+1)``, ``+1`` for ``px`` in ``[j-1, j)``, zero elsewhere. A location whose 2x2
support misses the map has no column or row of nonzero weight and therefore a zero gradient,
which is the XLA core's ``inside`` test. Non-finite locations are parked at ``-4`` (as in the XLA
core): they contribute zero and get zero gradients.

Cost: ``A`` has ``Q * S`` entries per (batch, head). Materialised whole it is what costs (tens of
GFLOP and GB at the seed shapes), so this module walks the queries in chunks (``lax.map`` /
``lax.scan``) and bounds ``A`` to :data:`A_CHUNK_BYTES` per chunk. A kernel that keeps ``A`` in
on-chip memory (:mod:`jax_adapter.pallas_kernels.tpu`) is the fast version; this module is its
reference and the portable fallback.

Backward: a ``custom_vjp`` whose residuals are the inputs; each chunk recomputes its ``A``.

Precision: accumulation in float32 (float64 for float64 ``value``). For a bfloat16 ``value`` the
products take bfloat16 operands (``A`` rounded to bfloat16) with float32 accumulation, which is
what the matrix units do fast; float32 uses ``Precision.HIGHEST``.

Non-finite entries of ``value`` reach every query of their (batch, head, level) through
``0 * nan`` (the XLA core reads only the corners it needs).

Reverse-mode only: forward-mode AD (``jax.jvp``) of a ``custom_vjp`` is not supported.
"""

from __future__ import annotations

from functools import partial
from typing import List, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from jax_adapter.errors import ConfigError
from jax_adapter.nn.msda_xla import sampling_inputs

Shapes = Tuple[Tuple[int, int], ...]

# Upper bound on one chunk's A ([B, M, chunk, S] in the accumulation dtype). The backward holds
# about three such arrays at once (A, dA and the tents' cotangents).
A_CHUNK_BYTES = 1 << 24


def _dtypes(value_dtype) -> Tuple[jnp.dtype, jnp.dtype, lax.Precision]:
    """``(accumulation dtype, matrix-product operand dtype, precision)`` for a value dtype."""
    acc = jnp.promote_types(value_dtype, jnp.float32)
    if jnp.dtype(value_dtype) == jnp.bfloat16:
        return acc, jnp.dtype(jnp.bfloat16), lax.Precision.DEFAULT
    return acc, acc, lax.Precision.HIGHEST


def default_chunk(b: int, m: int, s: int, q: int, itemsize: int = 4) -> int:
    """Queries per chunk so that one chunk's ``A`` stays within :data:`A_CHUNK_BYTES`
    (a multiple of 8, at least 8, at most ``Q`` rounded up to 8)."""
    per_query = max(b * m * s * itemsize, 1)
    chunk = max(8, (A_CHUNK_BYTES // per_query) // 8 * 8)
    return min(chunk, -(-q // 8) * 8)


def tents(p: jax.Array, n: int) -> jax.Array:
    """Tent weights ``[..., n]`` of pixel coordinates ``p [...]`` (already ``x * W - 0.5``).

    Built from ``floor`` like the XLA core's corners, so that autodiff gives its kink
    convention (``floor`` has a zero derivative; ``d fx / d p = 1``).
    """
    p0 = jnp.floor(p)
    f = (p - p0)[..., None]
    j = jnp.arange(n, dtype=p.dtype)
    p0 = p0[..., None]
    return jnp.where(j == p0, 1 - f, jnp.where(j == p0 + 1, f, jnp.zeros_like(f)))


def sampling_matrices(shapes: Shapes, loc: jax.Array, attn: jax.Array, dtype) -> List[jax.Array]:
    """Per level the sampling matrix ``A_l [B, M, Qc, H*W]`` in ``dtype``.

    ``loc [B, M, Qc, L, P, 2]`` and ``attn [B, M, Qc, L, P]`` are in (batch, head)-major layout.
    Differentiable (the backward takes its VJP); non-finite locations are parked at ``-4``.
    """
    loc = loc.astype(jnp.promote_types(loc.dtype, dtype))
    finite = jnp.isfinite(loc).all(-1, keepdims=True)
    loc = jnp.where(finite, loc, -4.0)
    attn = attn.astype(dtype)
    out = []
    for lvl, (h, w) in enumerate(shapes):
        tx = tents(loc[..., lvl, :, 0] * w - 0.5, w).astype(dtype)  # [B, M, Qc, P, W]
        ty = tents(loc[..., lvl, :, 1] * h - 0.5, h).astype(dtype)  # [B, M, Qc, P, H]
        a_ty = attn[..., lvl, :, None] * ty
        # A contraction over the P points: no [.., P, H, W] intermediate.
        a = jnp.einsum("bmqpi,bmqpj->bmqij", a_ty, tx, precision=lax.Precision.HIGHEST)
        out.append(a.reshape(a.shape[:3] + (h * w,)))
    return out


def _levels(shapes: Shapes) -> List[Tuple[int, int]]:
    """``(start, size)`` of every level along the flattened position axis."""
    out, start = [], 0
    for h, w in shapes:
        out.append((start, h * w))
        start += h * w
    return out


def _chunked(x: jax.Array, chunk: int, fill) -> jax.Array:
    """``[B, Q, M, ...]`` -> ``[Q/chunk, B, M, chunk, ...]`` (queries padded with ``fill``)."""
    b, q, m = x.shape[:3]
    n = -(-q // chunk)
    x = jnp.pad(x, [(0, 0), (0, n * chunk - q)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    x = x.reshape((b, n, chunk, m) + x.shape[3:])
    return jnp.moveaxis(x, (1, 3), (0, 2))


def _unchunked(x: jax.Array, q: int) -> jax.Array:
    """Inverse of :func:`_chunked` (drops the padding)."""
    n, b, m, chunk = x.shape[:4]
    x = jnp.moveaxis(x, (0, 2), (1, 3)).reshape((b, n * chunk, m) + x.shape[4:])
    return x[:, :q]


def _forward(value: jax.Array, shapes: Shapes, loc: jax.Array, attn: jax.Array,
             chunk: int) -> jax.Array:
    b, _, m, dh = value.shape
    q = loc.shape[1]
    acc, op, prec = _dtypes(value.dtype)
    vt = value.transpose(0, 2, 1, 3).astype(op)  # [B, M, S, Dh]: one copy, shared by all chunks
    levels = _levels(shapes)

    def one(args):
        loc_c, attn_c = args
        mats = sampling_matrices(shapes, loc_c, attn_c, acc)
        out = None
        for (start, size), a in zip(levels, mats):
            term = jnp.einsum("bmqs,bmsd->bmqd", a.astype(op), vt[:, :, start:start + size],
                              precision=prec, preferred_element_type=acc)
            out = term if out is None else out + term
        return out.astype(value.dtype)

    # Padded queries sit far outside every map (weight zero) and are dropped afterwards.
    out = lax.map(one, (_chunked(loc, chunk, -4.0), _chunked(attn, chunk, 0)))
    return _unchunked(out, q).reshape(b, q, m * dh)


@partial(jax.custom_vjp, nondiff_argnums=(1, 4))
def _dense(value, shapes, loc, attn, chunk):
    return _forward(value, shapes, loc, attn, chunk)


def _dense_fwd(value, shapes, loc, attn, chunk):
    # Residuals are the inputs: every chunk's A is rebuilt in the backward.
    return _forward(value, shapes, loc, attn, chunk), (value, loc, attn)


def _dense_bwd(shapes, chunk, res, g):
    value, loc, attn = res
    b, s, m, dh = value.shape
    q = loc.shape[1]
    acc, op, prec = _dtypes(value.dtype)
    vt = value.transpose(0, 2, 1, 3).astype(op)
    levels = _levels(shapes)
    g = g.reshape(b, q, m, dh)

    def one(d_vt, args):
        loc_c, attn_c, g_c = args
        mats, vjp = jax.vjp(lambda l, a: sampling_matrices(shapes, l, a, acc), loc_c, attn_c)
        g_op = g_c.astype(op)
        d_mats, d_parts = [], []
        for (start, size), a in zip(levels, mats):
            # dA = g V^T and dV = A^T g: the two products of the backward.
            d_mats.append(jnp.einsum("bmqd,bmsd->bmqs", g_op, vt[:, :, start:start + size],
                                     precision=prec, preferred_element_type=acc))
            d_parts.append(jnp.einsum("bmqs,bmqd->bmsd", a.astype(op), g_op,
                                      precision=prec, preferred_element_type=acc))
        d_loc, d_attn = vjp(d_mats)
        return d_vt + jnp.concatenate(d_parts, axis=2), (d_loc, d_attn)

    xs = (_chunked(loc, chunk, -4.0), _chunked(attn, chunk, 0), _chunked(g, chunk, 0))
    d_vt, (d_loc, d_attn) = lax.scan(one, jnp.zeros((b, m, s, dh), acc), xs)
    d_value = d_vt.transpose(0, 2, 1, 3).astype(value.dtype)
    return d_value, _unchunked(d_loc, q).astype(loc.dtype), _unchunked(d_attn, q).astype(attn.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def _static(spatial_shapes) -> Shapes:
    return tuple((int(h), int(w)) for h, w in spatial_shapes)


def _resolve_chunk(chunk: int | None, value: jax.Array, q: int) -> int:
    b, s, m, _ = value.shape
    if chunk is None:
        return default_chunk(b, m, s, q, jnp.dtype(jnp.promote_types(value.dtype, jnp.float32)).itemsize)
    if int(chunk) <= 0:
        raise ConfigError(f"chunk must be a positive number of queries, got {chunk!r}")
    return int(chunk)


def ms_deform_attn_dense(
    value: jax.Array,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
    *,
    chunk: int | None = None,
) -> jax.Array:
    """Gather-free sampling core; the semantics of :func:`jax_adapter.nn.msda.ms_deform_attn`.

    Args:
      value: ``[B, S, M, Dh]``, levels flattened row-major and concatenated (``S = sum H*W``).
      spatial_shapes: static ``(H, W)`` per level.
      sampling_locations: ``[B, Q, M, L, P, 2]``, (x, y) normalised to [0, 1] (may lie outside;
        non-finite locations contribute zero and get zero gradients).
      attention_weights: ``[B, Q, M, L, P]``.
      chunk: queries per chunk (``None``: :func:`default_chunk`, which bounds ``A``).

    Returns:
      ``[B, Q, M*Dh]`` in ``value.dtype``. Inputs are not checked (the public entry points in
      :mod:`jax_adapter.nn.msda` check them). Reverse-mode differentiable (``custom_vjp``).
    """
    shapes = _static(spatial_shapes)
    chunk = _resolve_chunk(chunk, value, sampling_locations.shape[1])
    return _dense(value, shapes, sampling_locations, attention_weights, chunk)


def ms_deform_attn_dense_fused(
    value: jax.Array,
    spatial_shapes: Sequence[Tuple[int, int]],
    reference_points: jax.Array,
    offsets: jax.Array,
    logits: jax.Array,
    *,
    chunk: int | None = None,
) -> jax.Array:
    """:func:`ms_deform_attn_dense` from raw projections: ``loc = ref + offsets / (W_l, H_l)``
    and a float32 softmax over the ``L*P`` logits (:func:`jax_adapter.nn.msda_xla.sampling_inputs`).

    Args:
      value: ``[B, S, M, Dh]``.
      spatial_shapes: static ``(H, W)`` per level.
      reference_points: ``[B, Q, 2]``; offsets: ``[B, Q, M, L, P, 2]`` (pixels of each level);
        logits: ``[B, Q, M, L*P]``.
      chunk: as for :func:`ms_deform_attn_dense`.

    Returns:
      ``[B, Q, M*Dh]`` in ``value.dtype``; differentiable in all four arrays (autodiff of the
      location and softmax arithmetic around the core's ``custom_vjp``).
    """
    shapes = _static(spatial_shapes)
    loc, attn = sampling_inputs(shapes, reference_points, offsets, logits)
    return ms_deform_attn_dense(value, shapes, loc, attn, chunk=chunk)
