"""PyTorch-exact resizes as static interpolation matrices.

Sizes are static, so each resize is two small matrices built once in numpy (float64) from
PyTorch's own index and weight formulas. This reproduces ``F.interpolate`` to float rounding
(``jax.image.resize`` differs from it by up to 0.9 for bicubic) and is differentiable. Two
formulations apply them, chosen from the compilation target:

- ``"matmul"`` (accelerators): dense products with ``einsum``, for the MXU / tensor cores; no
  gather.
- ``"taps"`` (CPU): each matrix row has at most a few nonzeros (2 bilinear, 4 bicubic), so an
  axis is resized as a sum over taps of ``take(x, index) * weight`` with static indices, and the
  backward applies the transposed matrix the same way (a ``custom_vjp``: gathers, no
  scatter-add). On CPU the dense product is a poorly shaped matmul (contraction 51, the channels
  not minor): resizing a ``[1, 19, 51, 384]`` ViT map to 67x179 took 9.3 ms against 0.5 ms this
  way (PyTorch's kernel: 3.4 ms).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_adapter import compilation
from jax_adapter.errors import ConfigError, InputError


# How the pretraining position grid is resized to the token grid (docs/SPEC.md section 6).
POS_RESIZE_MODES = (
    "bicubic_size",  # size-based bicubic, no antialias: the DinoAdapter, Hugging Face Dinov2Model
    "bicubic_scale_offset",  # scale factor (grid + offset) / M, no antialias: hub models without registers
    "bicubic_size_antialias",  # size-based bicubic with antialias: hub and HF register models
)

def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _source_scale(n_in: int, n_out: int, scale_factor: Optional[float]) -> float:
    # PyTorch maps output pixel i to input coordinate scale*(i+0.5)-0.5 with scale = 1/factor
    # when a scale factor was given, else in/out.
    return 1.0 / scale_factor if scale_factor is not None else n_in / n_out


@functools.lru_cache(maxsize=512)
def interp_matrix(
    n_in: int, n_out: int, mode: str, scale_factor: Optional[float] = None, antialias: bool = False
) -> np.ndarray:
    """``[n_out, n_in]`` float64 matrix of one axis of ``F.interpolate(align_corners=False)``.

    ``mode`` is ``"bicubic"`` or ``"bilinear"``.
    """
    scale = _source_scale(n_in, n_out, scale_factor)
    m = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    if antialias:
        if mode != "bicubic":
            raise ConfigError("antialias is implemented for bicubic only")
        # PyTorch's antialiased kernels: a=-0.5 cubic, support widened by the scale when
        # downsampling, taps truncated at the borders and renormalised.
        support = 2.0 * scale if scale >= 1.0 else 2.0
        inv = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(n_out):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            taps = np.arange(lo, hi)
            w = _cubic((taps - center + 0.5) * inv, -0.5)
            m[i, taps] = w / w.sum()
        return m
    # PyTorch does this index arithmetic in float32 for float32 inputs; matching it matters
    # at the 1e-5 level for large grids.
    f32 = np.float32
    src = (f32(scale) * (rows.astype(f32) + f32(0.5)) - f32(0.5)).astype(np.float64)
    if mode == "bicubic":
        x0 = np.floor(src).astype(np.int64)
        t = (src.astype(f32) - x0.astype(f32)).astype(np.float64)
        for k in range(-1, 3):
            w = _cubic(t - k, -0.75)
            np.add.at(m, (rows, np.clip(x0 + k, 0, n_in - 1)), w)
    elif mode == "bilinear":
        src = np.maximum(src, 0.0)
        x0 = np.floor(src).astype(np.int64)
        x1 = np.minimum(x0 + 1, n_in - 1)
        t = (src.astype(f32) - x0.astype(f32)).astype(np.float64)
        np.add.at(m, (rows, x0), 1 - t)
        np.add.at(m, (rows, x1), t)
    else:
        raise ConfigError(f"unknown interpolation mode {mode!r}")
    return m


def resize_nhwc(
    x: jax.Array,
    size: Tuple[int, int],
    mode: str,
    *,
    scale_factor: Optional[Tuple[float, float]] = None,
    antialias: bool = False,
) -> jax.Array:
    """``F.interpolate`` on an NHWC array ``[B, H, W, C] -> [B, size[0], size[1], C]``."""
    _, h, w, _ = x.shape
    if (h, w) == tuple(size) and scale_factor is None:
        return x
    sf = scale_factor or (None, None)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    key_h = (h, size[0], mode, sf[0], antialias)
    key_w = (w, size[1], mode, sf[1], antialias)
    if compilation.record("resize", choose_formulation(compilation.current().platform)) == "taps":
        y = _resize_axis(_resize_axis(x.astype(dtype), 1, key_h), 2, key_w)
        return y.astype(x.dtype)
    mh, mw = interp_matrix(*key_h), interp_matrix(*key_w)
    y = jnp.einsum("oh,bhwc->bowc", jnp.asarray(mh, dtype), x.astype(dtype),
                   precision=jax.lax.Precision.HIGHEST)
    y = jnp.einsum("pw,bowc->bopc", jnp.asarray(mw, dtype), y, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def choose_formulation(platform: str) -> str:
    """``"taps"`` when compiling for a CPU, ``"matmul"`` otherwise (see the module docstring)."""
    return "taps" if platform == "cpu" else "matmul"


@functools.lru_cache(maxsize=512)
def matrix_taps(m_key: tuple, transpose: bool) -> Tuple[np.ndarray, np.ndarray]:
    """The nonzeros of ``interp_matrix(*m_key)`` (or of its transpose), row by row:
    ``index [n_rows, k]`` and float64 ``weight [n_rows, k]``, ``k`` the most nonzeros in a row;
    shorter rows are padded with index 0 and weight 0."""
    m = interp_matrix(*m_key)
    m = m.T if transpose else m
    nz = [np.flatnonzero(row) for row in m]
    k = max(1, max(len(c) for c in nz))
    index = np.zeros((m.shape[0], k), np.int32)
    weight = np.zeros((m.shape[0], k))
    for i, cols in enumerate(nz):
        index[i, :len(cols)] = cols
        weight[i, :len(cols)] = m[i, cols]
    return index, weight


def _apply_taps(x: jax.Array, axis: int, m_key: tuple, transpose: bool) -> jax.Array:
    """``M @ x`` along ``axis`` (``M^T`` if ``transpose``) as a sum over the taps of each row."""
    index, weight = matrix_taps(m_key, transpose)
    shape = [1] * x.ndim
    shape[axis] = index.shape[0]
    out = None
    for t in range(index.shape[1]):
        # Indices in range by construction: "clip" (folded away on constant indices) spares
        # the bounds select of the default "fill".
        taken = jnp.take(x, index[:, t], axis=axis, mode="clip", indices_are_sorted=True)
        term = taken * jnp.asarray(weight[:, t].reshape(shape), x.dtype)
        out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _resize_axis(x: jax.Array, axis: int, m_key: tuple) -> jax.Array:
    return _apply_taps(x, axis, m_key, False)


def _resize_axis_fwd(x, axis, m_key):
    return _apply_taps(x, axis, m_key, False), None


def _resize_axis_bwd(axis, m_key, _, g):
    return (_apply_taps(g, axis, m_key, True),)


_resize_axis.defvjp(_resize_axis_fwd, _resize_axis_bwd)


def resize_pos_embed(
    pos: jax.Array, grid: Tuple[int, int], mode: str, *, offset: float = 0.1
) -> jax.Array:
    """Resize a square pretraining position grid ``[1, M*M, D]`` to ``grid`` -> ``[1, Hg*Wg, D]``.

    ``mode`` is one of :data:`POS_RESIZE_MODES`.
    """
    n, d = pos.shape[1], pos.shape[2]
    m = math.isqrt(n)
    if m * m != n:
        raise InputError(f"position embedding has {n} positions, not a square grid")
    if tuple(grid) == (m, m):
        return pos  # every source model skips the resize at the pretraining grid
    x = pos.reshape(1, m, m, d)
    if mode == "bicubic_size":
        y = resize_nhwc(x, grid, "bicubic")
    elif mode == "bicubic_size_antialias":
        y = resize_nhwc(x, grid, "bicubic", antialias=True)
    elif mode == "bicubic_scale_offset":
        # DINOv2 hub models pass scale_factor=(grid + offset) / M so that float rounding of
        # the output size cannot drop a row; the coordinate map then uses 1 / that factor.
        sf = ((grid[0] + offset) / m, (grid[1] + offset) / m)
        y = resize_nhwc(x, grid, "bicubic", scale_factor=sf)
    else:
        raise ConfigError(f"unknown position-embedding resize mode {mode!r}")
    return y.reshape(1, grid[0] * grid[1], d)
