"""Multi-scale deformable attention sampling core as Pallas TPU (Mosaic) kernels: no gather.

Bilinear sampling is written as matrices (tent functions, see :mod:`jax_adapter.nn.msda_dense`):
on a level of ``H x W`` pixels, with ``px = x * W - 0.5``, column ``j`` gets the weight
``tx_j = max(0, 1 - |px - j|)`` (built from ``floor``: ``1 - fx`` at ``x0``, ``fx`` at ``x0 + 1``),
row ``i`` likewise ``ty_i``, and per (batch, head, level)::

    out[q] = sum_{i,j} A[q, i, j] V[i, j],      A[q, i, j] = sum_p a_p ty_p[i] tx_p[j].

The kernels build ``A`` for a block of queries in VMEM, a few rows at a time, and feed it to the
MXU; ``A`` never reaches HBM. The backward is matrix products as well (``dV = A^T g``,
``G = V g^T``) plus elementwise work for the location and weight gradients.

Layout (the "transposed" one: positions on sublanes, queries on lanes):

* Grid ``(B, M / G, Q / Tq)``: batch, head group, query block (innermost, sequential). ``G``
  heads share one block of lanes (``G * Dh`` a multiple of 128, e.g. two heads of 64 channels,
  or all ``M`` heads when no divisor fits), so ``value [B, S, M*Dh]`` (a free reshape) is read in
  ``[S, G*Dh]`` blocks and the output is written in ``[Tq, G*Dh]`` blocks of ``[B, Q, M*Dh]``:
  no transpose of ``value`` or of the output outside the kernel.
* The value block's index does not change along the query axis, so it is read from HBM once per
  (batch, head group). At the first query block the kernel copies it, row by row (static,
  possibly unaligned slices), into a padded VMEM layout: per level, chunks of ``R`` image rows,
  each row padded from ``W`` to ``Wp = roundup(W, 8)`` positions (``K = R * Wp <= 128``), so
  every image row starts on a sublane tile boundary. The forward keeps the chunks transposed,
  one ``[Dhp, K]`` slab per head (``Dhp``: ``Dh`` rounded up to whole sublane tiles, so that a
  head is a leading index whatever ``Dh`` is, and ``V_h^T A^T`` needs no transpose per step);
  the backward keeps them as ``[K, G*Dh]`` and selects a head by masking the cotangent's lanes.
* Per-query inputs are transposed outside the kernel (small arrays) to ``[.., P, Q]``: queries on
  lanes, so that a query block is a ``[P, Tq]`` tile and a row of tent weights is one vector.
* For a query block, head and level the kernel fills ``tx_p`` tables ``[Wp, Tq]`` (VMEM scratch)
  once; then for every chunk of rows that some point of the block touches (the band
  ``[min y0, max y0 + 1]``, a dynamic ``fori_loop``; chunks outside it are skipped) it forms
  ``A^T`` ``[K, Tq]`` as ``sum_p ty_p[i] * tx_p`` row by row (a broadcast row times a table: two
  vector ops per element and point) and runs one MXU product ``[Dhp, K] x [K, Tq]``.
* Backward, same grid: ``G^T = V g_h^T`` ``[K, Tq]`` (MXU), the location / weight gradients from
  it and the tent tables (elementwise; sums kept as ``[8, Tq]`` partials until the end of the
  level, so the inner loop has no cross-sublane reduction), and ``dV += A^T g_h`` into an
  f32 VMEM accumulator that is written back (un-padded, into ``[B, S, M*Dh]``) after the last
  query block of the (batch, head group).

Precision: bfloat16 ``value`` -> bfloat16 MXU operands (``A`` rounded to bfloat16) with float32
accumulation; float32 -> float32 operands at ``Precision.HIGHEST``; float64 only in interpret
mode. Locations, tents and gradients are computed in at least float32.

Kink convention (as the XLA core, which uses ``floor`` corners): ``d tx_j / d px`` is ``-1`` for
``px`` in ``[j, j+1)``, ``+1`` for ``px`` in ``[j-1, j)``, zero elsewhere; a location whose 2x2
support misses the map has no nonzero tent and gets zero gradients; non-finite locations are
parked at ``-4`` and contribute nothing.

Limits: a (batch, head group)'s whole ``value`` block and its padded copies live in VMEM
(``vmem_bytes``: about 1 MB per 1000 positions forward and 2 MB backward at ``G*Dh = 128`` in
bfloat16);
maps too large for that fail at compile time (``RESOURCE_EXHAUSTED ... vmem``), where the caller
should fall back. Non-finite entries of ``value`` reach every query whose band includes their
chunk of rows (``0 * nan``), whereas the XLA core reads only the corners it needs. The
``[B, S, M*Dh]`` view of ``value`` is free where the value comes from a projection (as in the
model); a standalone ``[B, S, M, Dh]`` array may be relaid out by XLA first.

This module imports nothing of the project (``tests/unit/test_layout.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Shapes = Tuple[Tuple[int, int], ...]

LANES = 128
SUBLANES = 8
# Positions per MXU product (the contraction length K = R * Wp): one 128-deep pass on v5e.
MAX_K = 128
DEFAULT_BLOCK_Q = 128
# Where non-finite and padding locations are parked (normalised units): off every map.
PARK = -4.0
# Scoped-VMEM ceiling asked of Mosaic (v5e / v6e have 128 MiB of VMEM per core).
VMEM_CAP = 100 << 20


def _roundup(n: int, k: int) -> int:
    return -(-n // k) * k


@dataclasses.dataclass(frozen=True)
class Level:
    """Static geometry of one level: ``h x w`` pixels at ``off`` in the flattened positions,
    stored in VMEM as ``chunks`` chunks of ``rows`` image rows of ``wp`` padded positions."""

    h: int
    w: int
    off: int
    wp: int
    rows: int
    chunks: int

    @property
    def k(self) -> int:
        """Positions per chunk (the MXU contraction length)."""
        return self.rows * self.wp


def make_levels(shapes: Shapes, max_k: int = MAX_K) -> Tuple[Level, ...]:
    """The VMEM geometry of every level: rows padded to multiples of 8 positions, as many rows
    per chunk as fit ``max_k`` positions (at least one)."""
    out, off = [], 0
    for h, w in shapes:
        wp = _roundup(w, SUBLANES)
        rows = max(1, min(h, max_k // wp))
        out.append(Level(h=h, w=w, off=off, wp=wp, rows=rows, chunks=-(-h // rows)))
        off += h * w
    return tuple(out)


def head_group(m: int, dh: int) -> int:
    """Heads per lane block: the smallest divisor ``G`` of ``M`` with ``G * Dh`` a multiple of 128,
    else all ``M`` heads (the block is then the full channel axis, which Mosaic also accepts)."""
    for g in range(1, m + 1):
        if m % g == 0 and (g * dh) % LANES == 0:
            return g
    return m


@dataclasses.dataclass(frozen=True)
class Config:
    """Static description of one call (hashable: it is a ``nondiff_argnum``)."""

    b: int
    s: int
    m: int
    dh: int
    q: int
    p: int
    levels: Tuple[Level, ...]
    group: int
    block_q: int
    value_dtype: Any
    cdt: Any  # geometry / tents / gradients dtype (at least float32)
    interpret: bool

    @property
    def ng(self) -> int:
        return self.m // self.group

    @property
    def dg(self) -> int:
        return self.group * self.dh

    @property
    def dh_pad(self) -> int:
        """Head width rounded up to whole (packed) sublane tiles of the MXU dtype."""
        return _roundup(self.dh, SUBLANES * max(1, 4 // jnp.dtype(self.mxu).itemsize))

    @property
    def qp(self) -> int:
        return _roundup(self.q, self.block_q)

    @property
    def nq(self) -> int:
        return self.qp // self.block_q

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def wp_max(self) -> int:
        return max(lv.wp for lv in self.levels)

    @property
    def s_pad(self) -> int:
        """Positions of the padded VMEM layout (all chunks of all levels)."""
        return sum(lv.chunks * lv.k for lv in self.levels)

    @property
    def acc(self):
        return jnp.promote_types(self.value_dtype, jnp.float32)

    @property
    def mxu(self):
        return jnp.dtype(jnp.bfloat16) if jnp.dtype(self.value_dtype) == jnp.bfloat16 else self.acc

    @property
    def precision(self):
        return lax.Precision.DEFAULT if self.mxu == jnp.bfloat16 else lax.Precision.HIGHEST


def _config(value, shapes: Shapes, q: int, p: int, cdt, interpret: bool, block_q) -> Config:
    b, s, m, dh = value.shape
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(f"spatial_shapes {shapes} do not add up to S={s}")
    if block_q is None:
        block_q = DEFAULT_BLOCK_Q if q > DEFAULT_BLOCK_Q else _roundup(q, SUBLANES)
    block_q = int(block_q)
    if block_q <= 0:
        raise ValueError(f"block_q must be positive, got {block_q}")
    if not interpret and block_q % LANES and block_q < q:
        raise ValueError(f"block_q must be a multiple of {LANES} (queries are lanes) or cover "
                         f"all {q} queries, got {block_q}")
    if jnp.dtype(value.dtype) == jnp.float64 and not interpret:
        raise ValueError("float64 runs in interpret mode only")
    return Config(b=b, s=s, m=m, dh=dh, q=q, p=p, levels=make_levels(shapes),
                  group=head_group(m, dh), block_q=block_q, value_dtype=jnp.dtype(value.dtype),
                  cdt=jnp.dtype(cdt), interpret=bool(interpret))


# ----------------------------------------------------------------------------- in-kernel pieces


def _chunk_rows(v_ref, lv: Level, c: int, dtype) -> jax.Array:
    """Chunk ``c`` of a level from the flat ``[S, Dg]`` value block: ``[K, Dg]``, every image row
    padded with zeros to ``Wp`` positions (rows past the map are zero too)."""
    dg = v_ref.shape[-1]
    parts = []
    for r in range(lv.rows):
        i = c * lv.rows + r
        if i < lv.h:
            parts.append(v_ref[pl.ds(lv.off + i * lv.w, lv.w), :].astype(dtype))
            if lv.wp > lv.w:
                parts.append(jnp.zeros((lv.wp - lv.w, dg), dtype))
        else:
            parts.append(jnp.zeros((lv.wp, dg), dtype))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


class _Geometry:
    """Floor corners of a level's points ``[P, Tq]`` and the band of chunks they touch."""

    def __init__(self, px, py, lv: Level):
        self.x0 = jnp.floor(px)
        self.fx = px - self.x0
        self.y0 = jnp.floor(py)
        self.fy = py - self.y0
        # The 2x2 support meets the map (else: no nonzero tent, zero gradient, not in the band).
        inside = ((self.x0 >= -1) & (self.x0 <= lv.w - 1) & (self.y0 >= -1) & (self.y0 <= lv.h - 1))
        inv = 1.0 / lv.rows
        # Chunk of the first / last row touched; +0.5 keeps floor() away from rounding edges.
        first = jnp.floor((jnp.clip(self.y0, 0, lv.h - 1) + 0.5) * inv)
        last = jnp.floor((jnp.clip(self.y0 + 1, 0, lv.h - 1) + 0.5) * inv)
        self.c_lo = jnp.min(jnp.where(inside, first, float(lv.chunks))).astype(jnp.int32)
        self.c_end = jnp.max(jnp.where(inside, last, -1.0)).astype(jnp.int32) + 1

    def row(self, i, cdt):
        """``ty`` and ``d ty / d py`` of image row ``i`` (a traced int), ``[P, Tq]`` each."""
        fi = i.astype(cdt)
        at0, at1 = self.y0 == fi, self.y0 + 1 == fi
        zero = jnp.zeros_like(self.fy)
        ty = jnp.where(at0, 1 - self.fy, jnp.where(at1, self.fy, zero))
        dty = jnp.where(at0, -1.0, jnp.where(at1, 1.0, zero)).astype(cdt)
        return ty, dty


