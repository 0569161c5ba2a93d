"""The three Pallas kernels of the sampling core, generic over where locations and weights come from.

A *source* (see :class:`Source`) gives the location and attention weight of one point of a head
for a block of queries (or one query), and writes the gradients of its inputs back. The plain
entry point reads them from memory; the fused one forms them from reference points, raw offsets
and logits.

Grid of every kernel: ``(B, M, ceil(Q / block))``; one program owns one batch item, one head and
a block of queries, and reads ``value[b, :, m, :]`` by computed rows. Every kernel walks the
``L*P`` points in one rolled loop (``lax.fori_loop`` -> ``scf.for``) whose body handles the four
corners of one point: the code stays short and nothing per point outlives its iteration. (Fully
unrolled over levels, points and corners, ptxas spilled up to 64 KB per thread; see
``benchmarks/results/kernel_report.md``.)

* forward: ``[block, C]`` tiles, four gathers per point, float32 (or wider) accumulation.
* location/weight gradients: the same gathers, dotted with the cotangent; no atomics (every
  location and weight belongs to exactly one program).
* value gradient: a scatter. The program walks its queries one at a time, with scalar rows, and
  adds each corner's contribution to ``(row, channel slice)`` with one atomic add: exact on GPU
  and in the interpreter alike (a vector atomic whose lanes repeat an address loses updates in
  the interpreter, and many queries do hit the same pixels).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jax.sharding import PartitionSpec

from ._common import (
    Config, Dims, Level, Shapes, compiler_params, compute_dtype, corners, level_of, load, query_block,
    store,
)


@dataclasses.dataclass
class Point:
    """Location ``x, y`` (normalised) and attention weight ``a`` of one point for every query of a
    program (``[n]``), or of one query (scalars)."""

    x: jax.Array
    y: jax.Array
    a: jax.Array


class Source(Protocol):
    """Where locations and weights come from. Its inputs all start with ``[B, Q]`` and reach the
    kernels as ``[B*Q, rest]`` views; ``rows`` addresses queries in them (a ``pl.ds`` block giving
    ``[n]`` results, or one scalar row giving scalars) and ``ok`` marks the queries that exist.

    The kernels walk the ``L*P`` points of a head in one rolled loop (flat index ``k = l*P + p``,
    a traced scalar): ``prepare`` runs once per program (or query) before the loop, ``point``
    once per point. Keeping every per-point quantity inside the loop body keeps the live ranges
    short; an unrolled loop over levels, points and corners made the compiled kernels spill.
    """

    n_in: int
    points_input: int  # which input is ``[B, Q, M, L, P, ...]`` (it gives Q and P)

    def grad_shapes(self, inputs: Sequence[jax.Array], d: Dims, cdt) -> tuple:
        """Shapes ``[B, Q, ...]`` and dtypes of the gradients the grad kernel produces."""

    def prepare(self, refs: Sequence, m, rows: Any, ok: jax.Array, d: Dims, cdt) -> Any:
        """Per-program state shared by the points of head ``m`` (e.g. softmax statistics)."""

    def point(self, refs: Sequence, st: Any, m, rows: Any, ok: jax.Array, k, lv: Level,
              d: Dims, cdt) -> Point:
        """Location and weight of point ``k`` of head ``m`` for the queries at ``rows``."""

    def grad_init(self, st: Any, ok: jax.Array, d: Dims, cdt) -> Any:
        """Loop carry of the gradient kernel (what must be reduced over the points)."""

    def grad_point(self, in_refs: Sequence, refs: Sequence, st: Any, m, rows: Any, ok: jax.Array, k, lv: Level,
                   pt: Point, gx, gy, ga, carry: Any, d: Dims) -> Any:
        """Store (or accumulate) the gradients of point ``k`` given those of its location
        ``gx, gy`` and weight ``ga`` (``[n]``); returns the new carry."""

    def grad_finish(self, in_refs: Sequence, refs: Sequence, st: Any, m, rows: Any, ok: jax.Array, carry: Any,
                    d: Dims, cdt) -> None:
        """Store what was reduced over the points."""


def dims(src: Source, value: jax.Array, inputs: Sequence[jax.Array], shapes: Shapes) -> Dims:
    """Static sizes of a call (from the local shapes under ``shard_map``)."""
    b, _, m, dh = value.shape
    pts = inputs[src.points_input]
    return Dims(b=b, q=pts.shape[1], m=m, dh=dh, shapes=shapes, p=pts.shape[4])


def _sample(src: Source, refs: Sequence, st: Any, m, rows: Any, ok: jax.Array, k, d: Dims, cdt):
    """Point ``k``'s level, location and weight, and its four bilinear corners."""
    lv = level_of(k, d, cdt)
    pt = src.point(refs, st, m, rows, ok, k, lv, d, cdt)
    return lv, pt, corners(pt.x, pt.y, lv)


