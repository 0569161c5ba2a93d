"""Small building blocks shared by the trunk and the adapter, with PyTorch semantics.

Leaf names follow Flax (``kernel``, ``scale``, ``bias``, ``mean``, ``var``); module paths follow
the PyTorch ``state_dict`` so that checkpoint conversion is a table (see ``convert.keys``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, PyTorch's default; ``jax.nn.gelu`` defaults to the tanh form."""
    return jax.nn.gelu(x, approximate=False)


def layer_norm(dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6) -> nnx.LayerNorm:
    # Two-pass variance, as PyTorch computes it.
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)


def linear(din: int, dout: int, *, rngs: nnx.Rngs, std: float = 0.02) -> nnx.Linear:
    """Linear layer with the ViT init (truncated normal, std 0.02, zero bias)."""
    return nnx.Linear(din, dout, kernel_init=nnx.initializers.truncated_normal(std), rngs=rngs)


def conv(
    din: int, dout: int, kernel: int, *, stride: int = 1, padding: int = 0, groups: int = 1,
    bias: bool = True, rngs: nnx.Rngs,
) -> nnx.Conv:
    """NHWC conv with PyTorch's symmetric integer padding and a fan-out normal init."""
    fan_out = kernel * kernel * dout // groups
    return nnx.Conv(
        din, dout, (kernel, kernel), strides=stride, padding=((padding, padding), (padding, padding)),
        feature_group_count=groups, use_bias=bias,
        kernel_init=nnx.initializers.normal((2.0 / fan_out) ** 0.5), rngs=rngs,
    )


class ReLU(nnx.Module):
    """Parameter-free stand-in so that ``nn.Sequential`` indices survive in module paths."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class MaxPool3x3s2(nnx.Module):
    """``nn.MaxPool2d(3, 2, 1)``: padding counts as -inf; ``n -> ceil(n / 2)``."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def run_sequential(layers: Sequence[nnx.Module], x: jax.Array) -> jax.Array:
    for layer in layers:
        x = layer(x)
    return x


class BatchNorm2d(nnx.Module):
    """``nn.BatchNorm2d`` on NHWC maps, with PyTorch's running-statistics rule.

    Training normalises with the biased batch variance but updates ``var`` with the unbiased
    one (n / (n - 1)), which ``nnx.BatchNorm`` does not. Statistics are taken over all of the
    batch, height and width axes of the (possibly sharded) global array, so a data-parallel
    jit gets SyncBatchNorm semantics. ``momentum`` is PyTorch's (weight of the new batch).
    """

    def __init__(self, dim: int, *, eps: float = 1e-5, momentum: float = 0.1,
                 use_running_average: bool = True):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((dim,), jnp.float32))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.eps = eps
        self.momentum = momentum
        self.use_running_average = use_running_average

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            mean = xf.mean(axes)
            var = jnp.square(xf - mean).mean(axes)
            n = xf.size // xf.shape[-1]
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
            self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
            self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


class ConvTranspose2x2(nnx.Module):
    """``nn.ConvTranspose2d(din, dout, kernel_size=2, stride=2)``: ``[B,h,w,din] -> [B,2h,2w,dout]``.

    With stride equal to kernel size every output pixel has exactly one source pixel, so the op
    is one matmul and a pixel shuffle. ``kernel`` is ``[2, 2, din, dout]`` (PyTorch: ``[din,
    dout, 2, 2]``).
    """

    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
        std = (2.0 / (4 * dout)) ** 0.5
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (2, 2, din, dout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        k = self.kernel[...].astype(x.dtype)
        y = jnp.einsum("bhwc,ijco->bhiwjo", x, k)
        return y.reshape(b, 2 * h, 2 * w, -1) + self.bias[...].astype(x.dtype)


def drop_path(rate: float, *, rngs: nnx.Rngs) -> nnx.Dropout:
    """Stochastic depth on ``[B, N, C]`` residual branches: one keep/drop draw per sample."""
    # A rate of 0 needs no random stream (and so adds no RNG state to checkpoints).
    return nnx.Dropout(rate, broadcast_dims=(1, 2), deterministic=True, rngs=rngs if rate > 0 else None)
