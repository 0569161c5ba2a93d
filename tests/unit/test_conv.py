"""The CPU formulations of the depthwise conv and the max-pool against XLA's ops and PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax import lax

from jax_adapter.nn import conv as conv_ops
from jax_adapter.nn.conv import depthwise_conv3x3, max_pool3x3s2
from tests.helpers import rel_err

pytestmark = pytest.mark.torch

# float32, the same sums in another order.
ATOL = 1e-5


def fwd_bwd(fn, *args, seed=1):
    out, vjp = jax.vjp(fn, *args)
    g = jnp.asarray(np.random.default_rng(seed).standard_normal(out.shape).astype(np.float32))
    return (out, *vjp(g))


def xla_depthwise(x, k, b):
    y = lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])
    return y + b


@pytest.mark.parametrize("h, w", [(1, 1), (5, 7), (9, 23), (34, 90)])
def test_depthwise_matches_grouped_conv(h, w):
    rng = np.random.default_rng(h * w)
    x = jnp.asarray(rng.standard_normal((2, h, w, 12)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, 1, 12)).astype(np.float32))
    b = jnp.asarray(rng.standard_normal(12).astype(np.float32))
    for name, a, r in zip(("out", "dx", "dk", "db"), fwd_bwd(depthwise_conv3x3, x, k, b), fwd_bwd(xla_depthwise, x, k, b)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=0, atol=ATOL * max(1, np.abs(r).max()), err_msg=name)


def test_depthwise_bfloat16_accumulates_in_float32():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 6, 8, 4)).astype(np.float32)).astype(jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((3, 3, 1, 4)).astype(np.float32))
    got = depthwise_conv3x3(x, k)
    assert got.dtype == jnp.bfloat16
    ref = xla_depthwise(x.astype(jnp.float32), k, 0.0)
    # One bfloat16 rounding of the result: relative 2**-8.
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref), rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("h, w", [(1, 1), (2, 3), (7, 9), (8, 10), (17, 45)])
def test_max_pool_matches_xla(h, w):
    rng = np.random.default_rng(h + w)
    # ReLU'd input, as in the stem: many exact-zero ties.
    x = jnp.asarray(np.maximum(rng.standard_normal((2, h, w, 5)), 0).astype(np.float32))
    ref = lambda x: nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # noqa: E731
    got, want = fwd_bwd(max_pool3x3s2, x), fwd_bwd(ref, x)
    assert got[0].shape == (2, -(-h // 2), -(-w // 2), 5)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    # A pixel in several windows sums their cotangents, in another order than XLA's.
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=0, atol=ATOL)


def test_max_pool_ties_go_to_the_first_maximum_like_pytorch():
    # Whole windows of equal positive values: PyTorch routes the gradient to the first one.
    x = np.ones((1, 1, 6, 7), np.float32)
    x[0, 0, 2:4, 3:5] = 2.0
    t = torch.from_numpy(x).requires_grad_(True)
    out = torch.nn.functional.max_pool2d(t, 3, 2, 1)
    g = np.random.default_rng(0).standard_normal(out.shape).astype(np.float32)
    out.backward(torch.from_numpy(g))
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    o, vjp = jax.vjp(max_pool3x3s2, xj)
    (dx,) = vjp(jnp.asarray(g.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(np.asarray(o), out.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(dx), t.grad.numpy().transpose(0, 2, 3, 1))


def test_models_use_the_cpu_formulations_only_on_cpu(monkeypatch):
    from jax_adapter.nn.layers import MaxPool3x3s2
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 6, 2)).astype(np.float32))
    called = []
    monkeypatch.setattr("jax_adapter.nn.layers.max_pool3x3s2", lambda x: called.append(1) or x)
    MaxPool3x3s2()(x)
    assert called == [1]
    monkeypatch.setattr("jax_adapter.nn.layers.use_cpu_formulations", lambda: False)
    assert MaxPool3x3s2()(x).shape == (1, 3, 3, 2) and called == [1]
    assert conv_ops.use_cpu_formulations() == (jax.default_backend() == "cpu")


# --- the banded kernel gradient of large convolutions -----------------------------------------


def _conv64(x, k, stride):
    """The convolution and its VJP in numpy float64, from the definition: zero padding 1."""
    b, h, w, ci = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    taps = {(i, j): xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
            for i in range(3) for j in range(3)}
    out = sum(np.einsum("bhwc,co->bhwo", t, k[i, j]) for (i, j), t in taps.items())
    return out, taps


@pytest.mark.parametrize("stride, bands", [(1, 4), (2, 3), (1, 1)])
def test_banded_kernel_gradient_matches_float64(stride, bands):
    """Every band split (including bands that do not divide the rows) gives the float64
    definition's output, input gradient and kernel gradient."""
    from jax_adapter.nn.conv import conv_banded

    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 11, 9, 5))
    k = rng.standard_normal((3, 3, 5, 4))
    out64, taps = _conv64(x, k, stride)
    g = rng.standard_normal(out64.shape)
    dk64 = np.stack([np.einsum("bhwc,bhwo->co", taps[i, j], g) for i in range(3) for j in range(3)]).reshape(k.shape)
    with jax.enable_x64(True):
        f = lambda x, k: conv_banded(x, k, (stride, stride), ((1, 1), (1, 1)), bands)
        out, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(k))
        dx, dk = vjp(jnp.asarray(g))
        dx64 = jax.vjp(lambda x: jax.lax.conv_general_dilated(x, jnp.asarray(k), (stride, stride), ((1, 1), (1, 1)),
                                                               dimension_numbers=("NHWC", "HWIO", "NHWC")),
                       jnp.asarray(x))[1](jnp.asarray(g))[0]
    assert rel_err(out, out64) < 1e-12 and rel_err(dk, dk64) < 1e-12 and rel_err(dx, dx64) < 1e-12
    f32 = jax.vjp(lambda k: conv_banded(jnp.asarray(x, jnp.float32), k, (stride, stride), ((1, 1), (1, 1)), bands),
                  jnp.asarray(k, jnp.float32))[1](jnp.asarray(g, jnp.float32))[0]
    assert f32.dtype == jnp.float32 and rel_err(f32, dk64) < 1e-5


