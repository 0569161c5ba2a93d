"""Pure-XLA sampling core of multi-scale deformable attention.

The formulation is shaped by how XLA:CPU compiles gathers, reductions and scatters:

* ``value [B, S, M, Dh]`` is read as a table of ``B*S*M`` rows of ``Dh`` values, so every bilinear
  corner is one row gather from the original buffer (no transpose, no padded copy). Corners outside
  the map are clamped to a valid row and given weight zero.
* The work runs in a loop over the ``B*M`` (batch, head) pairs. One pair touches a single ``S x Dh``
  slice of ``value`` (and of its gradient), which stays in cache; walking the whole tensor for
  every corner is several times slower on CPU, mostly in cache misses. Results are written in
  place into the final layouts, so nothing is stacked and transposed afterwards.
* The forward of a pair is one fused kernel: the weighted sum over all ``L*P*4`` corners is
  written as a chain of elementwise terms, so XLA fuses the gathers into it and never
  materialises the ``[Q, L*P*4, Dh]`` samples (as ``einsum`` or ``sum`` would).
* The backward is a ``custom_vjp``. Autodiff of the gathers would materialise every gathered
  sample and every scatter update at once (hundreds of MB at the seed shapes). Instead, per pair:
  scatter-adds of ``weight * g`` rows into the value gradient, and the corner dot products
  ``<g, v_corner>``, from which the location and attention-weight gradients follow in closed
  form, as *variadic* reduces: XLA fuses those with their gathers, whereas a plain reduce goes to
  a library kernel that needs its input materialised.

On GPU a sequential loop of ``B*M`` small steps leaves the device mostly idle, and there is
no cache for the loop to be kind to. The ``"gpu"`` formulation (chosen by compilation target, see
:func:`default_formulation`) therefore runs the same per-pair code once over all ``B*Q*M``
(query, head) rows in ``[B, Q, M]`` order: one fused gather-and-sum for the forward, whose
result is already in the output layout, one scatter-add and one set of corner dot products for
the backward. Both formulations compute the same sums and are tested against each other.

Reverse-mode only: forward-mode AD (``jax.jvp``) of a ``custom_vjp`` is not supported.

Accumulation is in at least float32 (``value`` may be bfloat16).
"""

from __future__ import annotations

from functools import partial
from typing import List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_adapter import compilation
from jax_adapter.errors import ConfigError

Shapes = Tuple[Tuple[int, int], ...]

# Corner dot products reduced together in one variadic reduce: each reduce reads ``g`` once. On
# CPU the reduce over ``Dh`` compiles to scalar FMAs (a float sum is not reassociated), one row
# pointer per corner; at 16 corners the pointers no longer fit the 16 general registers of x86-64
# and spill (67 stack accesses in the kernel, 18 at 8): on a Zen 3 EPYC the extractor's
# forward+backward took 8-17% less time at 8. The GPU formulation keeps 16 (not measured there).
_DOT_GROUP = {"cpu": 8, "gpu": 16}

# Most bytes of ``weight * g`` updates per scatter-add in the CPU backward. XLA:CPU materialises a
# scatter's updates before scattering them; all corners of a pair at once are ``[Q, K, Dh]`` (16 MB
# in the extractor), one corner at a time costs a scatter op per corner (48 in the injector, and
# twice its compile time). Corners go in groups whose updates stay under this size: measured on a
# Zen 3 EPYC, 4 MB beat 16 MB, 8 MB, 2 MB and one corner per scatter.
_SCATTER_BYTES = 4 << 20

_IN_BOUNDS = lax.GatherScatterMode.PROMISE_IN_BOUNDS

FORMULATIONS = ("cpu", "gpu")


def default_formulation(platform: str | None = None) -> str:
    """``"gpu"`` for GPUs, ``"cpu"`` (the per-pair loop) elsewhere; ``platform``: the current
    compilation target's (:func:`jax_adapter.target`) by default."""
    platform = compilation.current().platform if platform is None else platform
    return "gpu" if platform in ("gpu", "cuda", "rocm") else "cpu"


