"""Validation and padding of NHWC image batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_adapter.errors import InputError


def check_images(images) -> None:
    """Raise ``ValueError`` unless ``images`` is a floating ``[B, H, W, 3]`` batch."""
    shape = getattr(images, "shape", None)
    dtype = getattr(images, "dtype", None)
    if shape is None or dtype is None:
        raise InputError(f"images must be an array [B, H, W, 3], got {type(images).__name__}")
    if len(shape) != 4:
        raise InputError(f"images must be [B, H, W, 3] (NHWC), got rank {len(shape)} shape {tuple(shape)}")
    if shape[-1] != 3:
        hint = " (NCHW? transpose to NHWC)" if shape[1] == 3 else ""
        raise InputError(f"images must have 3 channels last, got shape {tuple(shape)}{hint}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise InputError(
            f"images must be floating point and already normalised, got dtype {np.dtype(dtype).name}"
        )
    if shape[0] == 0:
        raise InputError("images batch is empty")


def pad_bottom_right(images: jax.Array, padded: tuple) -> jax.Array:
    """Zero-pad ``[B, H, W, C]`` at the bottom and right to ``padded = (Hp, Wp)``."""
    _, h, w, _ = images.shape
    if (h, w) == tuple(padded):
        return images
    return jnp.pad(images, ((0, 0), (0, padded[0] - h), (0, padded[1] - w), (0, 0)))
