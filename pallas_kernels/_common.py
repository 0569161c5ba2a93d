"""Shared pieces of the deformable-attention kernels: static geometry, bilinear corners, masked IO.

Every kernel in this package runs the same code compiled by Triton on GPU and interpreted on CPU.

Layout: every array reaches the kernels as a row-major 2-D view (free reshapes): ``value``
``[B*S, M*Dh]``, cotangent and output ``[B*Q, M*Dh]``, per-query inputs ``[B*Q, rest]``. Plain
2-D addressing keeps the interpreter's programs small and the GPU address arithmetic short.

Addresses:

* Contiguous blocks (a program's queries, a head's channels) are ``pl.ds`` slices masked at the
  tail: on GPU masked lanes touch no memory; the interpreter pads the array for the slice (and a
  masked store writes back what it read).
* Data-dependent gathers (value rows picked by the sampling locations): the row is clamped into
  its level AND the load masked (``other=0``).
* Atomic adds: the row is clamped and the contribution multiplied to zero where invalid; the
  interpreter cannot take a mask there (it is added on GPU only, to skip useless atomics).
  Each atomic add covers one row and a channel slice, so its lanes never share an address
  (the interpreter loses updates when they do).
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

Shapes = Tuple[Tuple[int, int], ...]


def resolve_interpret(interpret: bool | None) -> bool:
    """``None`` -> interpret unless JAX's default backend is a GPU (these kernels compile for
    GPUs only). Callers that compile for another target pass it explicitly (jax_adapter's
    dispatch does, from its compilation target)."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (Triton tensors need power-of-two sizes)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def static_shapes(spatial_shapes) -> Shapes:
    """Spatial shapes as a hashable tuple of ``(H, W)`` Python ints."""
    return tuple((int(h), int(w)) for h, w in spatial_shapes)