def bilinear_corners(loc: jax.Array, h: int, w: int):
    """Corners and bilinear weights of normalised locations on an ``h x w`` map.

    ``loc [..., 2]`` (x, y in [0, 1], pixel-centre convention). Returns ``(idx, wts, fx, fy, valid)``:
    ``idx [..., 4]`` int32 row-major positions of the corners (y0,x0), (y0,x1), (y1,x0), (y1,x1),
    clamped into the map; ``wts [..., 4]`` their bilinear weights, zero for corners outside the map
    and for locations that are not finite or whose 2x2 support misses the map; the fractional
    offsets ``fx, fy [...]``; and ``valid [..., 4]`` (1 where the corner contributes, else 0).
    """
    finite = jnp.isfinite(loc).all(-1)
    # Non-finite locations would poison the arithmetic below; park them far outside the map.
    loc = jnp.where(finite[..., None], loc, -4.0)
    px = loc[..., 0] * w - 0.5
    py = loc[..., 1] * h - 0.5
    x0 = jnp.floor(px)
    y0 = jnp.floor(py)
    fx = px - x0
    fy = py - y0
    inside = finite & (x0 >= -1) & (x0 <= w - 1) & (y0 >= -1) & (y0 <= h - 1)
    xs = jnp.stack([x0, x0 + 1, x0, x0 + 1], -1)
    ys = jnp.stack([y0, y0, y0 + 1, y0 + 1], -1)
    ok = inside[..., None] & (xs >= 0) & (xs <= w - 1) & (ys >= 0) & (ys <= h - 1)
    # Clamp in float first: far-away (even 1e9) locations must not overflow the int cast.
    idx = (jnp.clip(ys, 0, h - 1) * w + jnp.clip(xs, 0, w - 1)).astype(jnp.int32)
    valid = ok.astype(fx.dtype)
    wts = jnp.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1) * valid
    return idx, wts, fx, fy, valid


def _plan(shapes: Shapes, value_shape, loc: jax.Array, attn: jax.Array, acc_dtype):
    """Rows and weights of every corner, laid out per (batch, head) pair.

    Returns ``rows, wts [B*M, Q, K]`` (``K = L*P*4``; rows index ``value`` viewed as
    ``[B*S*M, Dh]``; weights are bilinear times attention) and, per level, the
    ``(wts, fx, fy, valid)`` of :func:`bilinear_corners` in ``[B, M, Q, P(, 4)]`` layout.
    """
    b, s, m, _ = value_shape
    q = loc.shape[1]
    loc = loc.astype(jnp.promote_types(loc.dtype, jnp.float32)).transpose(0, 2, 1, 3, 4, 5)
    attn = attn.transpose(0, 2, 1, 3, 4).astype(acc_dtype)  # [B, M, Q, L, P]
    pair_row = (jnp.arange(b)[:, None] * (s * m) + jnp.arange(m)[None, :])[:, :, None, None, None]
    rows, wts, aux = [], [], []
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        idx, bil, fx, fy, valid = bilinear_corners(loc[:, :, :, lvl], h, w)  # [B, M, Q, P, 4]
        rows.append(pair_row + (idx + start) * m)
        wts.append(bil.astype(acc_dtype) * attn[:, :, :, lvl, :, None])
        aux.append((bil, fx, fy, valid))
        start += h * w
    rows = jnp.stack(rows, 3).reshape(b * m, q, -1)
    wts = jnp.stack(wts, 3).reshape(b * m, q, -1)
    return rows, wts, aux


def _gather_rows(table: jax.Array, rows: jax.Array) -> jax.Array:
    """``table [R, D]``, ``rows [...]`` -> ``[..., D]`` (rows are in range by construction)."""
    dnums = lax.GatherDimensionNumbers(
        offset_dims=(rows.ndim,), collapsed_slice_dims=(0,), start_index_map=(0,)
    )
    return lax.gather(
        table, rows[..., None], dnums, slice_sizes=(1, table.shape[1]), mode=_IN_BOUNDS
    )


def _pair_forward(table: jax.Array, rows: jax.Array, wts: jax.Array) -> jax.Array:
    """One pair: ``sum_k wts[:, k] * table[rows[:, k]]`` -> ``[Q, D]`` in ``wts.dtype``.

    Written as a chain of elementwise terms (not ``einsum``/``sum``) so that XLA fuses all the
    gathers into a single loop instead of materialising ``[Q, K, D]``.
    """
    out = None
    for k in range(rows.shape[1]):
        term = wts[:, k, None] * _gather_rows(table, rows[:, k]).astype(wts.dtype)
        out = term if out is None else out + term
    return out