def _fill_tables(tx_ref, dtx_ref, g: _Geometry, a, lv: Level, cdt):
    """``tx_ref[p, :Wp] = a_p * tx_p`` (``a`` None: plain ``tx_p``) and, if given,
    ``dtx_ref[p, :Wp] = d tx_p / d px``, all ``[Wp, Tq]``; zero on the padding columns."""
    n_p, tq = g.x0.shape
    jj = lax.broadcasted_iota(jnp.int32, (lv.wp, tq), 0).astype(cdt)
    col_ok = jj < lv.w
    zero = jnp.zeros((lv.wp, tq), cdt)
    for p in range(n_p):
        x0, fx = g.x0[p:p + 1], g.fx[p:p + 1]
        w0, w1 = 1 - fx, fx
        if a is not None:
            w0, w1 = w0 * a[p:p + 1], w1 * a[p:p + 1]
        e0 = (jj == x0) & col_ok
        e1 = (jj == x0 + 1) & col_ok
        tx_ref[p, pl.ds(0, lv.wp), :] = jnp.where(e0, w0, jnp.where(e1, w1, zero))
        if dtx_ref is not None:
            dtx_ref[p, pl.ds(0, lv.wp), :] = jnp.where(e0, -1.0, jnp.where(e1, 1.0, zero)).astype(cdt)


