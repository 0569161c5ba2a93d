"""Small building blocks shared by the trunk and the adapter, with PyTorch semantics.

Leaf names follow Flax (``kernel``, ``scale``, ``bias``, ``mean``, ``var``); module paths follow
the PyTorch ``state_dict`` so that checkpoint conversion is a table (see ``convert.keys``).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jax_adapter import compilation
from jax_adapter.nn import conv as conv_ops
from jax_adapter.nn.conv import max_pool3x3s2, use_cpu_formulations

# A dtype or its name ("float32", "bfloat16"); ``None`` means "infer from the inputs".
DType = Any


def as_dtype(dtype: Optional[DType]):
    """``jnp.dtype`` of a name or dtype; ``None`` stays ``None``."""
    return None if dtype is None else jnp.dtype(dtype)


def compute_dtype(dtype: Optional[DType]):
    """The ``dtype`` argument for Flax layers: ``None`` for float32, so that the float32 model
    runs exactly the operations it always ran; otherwise the compute dtype."""
    d = as_dtype(dtype)
    return None if d is None or d == jnp.float32 else d


@jax.custom_jvp
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, PyTorch's default; ``jax.nn.gelu`` defaults to the tanh form.

    ``0.5 x (1 + erf(x / sqrt 2))``, PyTorch's formula: ``jax.nn.gelu(x, approximate=False)``
    writes it with ``erfc``, whose expansion is three times the size of ``erf``'s and is compiled
    at every GELU of a step (tiny adapter's CPU train step: 14% fewer instructions, 13% less
    compile time); the values differ by under 2 float32 ulps of ``max(|x|, 1)``. The derivative
    is given in closed form, ``Phi(x) + x phi(x)``, evaluated in float32 at least and stored in ``x.dtype``: a
    training step keeps that one array for the backward, where differentiating the formula
    keeps two (XLA:GPU keeps ``x`` and ``erf(x / sqrt 2)``; ViT-B at 256x704, batch 6,
    float32: 72 MB more a trunk block).
    """
    # In float32 at least and rounded once, as PyTorch's bfloat16 GELU does.
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (0.5 * xf * (1 + jax.lax.erf(xf * (0.5 ** 0.5)))).astype(x.dtype)


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    # d/dx [x/2 (1 + erf(x/sqrt2))] = (1 + erf(x/sqrt2))/2 + x exp(-x^2/2)/sqrt(2 pi)
    slope = 0.5 * (1 + jax.lax.erf(xf * (0.5 ** 0.5))) + xf * jnp.exp(-0.5 * xf * xf) * ((2 * jnp.pi) ** -0.5)
    # The barrier makes the slope one materialised array: without it XLA fuses the slope's
    # arithmetic into the backward and keeps x and erf(x / sqrt 2) for it instead (two arrays).
    slope = jax.lax.optimization_barrier(slope.astype(x.dtype))
    return gelu(x), t * slope