def _pair_corner_dots(table: jax.Array, rows: jax.Array, g: jax.Array, group: int) -> jax.Array:
    """One pair: ``<g[q], table[rows[q, k]]>`` -> ``[Q, K]`` in ``g.dtype``, ``group`` corners
    per reduce.

    Variadic reduces keep the gathers fused into the reduction (see the module docstring).
    """
    zero = np.zeros((), g.dtype)
    dots: List[jax.Array] = []
    for k0 in range(0, rows.shape[1], group):
        ks = range(k0, min(k0 + group, rows.shape[1]))
        terms = tuple(g * _gather_rows(table, rows[:, k]).astype(g.dtype) for k in ks)
        dots.extend(lax.reduce(
            terms, (zero,) * len(terms), lambda a, b: tuple(x + y for x, y in zip(a, b)), (1,)
        ))
    return jnp.stack(dots, -1)


def _sample(value: jax.Array, shapes: Shapes, loc: jax.Array, attn: jax.Array,
            formulation: str) -> jax.Array:
    b, s, m, dh = value.shape
    q = loc.shape[1]
    acc_dtype = jnp.promote_types(value.dtype, jnp.float32)
    rows, wts, _ = _plan(shapes, value.shape, loc, attn, acc_dtype)
    table = value.reshape(b * s * m, dh)
    if formulation == "gpu":
        # All pairs at once, rows in [B, Q, M] order: the result is the output layout.
        out = _pair_forward(table, _bqm(rows, b, m), _bqm(wts, b, m))
        return out.astype(value.dtype).reshape(b, q, m * dh)

    def pair(i, out):
        o = _pair_forward(table, rows[i], wts[i]).astype(value.dtype)
        # Written in place into the final [B, Q, M, Dh] layout: no stacked copy to transpose.
        return lax.dynamic_update_slice(out, o[None, :, None, :], (i // m, 0, i % m, 0))

    out = lax.fori_loop(0, b * m, pair, jnp.zeros((b, q, m, dh), value.dtype))
    return out.reshape(b, q, m * dh)


def _bqm(x: jax.Array, b: int, m: int) -> jax.Array:
    """``[B*M, Q, K]`` per-pair plan -> ``[B*Q*M, K]`` rows in the ``[B, Q, M]`` order."""
    _, q, k = x.shape
    return x.reshape(b, m, q, k).transpose(0, 2, 1, 3).reshape(b * q * m, k)


@partial(jax.custom_vjp, nondiff_argnums=(1, 4))
def _ms_deform_attn(value: jax.Array, shapes: Shapes, loc: jax.Array, attn: jax.Array,
                    formulation: str) -> jax.Array:
    return _sample(value, shapes, loc, attn, formulation)


def _fwd(value, shapes, loc, attn, formulation):
    # Residuals are the inputs themselves: the corner plan is cheap to recompute.
    return _sample(value, shapes, loc, attn, formulation), (value, loc, attn)


def _bwd(shapes, formulation, res, g):
    value, loc, attn = res
    b, s, m, dh = value.shape
    q, n_l, n_p = loc.shape[1], loc.shape[3], loc.shape[4]
    acc_dtype = jnp.promote_types(value.dtype, jnp.float32)
    rows, wts, aux = _plan(shapes, value.shape, loc, attn, acc_dtype)
    table = value.reshape(b * s * m, dh)
    if formulation == "gpu":
        r, gq = _bqm(rows, b, m), g.reshape(b * q * m, dh).astype(acc_dtype)
        grad_table = jnp.zeros((b * s * m, dh), acc_dtype).at[r].add(
            _bqm(wts, b, m)[..., None] * gq[:, None, :], mode=_IN_BOUNDS)
        dots = _pair_corner_dots(table, r, gq, _DOT_GROUP["gpu"]).reshape(b, q, m, -1).transpose(0, 2, 1, 3)
    else:
        g = g.reshape(b, q, m, dh)
        per_scatter = max(1, _SCATTER_BYTES // (q * dh * np.dtype(acc_dtype).itemsize))

        def pair(i, carry):
            grad_table, dots = carry
            r = rows[i]
            gp = lax.dynamic_slice(g, (i // m, 0, i % m, 0), (1, q, 1, dh))
            gp = gp.reshape(q, dh).astype(acc_dtype)
            # Value gradient: scatter-adds of corner groups (see _SCATTER_BYTES); the rows stay
            # within the pair's slice of the gradient.
            w = wts[i]
            for k0 in range(0, r.shape[1], per_scatter):
                ks = slice(k0, k0 + per_scatter)
                grad_table = grad_table.at[r[:, ks]].add(w[:, ks, None] * gp[:, None, :], mode=_IN_BOUNDS)
            dots = dots.at[i].set(_pair_corner_dots(table, r, gp, _DOT_GROUP["cpu"]))
            return grad_table, dots

        grad_table, dots = lax.fori_loop(
            0, b * m, pair, (jnp.zeros((b * s * m, dh), acc_dtype), jnp.zeros(rows.shape, acc_dtype))
        )
    dots = dots.reshape(b, m, q, n_l, n_p, 4)
    attn_bm = attn.transpose(0, 2, 1, 3, 4)
    g_attn, g_loc = [], []
    for lvl, (h, w) in enumerate(shapes):
        bil, fx, fy, valid = aux[lvl]
        d = dots[:, :, :, lvl] * valid.astype(acc_dtype)  # corners outside the map read zeros
        g_attn.append(jnp.sum(bil * d, -1))
        # d/dfx and d/dfy of the bilinear interpolant, times d(fx)/dx = W and d(fy)/dy = H.
        dfx = (1 - fy) * (d[..., 1] - d[..., 0]) + fy * (d[..., 3] - d[..., 2])
        dfy = (1 - fx) * (d[..., 2] - d[..., 0]) + fx * (d[..., 3] - d[..., 1])
        a = attn_bm[:, :, :, lvl]
        g_loc.append(jnp.stack([a * dfx * w, a * dfy * h], -1))
    g_attn = jnp.stack(g_attn, 3).transpose(0, 2, 1, 3, 4).astype(attn.dtype)
    g_loc = jnp.stack(g_loc, 3).transpose(0, 2, 1, 3, 4, 5).astype(loc.dtype)
    return grad_table.reshape(value.shape).astype(value.dtype), g_loc, g_attn


_ms_deform_attn.defvjp(_fwd, _bwd)


def ms_deform_attn_xla(value: jax.Array, spatial_shapes: Sequence[Tuple[int, int]], sampling_locations: jax.Array,
                       attention_weights: jax.Array, formulation: str | None = None) -> jax.Array:
    """Pure-XLA sampling core; see :func:`jax_adapter.nn.msda.ms_deform_attn` (inputs unchecked).

    ``formulation``: ``"cpu"`` (a loop over the (batch, head) pairs) or ``"gpu"`` (all pairs at
    once); ``None`` picks by the default backend (:func:`default_formulation`).
    Differentiable in reverse mode (``custom_vjp``); forward-mode AD is not supported.
    """
    formulation = default_formulation() if formulation is None else formulation
    if formulation not in FORMULATIONS:
        raise ConfigError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    return _ms_deform_attn(value, shapes, sampling_locations, attention_weights, formulation)


def sampling_inputs(
    spatial_shapes: Shapes,
    reference_points: jax.Array,
    offsets: jax.Array,
    logits: jax.Array,
) -> Tuple[jax.Array, jax.Array]:
    """Locations and softmaxed weights from reference points, raw offsets and raw logits.

    ``reference_points [B, Q, 2]`` (x, y), ``offsets [B, Q, M, L, P, 2]`` in pixels of each
    level, ``logits [B, Q, M, L*P]`` -> ``([B, Q, M, L, P, 2], [B, Q, M, L, P])``. The softmax
    runs in float32 at least.
    """
    b, q, m, n_l, n_p, _ = offsets.shape
    normaliser = jnp.asarray([(w, h) for h, w in spatial_shapes], jnp.float32)
    loc = reference_points[:, :, None, None, None, :] + offsets / normaliser[None, None, None, :, None, :]
    wdtype = jnp.promote_types(logits.dtype, jnp.float32)
    attn = jax.nn.softmax(logits.astype(wdtype), axis=-1).reshape(b, q, m, n_l, n_p)
    return loc, attn