def _sum8(x: jax.Array) -> jax.Array:
    """``[Wp, Tq]`` -> ``[8, Tq]``: sums over whole sublane tiles only (vector adds). The
    8 -> 1 reduction inside a tile is left for the end of the level."""
    n = x.shape[0] // SUBLANES
    return x if n == 1 else x.reshape(n, SUBLANES, x.shape[1]).sum(axis=0)


def _rows_a(tx_ref, ty_p: List[jax.Array], lv: Level) -> jax.Array:
    """One image row of ``A^T``: ``sum_p ty_p * tx_ref[p]`` -> ``[Wp, Tq]``."""
    out = None
    for p, ty in enumerate(ty_p):
        term = ty * tx_ref[p, pl.ds(0, lv.wp), :]
        out = term if out is None else out + term
    return out


# ----------------------------------------------------------------------------- sources


class _Plain:
    """``loc [B, Q, M, L, P, 2]`` and ``attn [B, Q, M, L, P]`` as one ``[B, M, L, 3, P, Qp]``
    array (x, y, a; queries on lanes)."""

    n_in = 1

    @staticmethod
    def prepare(cfg: Config, loc, attn):
        x = jnp.concatenate([loc.astype(cfg.cdt), attn.astype(cfg.cdt)[..., None]], axis=-1)
        x = x.transpose(0, 2, 3, 5, 4, 1)  # [B, M, L, 3, P, Q]
        fill = jnp.asarray([PARK, PARK, 0.0], cfg.cdt)[:, None, None]
        pad = jnp.broadcast_to(fill, x.shape[:-1] + (cfg.qp - cfg.q,))
        return (jnp.concatenate([x, pad], axis=-1),)

    @staticmethod
    def in_specs(cfg: Config):
        return [pl.BlockSpec((None, cfg.group, cfg.n_levels, 3, cfg.p, cfg.block_q),
                             lambda b, g, q: (b, g, 0, 0, 0, q))]

    @staticmethod
    def in_block_bytes(cfg: Config, padded: bool = True) -> int:
        """Bytes of one input block (``padded``: as tiled in VMEM, P rounded up to 8)."""
        n_p = _roundup(cfg.p, SUBLANES) if padded else cfg.p
        return cfg.group * cfg.n_levels * 3 * n_p * cfg.block_q * cfg.cdt.itemsize

    @staticmethod
    def points(refs, h: int, cfg: Config):
        (q_ref,) = refs
        pts = []
        for l, lv in enumerate(cfg.levels):
            x, y, a = q_ref[h, l, 0], q_ref[h, l, 1], q_ref[h, l, 2]
            ok = jnp.isfinite(x) & jnp.isfinite(y)
            x, y = jnp.where(ok, x, PARK), jnp.where(ok, y, PARK)
            pts.append((x * lv.w - 0.5, y * lv.h - 0.5, a))
        return pts, None

    @staticmethod
    def grad_shapes(cfg: Config):
        return [jax.ShapeDtypeStruct((cfg.b, cfg.m, cfg.n_levels, 3, cfg.p, cfg.qp), cfg.cdt)]

    grad_specs = in_specs
    grad_block_bytes = in_block_bytes

    @staticmethod
    def init_grads(out_refs, cfg: Config):
        pass

    @staticmethod
    def write_grads(out_refs, h, grads, aux, cfg: Config):
        (gq_ref,) = out_refs
        for l, (lv, (gpx, gpy, ga)) in enumerate(zip(cfg.levels, grads)):
            gq_ref[h, l, 0] = gpx * lv.w  # d loc_x = d px * W
            gq_ref[h, l, 1] = gpy * lv.h
            gq_ref[h, l, 2] = ga

    @staticmethod
    def finish(cfg: Config, outs, loc, attn):
        (gq,) = outs
        gq = gq[..., :cfg.q].transpose(0, 5, 1, 2, 4, 3)  # [B, Q, M, L, P, 3]
        return gq[..., :2].astype(loc.dtype), gq[..., 2].astype(attn.dtype)