def _grid(d: Dims, block: int):
    return (d.b, d.m, pl.cdiv(d.q, block))


def _flat(x: jax.Array) -> jax.Array:
    """``[B, Q or S, ...]`` -> ``[B*(Q or S), rest]`` (a free row-major reshape)."""
    return x.reshape(x.shape[0] * x.shape[1], -1)


def _channels(d: Dims):
    """Channel lanes ``[1, C]`` clamped to a real channel, and the real-channel mask."""
    col = lax.broadcasted_iota(jnp.int32, (1, d.c), 1)
    return jnp.minimum(col, d.dh - 1), col < d.dh


def _gather(v_ref, b, m, rows: jax.Array, ok: jax.Array, cc: jax.Array, cok: jax.Array, d: Dims, cdt):
    """``value[b, rows, m, :]`` as ``[n, C]`` from the ``[B*S, M*Dh]`` view; ``rows`` already
    clamped into their level, rows off the map and padded channels read 0."""
    return load(v_ref.at[b * d.s + rows[:, None], m * d.dh + cc], ok[:, None] & cok, cdt)


def _points(d: Dims, body: Callable, init):
    """``lax.fori_loop`` over the ``L*P`` points with an int32 index (also under x64)."""
    return lax.fori_loop(jnp.int32(0), jnp.int32(d.lp), body, init)


def _forward_kernel(v_ref, *refs, src: Source, d: Dims, block: int, cdt):
    *in_refs, o_ref = refs
    b, m = pl.program_id(0), pl.program_id(1)
    rows, qok = query_block(block, d)
    st = src.prepare(in_refs, m, rows, qok, d, cdt)
    cc, cok = _channels(d)

    def point(k, acc):
        _, pt, cn = _sample(src, in_refs, st, m, rows, qok, k, d, cdt)
        for i in range(2):
            for j in range(2):
                v = _gather(v_ref, b, m, cn.rows[i][j], cn.ok[i][j], cc, cok, d, cdt)
                acc = acc + (cn.weight(i, j) * pt.a)[:, None] * v
        return acc

    acc = _points(d, point, jnp.zeros((block, d.c), cdt))
    store(o_ref.at[rows, pl.ds(m * d.dh, d.c)], acc, qok[:, None] & cok)


def forward(src: Source, shapes: Shapes, value: jax.Array, inputs: Sequence[jax.Array],
            cfg: Config) -> jax.Array:
    """``value [B, S, M, Dh]`` + source inputs -> ``[B, Q, M*Dh]`` in ``value.dtype``."""

    def call(value, *inputs):
        d, cdt = dims(src, value, inputs, shapes), compute_dtype(value)
        kernel = functools.partial(_forward_kernel, src=src, d=d, block=cfg.block_q, cdt=cdt)
        out = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((d.b * d.q, d.m * d.dh), value.dtype),
            grid=_grid(d, cfg.block_q),
            interpret=cfg.interpret,
            compiler_params=compiler_params(cfg),
            name="msda_forward",
        )(_flat(value), *map(_flat, inputs))
        return out.reshape(d.b, d.q, d.m * d.dh)

    return _batch_sharded(call, cfg)(value, *inputs)


