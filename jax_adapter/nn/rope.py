"""Axial rotary position embedding (RoPE) on a patch grid, as in DINOv3.

Each head's ``Dh`` channels form ``Dh / 2`` rotated pairs ``(i, i + Dh/2)`` (the half-split
layout): the first ``Dh / 4`` pairs turn with the patch's y coordinate, the next ``Dh / 4`` with
its x coordinate, pair ``j`` of each axis with period ``periods[j]``. Coordinates are patch
centres scaled to ``(-1, 1)``, so the encoding is relative to the image, not to the patch count.
Tables and the rotation are float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_adapter.errors import ConfigError, InputError

NORMALIZE_COORDS = ("separate", "min", "max")


def rope_periods(head_dim: int, *, base: Optional[float] = None, min_period: Optional[float] = None,
                 max_period: Optional[float] = None) -> np.ndarray:
    """The ``[head_dim // 4]`` float32 periods, from ``base`` or from ``min_period``/``max_period``.

    ``base``: ``base ** (4 j / head_dim)``; min/max: geometric from ``min_period`` to
    ``max_period``. Exactly one of the two parametrisations must be given (``ValueError``).
    """
    both = min_period is not None and max_period is not None
    if (base is None) == (not both):
        raise ConfigError("RoPE periods need either base or both min_period and max_period, not both or neither")
    if head_dim % 4:
        raise ConfigError(f"RoPE head dim {head_dim} is not a multiple of 4")
    n = head_dim // 4
    if base is not None:
        periods = float(base) ** (2.0 * np.arange(n, dtype=np.float64) / (head_dim // 2))
    else:
        ratio = float(max_period) / float(min_period)
        periods = float(max_period) * ratio ** (np.linspace(0.0, 1.0, n) - 1.0)
    return periods.astype(np.float32)


def rope_coords(grid: Tuple[int, int], normalize: str) -> jax.Array:
    """Patch-centre coordinates ``[Hg * Wg, 2]`` float32 (y, x), row-major, mapped to ``2c - 1``."""
    h, w = grid
    if normalize == "separate":
        dh, dw = h, w
    elif normalize == "max":
        dh = dw = max(h, w)
    elif normalize == "min":
        dh = dw = min(h, w)
    else:
        raise ConfigError(f"normalize must be one of {NORMALIZE_COORDS}, got {normalize!r}")
    ch = jnp.arange(0.5, h, dtype=jnp.float32) / dh
    cw = jnp.arange(0.5, w, dtype=jnp.float32) / dw
    coords = jnp.stack(jnp.meshgrid(ch, cw, indexing="ij"), axis=-1).reshape(h * w, 2)
    return 2.0 * coords - 1.0


def augment_coords(coords: jax.Array, key: jax.Array, *, shift: Optional[float] = None,
                   jitter: Optional[float] = None, rescale: Optional[float] = None) -> jax.Array:
    """Training-time coordinate noise, in this order: add ``U(-shift, shift)`` per axis, scale by
    ``exp(U(-ln jitter, ln jitter))`` per axis, scale both axes by ``exp(U(-ln rescale, ln rescale))``."""
    k_shift, k_jitter, k_rescale = jax.random.split(key, 3)
    if shift is not None:
        coords = coords + jax.random.uniform(k_shift, (2,), jnp.float32, -shift, shift)
    if jitter is not None:
        m = math.log(jitter)
        coords = coords * jnp.exp(jax.random.uniform(k_jitter, (2,), jnp.float32, -m, m))
    if rescale is not None:
        m = math.log(rescale)
        coords = coords * jnp.exp(jax.random.uniform(k_rescale, (1,), jnp.float32, -m, m))
    return coords


def rope_tables(coords: jax.Array, periods: np.ndarray) -> Tuple[jax.Array, jax.Array]:
    """``(sin, cos)``, each ``[N, 4 * len(periods)]`` float32, from ``coords [N, 2]``.

    Columns are ``[y-angles | x-angles | y-angles | x-angles]``, matching the half-split rotation.
    """
    angles = 2.0 * math.pi * coords[:, :, None] / jnp.asarray(periods, jnp.float32)[None, None, :]
    angles = angles.reshape(coords.shape[0], -1)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.sin(angles), jnp.cos(angles)


def rotate_half(x: jax.Array) -> jax.Array:
    """``[x1 | x2] -> [-x2 | x1]`` over the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate the last ``N`` tokens of ``x [B, T, heads, Dh]`` by ``sin, cos [N, Dh]``.

    The ``T - N`` leading (prefix) tokens pass through unchanged. The rotation runs in float32 and
    the result has ``x``'s dtype.
    """
    prefix = x.shape[1] - sin.shape[0]
    if prefix < 0:
        raise InputError(f"RoPE table has {sin.shape[0]} positions but the sequence only {x.shape[1]} tokens")
    head, tail = x[:, :prefix], x[:, prefix:]
    t = tail.astype(jnp.float32)
    s, c = sin[None, :, None, :], cos[None, :, None, :]
    t = (t * c + rotate_half(t) * s).astype(x.dtype)
    return jnp.concatenate([head, t], axis=1)