class _Fused:
    """``ref [B, Q, 2]`` -> ``[B, 2, Qp]``, ``offsets [B, Q, M, L, P, 2]`` -> ``[B, M, L, 2, P, Qp]``,
    ``logits [B, Q, M, L*P]`` -> ``[B, M, L*P, Qp]``; locations and softmax formed in-kernel."""

    n_in = 3

    @staticmethod
    def prepare(cfg: Config, ref, off, logits):
        padq = lambda x, fill: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, cfg.qp - cfg.q)],
                                       constant_values=fill)
        ref_t = padq(ref.astype(cfg.cdt).transpose(0, 2, 1), PARK)
        off_t = padq(off.astype(cfg.cdt).transpose(0, 2, 3, 5, 4, 1), 0.0)
        lg_t = padq(logits.astype(cfg.cdt).transpose(0, 2, 3, 1), 0.0)
        return ref_t, off_t, lg_t

    @staticmethod
    def in_specs(cfg: Config):
        lp = cfg.n_levels * cfg.p
        return [
            pl.BlockSpec((None, 2, cfg.block_q), lambda b, g, q: (b, 0, q)),
            pl.BlockSpec((None, cfg.group, cfg.n_levels, 2, cfg.p, cfg.block_q),
                         lambda b, g, q: (b, g, 0, 0, 0, q)),
            pl.BlockSpec((None, cfg.group, lp, cfg.block_q), lambda b, g, q: (b, g, 0, q)),
        ]

    @staticmethod
    def in_block_bytes(cfg: Config, padded: bool = True) -> int:
        """Bytes of one set of input blocks (``padded``: as tiled in VMEM)."""
        r = (lambda n: _roundup(n, SUBLANES)) if padded else (lambda n: n)
        rows = r(2) + cfg.group * cfg.n_levels * 2 * r(cfg.p) + cfg.group * r(cfg.n_levels * cfg.p)
        return rows * cfg.block_q * cfg.cdt.itemsize

    @staticmethod
    def points(refs, h: int, cfg: Config):
        ref_ref, off_ref, lg_ref = refs
        rx, ry = ref_ref[0:1, :], ref_ref[1:2, :]
        z = lg_ref[h]  # [L*P, Tq]: softmax over the sublanes
        e = jnp.exp(z - jnp.max(z, axis=0, keepdims=True))
        a_all = e / jnp.sum(e, axis=0, keepdims=True)
        pts = []
        for l, lv in enumerate(cfg.levels):
            # The XLA path's arithmetic, in its order: loc = ref + off / (W, H); px = loc*W - 0.5.
            x = rx + off_ref[h, l, 0] / float(lv.w)
            y = ry + off_ref[h, l, 1] / float(lv.h)
            ok = jnp.isfinite(x) & jnp.isfinite(y)
            x, y = jnp.where(ok, x, PARK), jnp.where(ok, y, PARK)
            pts.append((x * lv.w - 0.5, y * lv.h - 0.5, a_all[l * cfg.p:(l + 1) * cfg.p]))
        return pts, a_all

    @staticmethod
    def grad_shapes(cfg: Config):
        return [
            jax.ShapeDtypeStruct((cfg.b, cfg.ng, 2, cfg.qp), cfg.cdt),  # per head group, summed outside
            jax.ShapeDtypeStruct((cfg.b, cfg.m, cfg.n_levels, 2, cfg.p, cfg.qp), cfg.cdt),
            jax.ShapeDtypeStruct((cfg.b, cfg.m, cfg.n_levels * cfg.p, cfg.qp), cfg.cdt),
        ]

    @staticmethod
    def grad_specs(cfg: Config):
        specs = _Fused.in_specs(cfg)
        specs[0] = pl.BlockSpec((None, None, 2, cfg.block_q), lambda b, g, q: (b, g, 0, q))
        return specs

    grad_block_bytes = in_block_bytes

    @staticmethod
    def init_grads(out_refs, cfg: Config):
        gref_ref = out_refs[0]
        gref_ref[...] = jnp.zeros(gref_ref.shape, gref_ref.dtype)

    @staticmethod
    def write_grads(out_refs, h, grads, a_all, cfg: Config):
        gref_ref, goff_ref, glg_ref = out_refs
        sx = sy = None
        gas = []
        for l, (lv, (gpx, gpy, ga)) in enumerate(zip(cfg.levels, grads)):
            dlx, dly = gpx * lv.w, gpy * lv.h  # d loc
            goff_ref[h, l, 0] = dlx / float(lv.w)
            goff_ref[h, l, 1] = dly / float(lv.h)
            tx, ty = jnp.sum(dlx, axis=0, keepdims=True), jnp.sum(dly, axis=0, keepdims=True)
            sx = tx if sx is None else sx + tx
            sy = ty if sy is None else sy + ty
            gas.append(ga)
        ga_all = gas[0] if len(gas) == 1 else jnp.concatenate(gas, axis=0)
        # Softmax backward: dz = a * (ga - sum_k a_k ga_k).
        glg_ref[h] = a_all * (ga_all - jnp.sum(a_all * ga_all, axis=0, keepdims=True))
        # The reference point is shared by the heads: summed over the group here, over the
        # groups outside.
        gref_ref[0:1, :] += sx
        gref_ref[1:2, :] += sy

    @staticmethod
    def finish(cfg: Config, outs, ref, off, logits):
        gref, goff, glg = outs
        gref = gref.sum(axis=1)[..., :cfg.q].transpose(0, 2, 1)
        goff = goff[..., :cfg.q].transpose(0, 5, 1, 2, 4, 3)
        glg = glg[..., :cfg.q].transpose(0, 3, 1, 2)
        return gref.astype(ref.dtype), goff.astype(off.dtype), glg.astype(logits.dtype)


