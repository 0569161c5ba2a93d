"""Formulations of the adapter's convolutions and max-pool whose XLA:CPU backward is fast.

Same results as ``lax.conv_general_dilated`` / ``nnx.max_pool`` (up to float32 summation order),
NHWC. Measured on a 2-core CPU, forward+backward, the shapes of the ViT-S adapter at 256x704,
batch 2:

- ``depthwise_conv3x3`` (ConvFFN, 96 channels, the three SPM levels): XLA's grouped conv 29 ms,
  nine shifted multiply-adds (one fused loop each way) 2.7 ms.
- ``max_pool3x3s2`` (the stem's pool, 64 channels at 133x357): XLA's ``select_and_scatter``
  backward made it 108 ms, here 29 ms: the backward routes each cotangent to the first maximal
  tap of its window (PyTorch's choice) with nine strided pads.
- ``conv_general_dilated`` (the dense convs): 1x1 as a matrix product; the gradients of small
  maps as products with the patch matrix (``conv_patches``), the kernel gradient of large ones
  summed over bands of rows (``conv_banded``).

``use_cpu_formulations()`` says whether the models take these paths (when compiling for a CPU:
on GPUs cuDNN's convolutions are the fast path, on TPUs XLA's).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jax_adapter import compilation


def compiling_for_cpu() -> bool:
    """Whether the current compilation target is a CPU (nothing recorded)."""
    return compilation.current().platform == "cpu"


def use_cpu_formulations() -> bool:
    """Whether the current compilation target is a CPU (recorded under ``"conv_pool"``)."""
    cpu = compiling_for_cpu()
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


def _window_taps(xp: jax.Array, kh: int, kw: int, strides, out_hw) -> list:
    """The ``kh * kw`` strided views of a padded map, row-major in the window:
    ``[B, Ho, Wo, C]`` each, view ``(i, j)`` holding input pixel ``(s*r + i, s*c + j)``."""
    (sh, sw), (ho, wo) = strides, out_hw
    return [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] for i in range(kh) for j in range(kw)]


def _pool_taps(x: jax.Array):
    """The nine stride-2 views of ``x`` padded with -inf: ``[B, ceil(H/2), ceil(W/2), C]`` each."""
    h, w = x.shape[1:3]
    oh, ow = -(-h // 2), -(-w // 2)
    # One -inf row/column before, enough after for the last window (2*oh + 1 rows in all).
    xp = jnp.pad(x, ((0, 0), (1, 2 * oh - h), (1, 2 * ow - w), (0, 0)),
                 constant_values=-jnp.inf)
    return _window_taps(xp, 3, 3, (2, 2), (oh, ow))


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


# The kernel gradient of a large convolution: XLA:CPU (YNNPACK, jaxlib 0.10) computes it as one
# contraction over all B*Ho*Wo output positions, slowly when they are many. Summed over bands of
# output rows of about BAND_POSITIONS positions each, it took 55 instead of 94-150 ms for the
# SPM's 64->64 3x3 convs at batch 2, 256x704 (95,000 positions; PyTorch's oneDNN: 60-80 ms) on a
# 2-core EPYC, and the whole SPM forward+backward 430 instead of 550 ms. Thin inputs (the
# 3-channel stem conv) and small maps keep XLA's own, as fast or faster there.
BAND_POSITIONS = 768
BANDED_MIN_POSITIONS = 16384
BANDED_MIN_CHANNELS = 32
# Small maps (fewer than BANDED_MIN_POSITIONS output positions): both gradients as products with
# the patch matrix [B*Ho*Wo, kh*kw*Cin] (at most PATCHES_MAX_ELEMENTS), which XLA:CPU runs
# faster than its convolutions there. The SPM's stride-2 convs at batch 2, 256x704,
# forward+backward (2-core EPYC): 256->256 at 9x23 13 -> 9.5 ms, 64->128 at 34x90 20.6 -> 19 ms.
PATCHES_MAX_ELEMENTS = 1 << 24
_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, k, strides, padding):
    return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_banded(x: jax.Array, kernel: jax.Array, strides, padding, bands: int) -> jax.Array:
    """NHWC conv (``kernel`` HWIO, explicit ``padding`` pairs) whose kernel gradient is summed
    over ``bands`` bands of output rows (float32 at least); values and input gradient are XLA's
    own. ``[B, H, W, Cin] -> [B, Ho, Wo, Cout]``."""
    return _conv(x, kernel, strides, padding)


def _banded_fwd(x, kernel, strides, padding, bands):
    return _conv(x, kernel, strides, padding), (x, kernel)


def _banded_bwd(strides, padding, bands, res, g):
    x, kernel = res
    dx = jax.vjp(lambda x: _conv(x, kernel, strides, padding), x)[1](g)[0]
    (pt, pb), (pl, pr) = padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    kh, s = kernel.shape[0], strides[0]
    ho = g.shape[1]
    rows = -(-ho // bands)
    acc = jnp.promote_types(kernel.dtype, jnp.float32)
    dk = jnp.zeros(kernel.shape, acc)
    for r0 in range(0, ho, rows):
        r1 = min(ho, r0 + rows)
        xb = xp[:, r0 * s:(r1 - 1) * s + kh]  # the input rows that band's outputs read
        part = jax.vjp(lambda k: _conv(xb, k, strides, ((0, 0), (0, 0))), kernel)[1](g[:, r0:r1])[0]
        dk = dk + part.astype(acc)
    return dx, dk.astype(kernel.dtype)


conv_banded.defvjp(_banded_fwd, _banded_bwd)


def _patches(x, kshape, strides, padding, out_hw):
    """The ``kh * kw`` strided views of the padded input side by side: ``[B, Ho, Wo, kh*kw*Cin]``
    (tap-major, as ``kernel.reshape(kh*kw*Cin, Cout)`` orders its rows)."""
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    return jnp.concatenate(_window_taps(xp, kshape[0], kshape[1], strides, out_hw), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_patches(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
    """NHWC conv (``kernel`` HWIO, explicit ``padding`` pairs) whose gradients are two matrix
    products over the patch matrix of the input; values are XLA's own.
    ``[B, H, W, Cin] -> [B, Ho, Wo, Cout]``."""
    return _conv(x, kernel, strides, padding)


def _patches_fwd(x, kernel, strides, padding):
    return _conv(x, kernel, strides, padding), (x, kernel)


def _patches_bwd(strides, padding, res, g):
    x, kernel = res
    kk = kernel.reshape(-1, kernel.shape[-1])
    p, p_vjp = jax.vjp(lambda x: _patches(x, kernel.shape, strides, padding, g.shape[1:3]), x)
    g2 = g.reshape(-1, g.shape[-1])
    acc = jnp.promote_types(kernel.dtype, jnp.float32)
    dk = jnp.dot(p.reshape(g2.shape[0], -1).T, g2, preferred_element_type=acc)
    # The patch matrix's transpose scatters each tap back with a strided pad: no scatter-add.
    dx = p_vjp(jnp.dot(g2, kk.T).reshape(p.shape))[0]
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


conv_patches.defvjp(_patches_fwd, _patches_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` (the signature ``nnx.Conv`` calls), except that for a CPU an
    NHWC 1x1 convolution is a matrix product (recorded under ``"conv_1x1"``), a small one takes
    :func:`conv_patches` and a large one :func:`conv_banded`: the same values, faster gradients
    (recorded under ``"conv_kernel_grad"``)."""
    plain = lambda: lax.conv_general_dilated(  # noqa: E731
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, precision=precision,
        **kwargs)
    if (lhs.ndim != 4 or feature_group_count != 1 or precision is not None or any(v is not None for v in kwargs.values())
            or any(d != 1 for d in (*(lhs_dilation or (1, 1)), *(rhs_dilation or (1, 1))))
            or isinstance(padding, str)
            or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
        return plain()
    strides = tuple(int(s) for s in window_strides)
    pads = tuple((int(a), int(b)) for a, b in padding)
    kh, kw = rhs.shape[:2]
    cpu = compiling_for_cpu()
    if cpu and (kh, kw) == (1, 1) and strides == (1, 1) and pads == ((0, 0), (0, 0)):
        # A 1x1 convolution is a matrix product; XLA:CPU runs it (and its gradients) as one
        # several times faster (SPM fc1, 64->384 at 67x179, batch 2: 23 instead of 77 ms).
        compilation.record("conv_1x1", "dot")
        b, h, w, cin = lhs.shape
        return jnp.dot(lhs.reshape(-1, cin), rhs.reshape(cin, -1)).reshape(b, h, w, -1)
    b, ho, wo, _ = lax.conv_general_shape_tuple(lhs.shape, rhs.shape, strides, pads, _NHWC)
    positions = int(b * ho * wo)
    if not cpu:
        return plain()
    if positions < BANDED_MIN_POSITIONS and positions * kh * kw * lhs.shape[-1] <= PATCHES_MAX_ELEMENTS:
        compilation.record("conv_kernel_grad", "patches")
        return conv_patches(lhs, rhs, strides, pads)
    if lhs.shape[-1] < BANDED_MIN_CHANNELS:
        return plain()
    compilation.record("conv_kernel_grad", "banded")
    return conv_banded(lhs, rhs, strides, pads, max(1, round(positions / BAND_POSITIONS)))