@dataclasses.dataclass(frozen=True)
class Dims:
    """Static sizes of one call. ``c`` is ``dh`` rounded up to a power of two (masked lanes)."""

    b: int
    q: int
    m: int
    dh: int
    shapes: Shapes
    p: int

    @property
    def c(self) -> int:
        return next_pow2(self.dh)

    @property
    def l(self) -> int:
        return len(self.shapes)

    @property
    def s(self) -> int:
        return sum(h * w for h, w in self.shapes)

    @property
    def lp(self) -> int:
        """Points per head (``L*P``); the kernels index them flat, ``k = l*P + p``: column
        ``m*L*P + k`` of a ``[B*Q, M*L*P]`` view, columns ``2*(m*L*P + k) + (0, 1)`` of a
        ``[B*Q, M*L*P*2]`` one."""
        return self.l * self.p

    @property
    def starts(self) -> Tuple[int, ...]:
        out, acc = [], 0
        for h, w in self.shapes:
            out.append(acc)
            acc += h * w
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static kernel configuration (hashable: used as a non-differentiable custom_vjp argument).

    ``block_q``: queries per program of the forward kernel, ``block_q_grad`` of the
    location/weight-gradient kernel (tiles ``[block, C]``); ``block_q_value``: queries per
    program of the value-gradient kernel, which walks its queries one at a time. Block sizes
    must be powers of two; :func:`default_config` picks them from the head width.
    ``batch_axis``: when set, every kernel runs under ``jax.shard_map`` over ``mesh`` (``None``:
    the mesh in context), split along the batch axis; Pallas calls are not partitioned
    automatically.
    """

    interpret: bool
    # Queries per program of each kernel.
    block_q: int = 32
    block_q_grad: int = 32
    block_q_value: int = 8
    # Triton's launch parameters.
    num_warps: int = 4
    num_warps_value: int = 1
    num_stages: int = 1
    # Data parallelism (see above).
    mesh: Any = None
    batch_axis: Any = None

    def __post_init__(self):
        for name in ("block_q", "block_q_grad", "block_q_value"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0 or v & (v - 1):
                raise ValueError(f"{name} must be a positive power of two, got {v!r}")


# Block sizes, chosen from the kernel report (ptxas for sm_90 and sm_80 at the ViT-S adapter's
# shapes and the DINOv3 head widths; benchmarks/results/kernel_report.md). A program's [block, C]
# tiles are spread over 4 warps (128 threads), and registers grow with the elements per thread:
# at C=64 (ViT-S, float32, injector) the forward uses 64 / 95 / 185 registers at block
# 16 / 32 / 64, the location/weight gradient 72 / 106 / 168 (the fused entry point: 72 / 114 /
# 198 forward, 92 / 141 / 255 gradient, as it also carries the softmax statistics and the
# gradients of all L*P weights). 128 registers is the most that fits 4 blocks of 4 warps per SM.
# So the tiles hold 2048 elements (16 per thread) in the plain forward and 1024 elsewhere; at
# the DINOv3 widths 2048-element fused tiles reached 141 registers (dh=12, block 128) and 168
# (dh=128 gradient, block 16), and 1024 keeps every kernel at or below 128.
TILES = {"forward": 2048, "grad": 1024, "fused_forward": 1024, "fused_grad": 1024}
MIN_BLOCK, MAX_BLOCK = 8, 128
# The value-gradient kernel walks its queries one at a time with single [C] rows on one warp
# (33-60 registers); 8 queries per program amortise the program start.
BLOCK_VALUE = 8


def default_block(dh: int, tile: int) -> int:
    """Queries per program for head width ``dh`` and ``tile`` elements per ``[block, C]`` tile,
    clipped to ``[MIN_BLOCK, MAX_BLOCK]``."""
    return min(MAX_BLOCK, max(MIN_BLOCK, tile // next_pow2(dh)))


def make_config(entry: str, dh: int, interpret: bool | None, block_q: int | None,
                block_q_value: int | None, mesh: Any, batch_axis: Any) -> Config:
    """Config of one call of ``entry`` (``"plain"`` or ``"fused"``); ``None`` block sizes take
    the defaults for head width ``dh`` (an explicit ``block_q`` applies to the forward and the
    location/weight-gradient kernels)."""
    if block_q is None:
        prefix = "fused_" if entry == "fused" else ""
        fwd, grad = (default_block(dh, TILES[prefix + k]) for k in ("forward", "grad"))
    else:
        fwd = grad = block_q
    return Config(interpret=resolve_interpret(interpret), block_q=fwd, block_q_grad=grad,
                  block_q_value=BLOCK_VALUE if block_q_value is None else block_q_value,
                  mesh=mesh, batch_axis=batch_axis)


def compute_dtype(value: jax.Array):
    """Accumulation dtype: float32, or wider when ``value`` is (float64 in the interpreter)."""
    return jnp.promote_types(value.dtype, jnp.float32)


def compiler_params(cfg: Config, value_kernel: bool = False) -> pltriton.CompilerParams:
    """Triton backend parameters (also selects the Triton backend: the default GPU backend,
    Mosaic GPU, cannot load by computed indices). The value-gradient kernel works on single
    ``[C]`` rows, so it gets its own, smaller, warp count."""
    warps = cfg.num_warps_value if value_kernel else cfg.num_warps
    return pltriton.CompilerParams(num_warps=warps, num_stages=cfg.num_stages)


def query_block(block: int, d: Dims):
    """This program's queries as rows of a ``[B*Q, ...]`` view: ``(pl.ds, in_range [block])``."""
    first = pl.program_id(2) * block
    ok = first + lax.broadcasted_iota(jnp.int32, (block,), 0) < d.q
    return pl.ds(pl.program_id(0) * d.q + first, block), ok


def at(ref, *idx):
    """``ref.at[idx]`` with Python ints made int32 scalars (the interpreter's slice path needs
    every non-slice index to be an array, and of one integer type)."""
    return ref.at[tuple(jnp.int32(i) if isinstance(i, int) else i for i in idx)]


def load(view, mask, dtype) -> jax.Array:
    """Masked load (lanes outside ``mask`` read 0) cast to the compute dtype."""
    mask = jnp.broadcast_to(mask, view.shape)
    return pltriton.load(view, mask=mask, other=0).astype(dtype)