# ----------------------------------------------------------------------------- kernels


def _forward_kernel(cfg: Config, src, *refs):
    n_l = cfg.n_levels
    v_ref, q_refs = refs[0], refs[1:1 + src.n_in]
    out_ref = refs[1 + src.n_in]
    vt_refs = refs[2 + src.n_in:2 + src.n_in + n_l]
    tx_ref, out_t_ref = refs[2 + src.n_in + n_l:]
    cdt, acc, mxu = cfg.cdt, cfg.acc, cfg.mxu

    dh, dhp = cfg.dh, cfg.dh_pad

    @pl.when(pl.program_id(2) == 0)
    def _relayout():
        # Once per (batch, head group): padded, transposed chunks, one [Dhp, K] slab per head
        # (see module notes): a head is then a leading index, aligned whatever Dh is.
        for lv, vt_ref in zip(cfg.levels, vt_refs):
            for c in range(lv.chunks):
                chunk_t = _chunk_rows(v_ref, lv, c, mxu).T  # [Dg, K]
                for h in range(cfg.group):
                    slab = chunk_t[h * dh:(h + 1) * dh]
                    if dhp > dh:
                        slab = jnp.concatenate([slab, jnp.zeros((dhp - dh, lv.k), mxu)], axis=0)
                    vt_ref[c, h] = slab

    # A loop, not an unrolled sequence, over the heads of the group: the kernel's code (and the
    # interpreter's program) does not grow with G.
    @pl.loop(0, cfg.group)
    def _head(h):
        pts, _ = src.points(q_refs, h, cfg)
        acc_h = jnp.zeros((dhp, cfg.block_q), acc)
        for lv, vt_ref, (px, py, a) in zip(cfg.levels, vt_refs, pts):
            g = _Geometry(px, py, lv)
            _fill_tables(tx_ref, None, g, a, lv, cdt)

            def chunk(c, acc_h, lv=lv, vt_ref=vt_ref, g=g):
                segs = []
                for r in range(lv.rows):
                    ty, _ = g.row(c * lv.rows + r, cdt)
                    segs.append(_rows_a(tx_ref, [ty[p:p + 1] for p in range(cfg.p)], lv))
                at = segs[0] if len(segs) == 1 else jnp.concatenate(segs, axis=0)  # [K, Tq]
                # [Dhp, K] x [K, Tq]: the head's channels against this chunk's A^T.
                return acc_h + jnp.dot(vt_ref[c, h], at.astype(mxu), precision=cfg.precision,
                                       preferred_element_type=acc)

            acc_h = lax.fori_loop(g.c_lo, g.c_end, chunk, acc_h)
        out_t_ref[h] = acc_h

    heads = [out_t_ref[h, 0:dh, :] for h in range(cfg.group)]
    out_t = heads[0] if len(heads) == 1 else jnp.concatenate(heads, axis=0)  # [Dg, Tq]
    out_ref[...] = out_t.T.astype(out_ref.dtype)