def _grad_inputs_kernel(v_ref, g_ref, *refs, src: Source, d: Dims, block: int, cdt):
    in_refs, out_refs = refs[:src.n_in], refs[src.n_in:]
    b, m = pl.program_id(0), pl.program_id(1)
    rows, qok = query_block(block, d)
    st = src.prepare(in_refs, m, rows, qok, d, cdt)
    cc, cok = _channels(d)
    go = load(g_ref.at[rows, pl.ds(m * d.dh, d.c)], qok[:, None] & cok, cdt)  # [block, C]

    def point(k, carry):
        lv, pt, cn = _sample(src, in_refs, st, m, rows, qok, k, d, cdt)
        # dot[i][j]: <cotangent, value at corner (i, j)>, zero for corners off the map.
        dot = [[None, None], [None, None]]
        for i in range(2):
            for j in range(2):
                v = _gather(v_ref, b, m, cn.rows[i][j], cn.ok[i][j], cc, cok, d, cdt)
                dot[i][j] = jnp.sum(go * v, axis=1)
        ga = sum(cn.weight(i, j) * dot[i][j] for i in range(2) for j in range(2))
        # d sample / d px = sum_i wy_i (v_i1 - v_i0); d px / d x = W (likewise for y).
        gpx = cn.wy[0] * (dot[0][1] - dot[0][0]) + cn.wy[1] * (dot[1][1] - dot[1][0])
        gpy = cn.wx[0] * (dot[1][0] - dot[0][0]) + cn.wx[1] * (dot[1][1] - dot[0][1])
        gx, gy = pt.a * (gpx * lv.wf), pt.a * (gpy * lv.hf)
        return src.grad_point(in_refs, out_refs, st, m, rows, qok, k, lv, pt, gx, gy, ga, carry, d)

    carry = _points(d, point, src.grad_init(st, qok, d, cdt))
    src.grad_finish(in_refs, out_refs, st, m, rows, qok, carry, d, cdt)


def grad_inputs(src: Source, shapes: Shapes, value: jax.Array, g: jax.Array,
                inputs: Sequence[jax.Array], cfg: Config) -> tuple:
    """Gradients of the source inputs (see ``src.grad_shapes``) for cotangent ``g [B, Q, M*Dh]``."""

    def call(value, g, *inputs):
        d, cdt = dims(src, value, inputs, shapes), compute_dtype(value)
        kernel = functools.partial(_grad_inputs_kernel, src=src, d=d, block=cfg.block_q_grad, cdt=cdt)
        full = src.grad_shapes(inputs, d, cdt)
        outs = pl.pallas_call(
            kernel,
            out_shape=tuple(jax.ShapeDtypeStruct((d.b * d.q, math.prod(s.shape[2:])), s.dtype) for s in full),
            grid=_grid(d, cfg.block_q_grad),
            interpret=cfg.interpret,
            compiler_params=compiler_params(cfg),
            name="msda_grad_inputs",
        )(_flat(value), _flat(g), *map(_flat, inputs))
        return tuple(o.reshape(s.shape) for o, s in zip(outs, full))

    return _batch_sharded(call, cfg)(value, g, *inputs)