def store(view, val: jax.Array, mask) -> None:
    """Masked store of ``val`` cast to the ref's dtype (see the module notes on addresses)."""
    mask = jnp.broadcast_to(mask, view.shape)
    pltriton.store(view, jnp.broadcast_to(val, view.shape).astype(view.dtype), mask=mask)


@dataclasses.dataclass
class Level:
    """Geometry of the level a point belongs to: ``h, w, start`` as int32 scalars (Python ints
    when there is one level) and ``hf, wf`` as compute-dtype scalars."""

    h: Any
    w: Any
    start: Any
    hf: Any
    wf: Any


def level_of(k, d: Dims, cdt) -> Level:
    """Level of flat point index ``k = l * P + p`` (a traced int32 scalar).

    The kernels walk all ``L*P`` points in one rolled loop, so the level's size is selected
    at run time from the static table (a few scalar selects per point) instead of unrolling
    the loop per level.
    """
    if d.l == 1:
        (h, w), = d.shapes
        return Level(h=h, w=w, start=0, hf=jnp.asarray(h, cdt), wf=jnp.asarray(w, cdt))
    lvl = k // d.p

    def pick(vals):
        out = jnp.int32(vals[-1])
        for i in range(d.l - 1):
            out = jnp.where(lvl == i, jnp.int32(vals[i]), out)
        return out

    h, w = pick([h for h, _ in d.shapes]), pick([w for _, w in d.shapes])
    return Level(h=h, w=w, start=pick(d.starts), hf=h.astype(cdt), wf=w.astype(cdt))


@dataclasses.dataclass
class Corners:
    """Bilinear footprint of ``n`` locations on one level.

    ``rows[i][j]``: int32 ``[n]`` (or scalar) row of corner (y0+i, x0+j) in the flattened S axis,
    clamped into the level; ``ok[i][j]``: whether that corner lies inside the map; ``wy[i]``,
    ``wx[j]``: the 1-D bilinear weights (not masked); ``weight(i, j)``: their product, zero where
    not ``ok``.
    """

    rows: List[List[jax.Array]]
    ok: List[List[jax.Array]]
    wy: List[jax.Array]
    wx: List[jax.Array]

    def weight(self, i: int, j: int) -> jax.Array:
        return jnp.where(self.ok[i][j], self.wy[i] * self.wx[j], 0.0)


def corners(x: jax.Array, y: jax.Array, lv: Level) -> Corners:
    """Corners of normalised locations ``x, y [n]`` (or scalars) on level ``lv``.

    Pixel-centre convention (``px = x*w - 0.5``). Non-finite locations are parked off the map and
    far ones clamped just outside it, so every derived quantity stays finite and the float->int
    conversion never sees an out-of-range value; both then have no valid corner.
    """
    h, w = lv.h, lv.w
    finite = jnp.isfinite(x) & jnp.isfinite(y)
    px = jnp.clip(jnp.where(finite, x * lv.wf - 0.5, -2.0), -2.0, lv.wf + 1.0)
    py = jnp.clip(jnp.where(finite, y * lv.hf - 0.5, -2.0), -2.0, lv.hf + 1.0)
    x0f = jnp.floor(px)
    y0f = jnp.floor(py)
    fx = px - x0f
    fy = py - y0f
    x0 = x0f.astype(jnp.int32)
    y0 = y0f.astype(jnp.int32)
    xs = (x0, x0 + 1)
    ys = (y0, y0 + 1)
    rows = [[None, None], [None, None]]
    ok = [[None, None], [None, None]]
    for i in range(2):
        yc = jnp.clip(ys[i], 0, h - 1)
        oky = (ys[i] >= 0) & (ys[i] < h)
        for j in range(2):
            xc = jnp.clip(xs[j], 0, w - 1)
            rows[i][j] = lv.start + yc * w + xc
            ok[i][j] = oky & (xs[j] >= 0) & (xs[j] < w)
    return Corners(rows=rows, ok=ok, wy=[1.0 - fy, fy], wx=[1.0 - fx, fx])