def _backward_kernel(cfg: Config, src, *refs):
    n_l, n_in = cfg.n_levels, src.n_in
    v_ref, g_ref, q_refs = refs[0], refs[1], refs[2:2 + n_in]
    k = 2 + n_in
    dv_ref, gq_refs = refs[k], refs[k + 1:k + 1 + n_in]
    k += 1 + n_in
    vn_refs, dacc_refs = refs[k:k + n_l], refs[k + n_l:k + 2 * n_l]
    tx_ref, dtx_ref = refs[k + 2 * n_l:]
    cdt, acc, mxu = cfg.cdt, cfg.acc, cfg.mxu
    qb = pl.program_id(2)

    @pl.when(qb == 0)
    def _relayout():
        for lv, vn_ref, dacc_ref in zip(cfg.levels, vn_refs, dacc_refs):
            for c in range(lv.chunks):
                vn_ref[c] = _chunk_rows(v_ref, lv, c, mxu)
            dacc_ref[...] = jnp.zeros(dacc_ref.shape, dacc_ref.dtype)

    # Cotangent rows of padding queries (past Q in the last block) may hold anything: zero them.
    tq, dg = cfg.block_q, cfg.dg
    qrow = qb * tq + lax.broadcasted_iota(jnp.int32, (tq, dg), 0)
    gblk = jnp.where(qrow < cfg.q, g_ref[...].astype(acc), 0).astype(mxu)
    lane = lax.broadcasted_iota(jnp.int32, (tq, dg), 1)
    src.init_grads(gq_refs, cfg)

    @pl.loop(0, cfg.group)
    def _head(h):
        if cfg.group > 1:  # this head's channels only
            in_h = (lane >= h * cfg.dh) & (lane < (h + 1) * cfg.dh)
            g_h = jnp.where(in_h, gblk, jnp.zeros_like(gblk))
        else:
            g_h = gblk
        pts, aux = src.points(q_refs, h, cfg)
        grads = []
        for lv, vn_ref, dacc_ref, (px, py, a) in zip(cfg.levels, vn_refs, dacc_refs, pts):
            g = _Geometry(px, py, lv)
            _fill_tables(tx_ref, dtx_ref, g, None, lv, cdt)

            def chunk(c, carry, lv=lv, vn_ref=vn_ref, dacc_ref=dacc_ref, g=g, a=a):
                s_a, s_y, s_x = (list(x) for x in carry)  # per point p: [8, Tq] partial sums
                # G^T = V g_h^T: <g_q, V[position]> for every position of the chunk.
                gt = lax.dot_general(vn_ref[c], g_h, (((1,), (1,)), ((), ())),
                                     precision=cfg.precision, preferred_element_type=acc)
                segs = []
                for r in range(lv.rows):
                    ty, dty = g.row(c * lv.rows + r, cdt)
                    aty = a * ty
                    segs.append(_rows_a(tx_ref, [aty[p:p + 1] for p in range(cfg.p)], lv))
                    gt_r = gt[r * lv.wp:(r + 1) * lv.wp].astype(cdt)  # [Wp, Tq]
                    for p in range(cfg.p):
                        # sum_j G[i, j] tx_p[j] and sum_j G[i, j] dtx_p[j], per sublane.
                        sx = _sum8(gt_r * tx_ref[p, pl.ds(0, lv.wp), :])
                        sdx = _sum8(gt_r * dtx_ref[p, pl.ds(0, lv.wp), :])
                        s_a[p] = s_a[p] + ty[p:p + 1] * sx
                        s_y[p] = s_y[p] + dty[p:p + 1] * sx
                        s_x[p] = s_x[p] + ty[p:p + 1] * sdx
                at = segs[0] if len(segs) == 1 else jnp.concatenate(segs, axis=0)  # [K, Tq]
                dacc_ref[c] += jnp.dot(at.astype(mxu), g_h, precision=cfg.precision,
                                       preferred_element_type=acc)
                return tuple(s_a), tuple(s_y), tuple(s_x)

            zero = tuple(jnp.zeros((SUBLANES, tq), cdt) for _ in range(cfg.p))
            s_a, s_y, s_x = lax.fori_loop(g.c_lo, g.c_end, chunk, (zero, zero, zero))

            def cat(xs):  # per point [8, Tq] partial sums -> [P, Tq]
                xs = [jnp.sum(x, axis=0, keepdims=True) for x in xs]
                return xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=0)

            s_a, s_y, s_x = cat(s_a), cat(s_y), cat(s_x)
            grads.append((a * s_x, a * s_y, s_a))  # d px, d py, d a
        src.write_grads(gq_refs, h, grads, aux, cfg)

    @pl.when(qb == pl.num_programs(2) - 1)
    def _write_dv():
        for lv, dacc_ref in zip(cfg.levels, dacc_refs):
            for c in range(lv.chunks):
                for r in range(lv.rows):
                    i = c * lv.rows + r
                    if i < lv.h:
                        rows = dacc_ref[c, pl.ds(r * lv.wp, lv.w), :]
                        dv_ref[pl.ds(lv.off + i * lv.w, lv.w), :] = rows.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- calls


def _value_spec(cfg: Config):
    # Same block for every query block: fetched once per (batch, head group).
    return pl.BlockSpec((None, cfg.s, cfg.dg), lambda b, g, q: (b, 0, g))