@pytest.mark.parametrize("stride, size", [(1, (7, 9)), (2, (11, 9)), (2, (4, 5))])
def test_patch_matrix_gradients_match_float64(stride, size):
    """Both gradients of :func:`conv_patches` (products with the patch matrix) against the
    float64 definition; odd and even sizes at stride 2 (the last window reads the padding)."""
    from jax_adapter.nn.conv import conv_patches

    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, *size, 5))
    k = rng.standard_normal((3, 3, 5, 4))
    out64, taps = _conv64(x, k, stride)
    g = rng.standard_normal(out64.shape)
    dk64 = np.stack([np.einsum("bhwc,bhwo->co", taps[i, j], g) for i in range(3) for j in range(3)]).reshape(k.shape)
    # dx from the definition: each tap's input pixels receive g @ k[i, j].T.
    dxp = np.zeros((2, size[0] + 2 + stride, size[1] + 2 + stride, 5))
    ho, wo = out64.shape[1:3]
    for i in range(3):
        for j in range(3):
            dxp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride] += g @ k[i, j].T
    dx64 = dxp[:, 1:1 + size[0], 1:1 + size[1]]
    with jax.enable_x64(True):
        out, vjp = jax.vjp(lambda x, k: conv_patches(x, k, (stride, stride), ((1, 1), (1, 1))), jnp.asarray(x), jnp.asarray(k))
        dx, dk = vjp(jnp.asarray(g))
    assert rel_err(out, out64) < 1e-12 and rel_err(dk, dk64) < 1e-12 and rel_err(dx, dx64) < 1e-12
    x32, k32, g32 = (jnp.asarray(a, jnp.float32) for a in (x, k, g))
    dx32, dk32 = jax.vjp(lambda x, k: conv_patches(x, k, (stride, stride), ((1, 1), (1, 1))), x32, k32)[1](g32)
    assert dx32.dtype == dk32.dtype == jnp.float32
    assert rel_err(dx32, dx64) < 1e-5 and rel_err(dk32, dk64) < 1e-5


def test_cpu_convolutions_take_the_banded_or_patch_gradients():
    import jax_adapter
    from jax_adapter.nn import conv as conv_ops

    x = jnp.zeros((2, 200, 100, 32))  # 40,000 output positions, 32 channels
    k = jnp.zeros((3, 3, 32, 8))

    def decisions(platform, x, k=k):
        with jax_adapter.target(platform) as t:
            jax.make_jaxpr(lambda x, k: conv_ops.conv_general_dilated(
                x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))(x, k)
        return {site: dict(c) for site, c in t.decisions.items()}

    assert decisions("cpu", x) == {"conv_kernel_grad": {"banded": 1}}
    assert decisions("gpu", x) == {}
    assert decisions("cpu", x[..., :16], k[:, :, :16]) == {}  # thin input
    # 10,000 positions: the patch-matrix gradients, for thin inputs too.
    assert decisions("cpu", x[:1, :100]) == {"conv_kernel_grad": {"patches": 1}}
    assert decisions("cpu", x[:1, :100, :, :3], k[:, :, :3]) == {"conv_kernel_grad": {"patches": 1}}
    assert decisions("gpu", x[:1, :100]) == {}