def layer_norm(
    dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6, dtype: Optional[DType] = None,
    param_dtype: DType = jnp.float32,
) -> "LayerNorm":
    # Two-pass variance, as PyTorch computes it. Flax computes the statistics in float32 at
    # least whatever ``dtype`` is, so bfloat16 compute keeps float32 statistics.
    return LayerNorm(dim, epsilon=eps, use_fast_variance=False, dtype=compute_dtype(dtype),
                     param_dtype=as_dtype(param_dtype), rngs=rngs)


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` (same parameters, same values) whose gradient, when compiling for a
    CPU, is :func:`layer_norm_last_axis`'s closed form (recorded under ``"layer_norm"``)."""

    def __call__(self, x: jax.Array, *, mask: Optional[jax.Array] = None) -> jax.Array:
        plain = (mask is not None or self.scale is None or self.bias is None
                 or self.reduction_axes not in (-1, (-1,)) or self.feature_axes not in (-1, (-1,)))
        fused = not plain and conv_ops.compiling_for_cpu()
        if compilation.record("layer_norm", "fused_vjp" if fused else "autodiff") == "autodiff":
            return super().__call__(x, mask=mask)
        # Flax's promotion: everything to ``dtype`` when set, else to the common type.
        out = self.dtype if self.dtype is not None else jnp.result_type(x, self.scale[...], self.bias[...])
        x, scale, bias = (a.astype(out) for a in (x, self.scale[...], self.bias[...]))
        return layer_norm_last_axis(x, scale, bias, self.epsilon)


def _layer_norm_2d(x2, scale, bias, eps):
    """``[N, C]`` rows in float32 at least -> ``(y, mean [N, 1], rstd [N, 1])``."""
    mean = jnp.mean(x2, -1, keepdims=True)
    xc = x2 - mean
    rstd = jax.lax.rsqrt(jnp.mean(xc * xc, -1, keepdims=True) + eps)
    return xc * (rstd * scale) + bias, mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_last_axis(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """Layer norm over the last axis, ``x [..., C]``, ``scale, bias [C]`` -> ``[..., C]`` in
    ``x.dtype`` (statistics in float32 at least), with its gradient in closed form.

    On the rows as one ``[N, C]`` matrix: XLA:CPU fuses a leading axis of 1 badly. Its backward
    is two row reductions and one elementwise pass where differentiating the statistics takes
    several. XLA:CPU, gradient of the input, ``[2, 4032, 384]``: 11.3 -> 3.7 ms, ``[1, 970,
    384]``: 1.5 -> 0.5 ms (PyTorch 5.0 and 0.6 ms); ViT-S adapter train step, batch 2,
    256x704, trunk frozen: 4.15 -> 3.95 s (2-core EPYC, interleaved medians of 7)."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    f = jnp.promote_types(x.dtype, jnp.float32)
    y, mean, rstd = _layer_norm_2d(x.reshape(-1, x.shape[-1]).astype(f), scale.astype(f), bias.astype(f), eps)
    return y.reshape(x.shape).astype(x.dtype), (x, scale, bias, mean, rstd)


def _layer_norm_bwd(eps, res, g):
    x, scale, bias, mean, rstd = res
    f = mean.dtype
    x2, g2 = x.reshape(-1, x.shape[-1]).astype(f), g.reshape(-1, x.shape[-1]).astype(f)
    xhat = (x2 - mean) * rstd
    gs = g2 * scale.astype(f)
    # y = xhat * scale + bias with xhat = (x - mean(x)) * rstd: the two row means below are
    # the gradient through the mean and through rstd.
    dx = rstd * (gs - jnp.mean(gs, -1, keepdims=True) - xhat * jnp.mean(gs * xhat, -1, keepdims=True))
    dscale, dbias = jnp.sum(g2 * xhat, 0), jnp.sum(g2, 0)
    return dx.reshape(x.shape).astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


layer_norm_last_axis.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def linear(
    din: int, dout: int, *, rngs: nnx.Rngs, std: float = 0.02, dtype: Optional[DType] = None,
    param_dtype: DType = jnp.float32, bias: bool = True,
) -> nnx.Linear:
    """Linear layer with the ViT init (truncated normal, std 0.02, zero bias)."""
    return nnx.Linear(din, dout, use_bias=bias, kernel_init=nnx.initializers.truncated_normal(std),
                      dtype=compute_dtype(dtype), param_dtype=as_dtype(param_dtype), rngs=rngs)


def conv(
    din: int, dout: int, kernel: int, *, stride: int = 1, padding: int = 0, groups: int = 1,
    bias: bool = True, rngs: nnx.Rngs, dtype: Optional[DType] = None,
    param_dtype: DType = jnp.float32,
) -> nnx.Conv:
    """NHWC conv with PyTorch's symmetric integer padding and a fan-out normal init."""
    fan_out = kernel * kernel * dout // groups
    return nnx.Conv(
        din, dout, (kernel, kernel), strides=stride, padding=((padding, padding), (padding, padding)),
        feature_group_count=groups, use_bias=bias,
        kernel_init=nnx.initializers.normal((2.0 / fan_out) ** 0.5), dtype=compute_dtype(dtype),
        param_dtype=as_dtype(param_dtype), rngs=rngs,
        # XLA's convolution, with a faster kernel gradient for large maps on CPU.
        conv_general_dilated=conv_ops.conv_general_dilated,
    )


class ReLU(nnx.Module):
    """Parameter-free stand-in so that ``nn.Sequential`` indices survive in module paths."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class MaxPool3x3s2(nnx.Module):
    """``nn.MaxPool2d(3, 2, 1)``: padding counts as -inf; ``n -> ceil(n / 2)``."""

    def __call__(self, x: jax.Array) -> jax.Array:
        if use_cpu_formulations():
            return max_pool3x3s2(x)
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
                 use_running_average: bool = True, param_dtype: DType = jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        # Running statistics stay float32 whatever the parameter dtype.
        self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((dim,), jnp.float32))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.eps = eps
        self.momentum = momentum
        self.use_running_average = use_running_average

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``; statistics and normalisation in float32 at least,
        the result in ``x.dtype``."""
        if self.use_running_average:
            return _batch_norm_apply(x, self.mean[...], self.var[...], self.scale[...], self.bias[...], self.eps)
        # The closed-form gradient where it measured faster (CPU); XLA's own elsewhere.
        fused = compilation.record("batch_norm", "fused_vjp" if conv_ops.compiling_for_cpu() else "autodiff")
        train = batch_norm_train if fused == "fused_vjp" else _batch_norm_train
        y, mean, var = train(x, self.scale[...], self.bias[...], self.eps)
        n = x.size // x.shape[-1]
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
        self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
        self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        return y


def _batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float):
    """Training-mode batch norm over all but the last axis: ``x [..., C]`` -> ``(y, mean, var)``
    with the biased batch variance ``var [C]``; float32 at least, ``y`` in ``x.dtype``."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    mean = xf.mean(axes)
    var = jnp.square(xf - mean).mean(axes)
    return _batch_norm_apply(x, mean, var, scale, bias, eps), mean, var


def _batch_norm_apply(x, mean, var, scale, bias, eps):
    """``(x - mean) / sqrt(var + eps) * scale + bias`` per channel (last axis), float32 at
    least, in ``x.dtype``."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * scale.astype(xf.dtype) + bias.astype(xf.dtype)
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float):
    """:func:`_batch_norm_train` with its gradient in closed form: two passes over the map in
    the backward (the sums of ``g`` and ``g * xhat``, then ``dx``) where differentiating the
    statistics takes several. XLA:CPU, forward+backward with the ReLU after it: 21 -> 15 ms on
    the stem's ``[2, 133, 357, 64]`` and 37 -> 20 ms on the neck's ``[2, 67, 179, 384]``
    (2-core EPYC; PyTorch 20 and 25 ms)."""
    return _batch_norm_train(x, scale, bias, eps)


def _bn_fwd(x, scale, bias, eps):
    y, mean, var = _batch_norm_train(x, scale, bias, eps)
    return (y, mean, var), (x, scale, bias, mean, jax.lax.rsqrt(var + eps))


def _bn_bwd(eps, res, cts):
    x, scale, bias, mean, rstd = res
    gy, gmean, gvar = cts
    f = mean.dtype
    xf, g = x.astype(f), gy.astype(f)
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    xhat = (xf - mean) * rstd
    dbias = g.sum(axes)
    dscale = (g * xhat).sum(axes)
    a = scale.astype(f) * rstd
    # d/dx of y = xhat * scale + bias through the batch statistics, plus the cotangents of
    # the returned statistics themselves (d mean / dx = 1/n, d var / dx = 2 (x - mean) / n).
    dx = a * (g - dbias / n) - xhat * (a * dscale / n) + (gmean + 2 * gvar * (xf - mean)) / n
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


class ConvTranspose2x2(nnx.Module):
    """``nn.ConvTranspose2d(din, dout, kernel_size=2, stride=2)``: ``[B,h,w,din] -> [B,2h,2w,dout]``.

    With stride equal to kernel size every output pixel has exactly one source pixel, so the op
    is one matmul and a pixel shuffle. ``kernel`` is ``[2, 2, din, dout]`` (PyTorch: ``[din,
    dout, 2, 2]``).
    """

    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs, param_dtype: DType = jnp.float32):
        std = (2.0 / (4 * dout)) ** 0.5
        kernel = std * jax.random.normal(rngs.params(), (2, 2, din, dout), jnp.float32)
        self.kernel = nnx.Param(kernel.astype(param_dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        k = self.kernel[...].astype(x.dtype)
        y = jnp.einsum("bhwc,ijco->bhiwjo", x, k)
        return y.reshape(b, 2 * h, 2 * w, -1) + self.bias[...].astype(x.dtype)


def drop_path(rate: float, *, rngs: nnx.Rngs) -> nnx.Dropout:
    """Stochastic depth on ``[B, N, C]`` residual branches: one keep/drop draw per sample."""
    # A rate of 0 needs no random stream (and so adds no RNG state to checkpoints).
    return nnx.Dropout(rate, broadcast_dims=(1, 2), deterministic=True, rngs=rngs if rate > 0 else None)