def _tile_bytes(rows: int, cols: int, dtype) -> int:
    """VMEM bytes of a ``[rows, cols]`` tile (padded to (8 or 16, 128) tiles)."""
    dtype = jnp.dtype(dtype)
    sub = SUBLANES * max(1, 4 // dtype.itemsize)
    return _roundup(rows, sub) * _roundup(cols, LANES) * dtype.itemsize


def vmem_bytes(cfg: Config, src, backward: bool) -> int:
    """VMEM the kernel asks for: double-buffered blocks plus scratch."""
    vd, tq = cfg.value_dtype, cfg.block_q
    blocks = _tile_bytes(cfg.s, cfg.dg, vd) + src.in_block_bytes(cfg) + _tile_bytes(tq, cfg.dg, vd)
    tables = cfg.p * _tile_bytes(cfg.wp_max, tq, cfg.cdt)
    if not backward:
        chunks = sum(lv.chunks * cfg.group * _tile_bytes(cfg.dh_pad, lv.k, cfg.mxu) for lv in cfg.levels)
        return 2 * blocks + chunks + tables + cfg.group * _tile_bytes(cfg.dh_pad, tq, cfg.acc)
    blocks += _tile_bytes(cfg.s, cfg.dg, vd) + src.grad_block_bytes(cfg)  # dv and gradients
    chunks = sum(lv.chunks * (_tile_bytes(lv.k, cfg.dg, cfg.mxu) + _tile_bytes(lv.k, cfg.dg, cfg.acc))
                 for lv in cfg.levels)
    return 2 * blocks + chunks + 2 * tables


def _compiler_params(cfg: Config, src, backward: bool):
    need = vmem_bytes(cfg, src, backward)
    return pltpu.CompilerParams(
        # The query axis carries the VMEM copy of value (and the dV accumulator): sequential.
        dimension_semantics=("parallel", "parallel", "arbitrary"),
        vmem_limit_bytes=int(min(max(need * 5 // 4 + (4 << 20), 16 << 20), VMEM_CAP)),
    )


def costs(cfg: Config, src, backward: bool) -> Dict[str, float]:
    """FLOPs and HBM bytes of one kernel call, from its grid and block specs.

    ``mxu_flops``: the matrix products if every chunk of every level is active (an upper bound:
    chunks outside a query block's band are skipped at run time). ``vpu_flops``: the elementwise
    work per active chunk (tent rows times tables, and in the backward the gradient sums), same
    bound. ``hbm_bytes``: every block fetched or written (value and dV once per (batch, head
    group), the rest once per grid step).
    """
    steps = cfg.b * cfg.ng * cfg.nq
    tq, vsz = cfg.block_q, cfg.value_dtype.itemsize
    s_pad = cfg.s_pad
    # Forward: [Dhp, K] x [K, Tq] per chunk and head. Backward: G^T = V g_h^T and A^T g_h, both
    # over the group's G*Dh lanes (the other heads' lanes masked to zero, as issued to the MXU).
    per_head_mxu = 2 * cfg.dh_pad * s_pad * tq if not backward else 2 * 2 * cfg.dg * s_pad * tq
    # Per position and point: ty*tx + accumulate (2); backward adds two products and sums (4).
    per_head_vpu = (2 if not backward else 6) * cfg.p * s_pad * tq
    value = cfg.b * cfg.s * cfg.m * cfg.dh * vsz
    q_in = steps * src.in_block_bytes(cfg, padded=False)
    rows = cfg.b * cfg.nq * cfg.ng * tq * cfg.dg * vsz  # output or cotangent blocks
    hbm = value + q_in + rows
    if backward:
        hbm += value + steps * src.grad_block_bytes(cfg, padded=False)  # dV, gradients
    return {"grid_steps": steps, "mxu_flops": float(steps * cfg.group * per_head_mxu),
            "vpu_flops": float(steps * cfg.group * per_head_vpu), "hbm_bytes": float(hbm),
            "vmem_bytes": float(vmem_bytes(cfg, src, backward))}


def _cost_estimate(cfg: Config, src, backward: bool):
    c = costs(cfg, src, backward)
    trans = cfg.b * cfg.m * cfg.qp * cfg.n_levels * cfg.p if src is _Fused else 0
    return pl.CostEstimate(flops=int(c["mxu_flops"] + c["vpu_flops"]), transcendentals=int(trans),
                           bytes_accessed=int(c["hbm_bytes"]))


def _forward_call(cfg: Config, src, value, q_inputs):
    vt_scratch = [pltpu.VMEM((lv.chunks, cfg.group, cfg.dh_pad, lv.k), cfg.mxu) for lv in cfg.levels]
    out = pl.pallas_call(
        functools.partial(_forward_kernel, cfg, src),
        out_shape=jax.ShapeDtypeStruct((cfg.b, cfg.q, cfg.m * cfg.dh), cfg.value_dtype),
        grid=(cfg.b, cfg.ng, cfg.nq),
        in_specs=[_value_spec(cfg)] + src.in_specs(cfg),
        out_specs=pl.BlockSpec((None, cfg.block_q, cfg.dg), lambda b, g, q: (b, q, g)),
        scratch_shapes=vt_scratch + [pltpu.VMEM((cfg.p, cfg.wp_max, cfg.block_q), cfg.cdt),
                                     pltpu.VMEM((cfg.group, cfg.dh_pad, cfg.block_q), cfg.acc)],
        compiler_params=_compiler_params(cfg, src, False),
        cost_estimate=_cost_estimate(cfg, src, False),
        interpret=cfg.interpret,
        name="msda_tpu_forward",
    )(value.reshape(cfg.b, cfg.s, cfg.m * cfg.dh), *q_inputs)
    return out


def _backward_call(cfg: Config, src, value, g, q_inputs):
    scratch = ([pltpu.VMEM((lv.chunks, lv.k, cfg.dg), cfg.mxu) for lv in cfg.levels]
               + [pltpu.VMEM((lv.chunks, lv.k, cfg.dg), cfg.acc) for lv in cfg.levels]
               + [pltpu.VMEM((cfg.p, cfg.wp_max, cfg.block_q), cfg.cdt)] * 2)
    outs = pl.pallas_call(
        functools.partial(_backward_kernel, cfg, src),
        out_shape=[jax.ShapeDtypeStruct((cfg.b, cfg.s, cfg.m * cfg.dh), cfg.value_dtype)]
        + src.grad_shapes(cfg),
        grid=(cfg.b, cfg.ng, cfg.nq),
        in_specs=[_value_spec(cfg),
                  pl.BlockSpec((None, cfg.block_q, cfg.dg), lambda b, g, q: (b, q, g))]
        + src.in_specs(cfg),
        out_specs=[_value_spec(cfg)] + src.grad_specs(cfg),
        scratch_shapes=scratch,
        compiler_params=_compiler_params(cfg, src, True),
        cost_estimate=_cost_estimate(cfg, src, True),
        interpret=cfg.interpret,
        name="msda_tpu_backward",
    )(value.reshape(cfg.b, cfg.s, cfg.m * cfg.dh), g, *q_inputs)
    return outs[0].reshape(value.shape), outs[1:]


# ----------------------------------------------------------------------------- entry points


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _plain(cfg: Config, value, loc, attn):
    return _forward_call(cfg, _Plain, value, _Plain.prepare(cfg, loc, attn))


def _plain_fwd(cfg, value, loc, attn):
    return _plain(cfg, value, loc, attn), (value, loc, attn)


def _plain_bwd(cfg, res, g):
    value, loc, attn = res
    d_value, outs = _backward_call(cfg, _Plain, value, g.astype(value.dtype),
                                   _Plain.prepare(cfg, loc, attn))
    return (d_value,) + _Plain.finish(cfg, outs, loc, attn)


_plain.defvjp(_plain_fwd, _plain_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg: Config, value, ref, off, logits):
    return _forward_call(cfg, _Fused, value, _Fused.prepare(cfg, ref, off, logits))


def _fused_fwd(cfg, value, ref, off, logits):
    return _fused(cfg, value, ref, off, logits), (value, ref, off, logits)


def _fused_bwd(cfg, res, g):
    value, ref, off, logits = res
    d_value, outs = _backward_call(cfg, _Fused, value, g.astype(value.dtype),
                                   _Fused.prepare(cfg, ref, off, logits))
    return (d_value,) + _Fused.finish(cfg, outs, ref, off, logits)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _static_shapes(spatial_shapes) -> Shapes:
    return tuple((int(h), int(w)) for h, w in spatial_shapes)


def _cdt(*arrays):
    return functools.reduce(jnp.promote_types, [a.dtype for a in arrays], jnp.dtype(jnp.float32))


def ms_deform_attn_tpu(
    value: jax.Array,
    spatial_shapes: Sequence[Tuple[int, int]],
    loc: jax.Array,
    attn: jax.Array,
    *,
    interpret: bool = False,
    block_q: int | None = None,
) -> jax.Array:
    """Deformable-attention sampling core as Pallas TPU kernels (forward and backward).

    Args:
      value: ``[B, S, M, Dh]`` (bfloat16 or float32; float64 in interpret mode), levels flattened
        row-major and concatenated.
      spatial_shapes: static ``(H, W)`` per level.
      loc: ``[B, Q, M, L, P, 2]`` normalised (x, y); off-map or non-finite locations contribute
        zero (non-finite ones get zero gradients).
      attn: ``[B, Q, M, L, P]``.
      interpret: run the Pallas interpreter (any backend) instead of compiling with Mosaic.
      block_q: queries per grid step (lanes: a multiple of 128 when compiled, unless it covers
        all queries); ``None``: 128, or all queries when there are fewer.

    Returns:
      ``[B, Q, M*Dh]`` in ``value.dtype``. Reverse-mode differentiable in ``value``, ``loc`` and
      ``attn`` (``custom_vjp``; the backward is a Pallas kernel too).
    """
    shapes = _static_shapes(spatial_shapes)
    cfg = _config(value, shapes, loc.shape[1], loc.shape[4], _cdt(value, loc, attn), interpret, block_q)
    return _plain(cfg, value, loc, attn)


def ms_deform_attn_fused_tpu(
    value: jax.Array,
    spatial_shapes: Sequence[Tuple[int, int]],
    reference_points: jax.Array,
    offsets: jax.Array,
    logits: jax.Array,
    *,
    interpret: bool = False,
    block_q: int | None = None,
) -> jax.Array:
    """Sampling core with ``loc = ref + offsets / (W_l, H_l)`` and the softmax over ``L*P``
    formed in the kernels (float32 at least).

    Args:
      value: ``[B, S, M, Dh]``.
      spatial_shapes: static ``(H, W)`` per level.
      reference_points: ``[B, Q, 2]`` normalised (x, y), shared by all heads and levels.
      offsets: ``[B, Q, M, L, P, 2]`` in pixels of each level.
      logits: ``[B, Q, M, L*P]``.
      interpret, block_q: as for :func:`ms_deform_attn_tpu`.

    Returns:
      ``[B, Q, M*Dh]`` in ``value.dtype``; differentiable in all four arrays.
    """
    shapes = _static_shapes(spatial_shapes)
    cfg = _config(value, shapes, offsets.shape[1], offsets.shape[4],
                  _cdt(value, reference_points, offsets), interpret, block_q)
    return _fused(cfg, value, reference_points, offsets, logits)


def call_costs(value_shape, value_dtype, spatial_shapes, q: int, p: int, *, fused: bool = False,
               block_q: int | None = None, loc_dtype=jnp.float32) -> Dict[str, Dict[str, float]]:
    """:func:`costs` of the forward and backward kernels of one call signature (no tracing)."""
    value = jax.ShapeDtypeStruct(tuple(value_shape), value_dtype)
    cdt = jnp.promote_types(jnp.promote_types(value_dtype, loc_dtype), jnp.float32)
    cfg = _config(value, _static_shapes(spatial_shapes), q, p, cdt, False, block_q)
    src = _Fused if fused else _Plain
    return {"forward": costs(cfg, src, False), "backward": costs(cfg, src, True),
            "block_q": cfg.block_q, "head_group": cfg.group,
            "levels": [dataclasses.asdict(lv) for lv in cfg.levels]}