def _grad_value_kernel(g_ref, *refs, src: Source, d: Dims, block: int, cdt, masked: bool):
    in_refs, gv_ref = refs[:src.n_in], refs[-1]  # refs[-2] is the zero buffer gv_ref aliases
    b, m = pl.program_id(0), pl.program_id(1)
    first = pl.program_id(2) * block
    chan = lax.broadcasted_iota(jnp.int32, (d.c,), 0) < d.dh

    def one_query(t, carry):
        q = first + t
        ok = q < d.q
        row = b * d.q + q
        st = src.prepare(in_refs, m, row, ok, d, cdt)  # scalars
        go = load(g_ref.at[row, pl.ds(m * d.dh, d.c)], ok & chan, cdt)  # [C]

        def point(k, carry):
            _, pt, cn = _sample(src, in_refs, st, m, row, ok, k, d, cdt)
            for i in range(2):
                for j in range(2):
                    wgt = jnp.where(ok, cn.weight(i, j) * pt.a, 0.0)
                    # The row is clamped into its level and the lanes span this head's padded
                    # channels: every address is in bounds, none repeats.
                    mask = jnp.broadcast_to(cn.ok[i][j] & ok, (d.c,)) if masked else None
                    pltriton.atomic_add(
                        gv_ref, (b * d.s + cn.rows[i][j], pl.ds(m * d.c, d.c)), go * wgt, mask=mask
                    )
            return carry

        return _points(d, point, carry)

    lax.fori_loop(jnp.int32(0), jnp.int32(block), one_query, jnp.int32(0))


def grad_value(src: Source, shapes: Shapes, value: jax.Array, g: jax.Array,
               inputs: Sequence[jax.Array], cfg: Config) -> jax.Array:
    """Value gradient ``[B, S, M, Dh]`` in ``value.dtype``.

    Accumulated by atomic adds in a zero-initialised ``[B*S, M*C]`` buffer of the compute dtype
    (GPU atomics take no bfloat16; the padded channels keep every lane inside its head).
    """

    def call(value, g, *inputs):
        d, cdt = dims(src, value, inputs, shapes), compute_dtype(value)
        kernel = functools.partial(
            _grad_value_kernel, src=src, d=d, block=cfg.block_q_value, cdt=cdt,
            # The interpreter rejects masked atomics; on GPU the mask skips adds of zeros, which
            # would otherwise pile up on the border pixels that off-map samples are clamped to.
            masked=not cfg.interpret,
        )
        zeros = jnp.zeros((d.b * d.s, d.m * d.c), cdt)
        acc = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct(zeros.shape, cdt),
            grid=_grid(d, cfg.block_q_value),
            input_output_aliases={1 + len(inputs): 0},
            interpret=cfg.interpret,
            compiler_params=compiler_params(cfg, value_kernel=True),
            name="msda_grad_value",
        )(_flat(g), *map(_flat, inputs), zeros)
        return acc.reshape(d.b, d.s, d.m, d.c)[..., : d.dh].astype(value.dtype)

    return _batch_sharded(call, cfg)(value, g, *inputs)


def _batch_sharded(fn: Callable, cfg: Config) -> Callable:
    """``fn`` itself, or ``fn`` under ``shard_map`` splitting every argument and result along
    axis 0 over ``cfg.batch_axis`` (each kernel then sees its local batch)."""
    if cfg.batch_axis is None:
        return fn
    spec = PartitionSpec(cfg.batch_axis)
    return jax.shard_map(fn, mesh=cfg.mesh, in_specs=spec, out_specs=spec, check_vma=False)


def differentiable(src: Source, finish: Callable[[tuple, tuple], tuple] = lambda grads, inputs: grads
                   ) -> Callable:
    """The sampling core of ``src`` as ``core(value, shapes, inputs, cfg) -> [B, Q, M*Dh]``,
    differentiable by a ``custom_vjp`` whose backward is the two gradient kernels (residuals:
    the inputs). ``finish(grads, inputs)`` turns the input-gradient kernel's outputs into the
    gradients of ``inputs`` (the fused source sums its per-head partial sums there)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1, 3))
    def core(value, shapes, inputs, cfg):
        return forward(src, shapes, value, inputs, cfg)

    def core_fwd(value, shapes, inputs, cfg):
        return core(value, shapes, inputs, cfg), (value, inputs)

    def core_bwd(shapes, cfg, res, g):
        value, inputs = res
        g_inputs = grad_inputs(src, shapes, value, g, inputs, cfg)
        g_value = grad_value(src, shapes, value, g, inputs, cfg)
        return g_value, tuple(finish(g_inputs, inputs))

    core.defvjp(core_fwd, core_bwd)
    return core
