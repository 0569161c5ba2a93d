"""Formulations of the adapter's depthwise conv and max-pool whose XLA:CPU backward is fast.

Same results as ``lax.conv_general_dilated`` / ``nnx.max_pool`` (up to float32 summation order),
NHWC. Measured on a 2-core CPU, forward+backward, the shapes of the ViT-S adapter at 256x704,
batch 2:

- ``depthwise_conv3x3`` (ConvFFN, 96 channels, the three SPM levels): XLA's grouped conv 29 ms,
  nine shifted multiply-adds (one fused loop each way) 2.7 ms.
- ``max_pool3x3s2`` (the stem's pool, 64 channels at 133x357): XLA's ``select_and_scatter``
  backward made it 108 ms, here 29 ms: the backward routes each cotangent to the first maximal
  tap of its window (PyTorch's choice) with nine strided pads.

``use_cpu_formulations()`` says whether the models take these paths (when compiling for a CPU:
on GPUs cuDNN's convolutions are the fast path, on TPUs XLA's).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jax_adapter import compilation


def use_cpu_formulations() -> bool:
    """Whether the current compilation target is a CPU (recorded under ``"conv_pool"``)."""
    cpu = compilation.current().platform == "cpu"
    compilation.record("conv_pool", "cpu_formulations" if cpu else "xla")
    return cpu


def depthwise_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """Depthwise 3x3 conv, stride 1, zero padding 1: ``x [B, H, W, C]``, ``kernel [3, 3, 1, C]``
    (Flax's HWIO with one input feature per group) -> ``[B, H, W, C]``.

    Accumulates in float32 at least, returns ``x.dtype``.
    """
    acc = jnp.promote_types(x.dtype, jnp.float32)
    h, w = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(acc)
    k = kernel.astype(acc)
    out = sum(xp[:, i:i + h, j:j + w] * k[i, j, 0] for i in range(3) for j in range(3))
    if bias is not None:
        out = out + bias.astype(acc)
    return out.astype(x.dtype)


def _pool_taps(x: jax.Array):
    """The nine stride-2 views of ``x`` padded with -inf: ``[B, ceil(H/2), ceil(W/2), C]`` each."""
    h, w = x.shape[1:3]
    oh, ow = -(-h // 2), -(-w // 2)
    # One -inf row/column before, enough after for the last window (2*oh + 1 rows in all).
    xp = jnp.pad(x, ((0, 0), (1, 2 * oh - h), (1, 2 * ow - w), (0, 0)),
                 constant_values=-jnp.inf)
    return [xp[:, i:i + 2 * oh:2, j:j + 2 * ow:2] for i in range(3) for j in range(3)]


@jax.custom_vjp
def max_pool3x3s2(x: jax.Array) -> jax.Array:
    """``nn.MaxPool2d(3, 2, 1)`` on ``[B, H, W, C]`` -> ``[B, ceil(H/2), ceil(W/2), C]``."""
    return functools.reduce(jnp.maximum, _pool_taps(x))


def _pool_fwd(x):
    taps = _pool_taps(x)
    out = functools.reduce(jnp.maximum, taps)
    # The first tap (row-major in the window) that holds the maximum receives the gradient.
    first = jnp.full(out.shape, 8, jnp.int8)
    for t in range(7, -1, -1):
        first = jnp.where(taps[t] == out, jnp.int8(t), first)
    return out, (first, x.shape)


def _pool_bwd(res, g):
    first, shape = res
    h, w = shape[1:3]
    oh, ow = g.shape[1:3]
    ph, pw = 2 * oh + 1, 2 * ow + 1
    zero = jnp.zeros((), g.dtype)
    dxp = 0
    for t in range(9):
        i, j = divmod(t, 3)
        part = jnp.where(first == t, g, zero)
        # Tap (i, j) of output (r, c) is padded-input pixel (2r + i, 2c + j): an interior pad.
        dxp = dxp + lax.pad(part, zero, ((0, 0, 0), (i, ph - i - (2 * oh - 1), 1),
                                         (j, pw - j - (2 * ow - 1), 1), (0, 0, 0)))
    return (dxp[:, 1:1 + h, 1:1 + w],)


max_pool3x3s2.defvjp(_pool_fwd, _pool_bwd)
