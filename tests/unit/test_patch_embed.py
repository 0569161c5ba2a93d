"""The patch embedding as a matrix product over flattened patches, against the stride-p
convolution it replaces (``lax.conv_general_dilated``, which is what PyTorch's ``Conv2d`` computes
and what the trunk fixtures test end to end)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from jax_adapter.nn.vit import PatchEmbed


def conv_reference(x, kernel, bias, p):
    y = lax.conv_general_dilated(x, kernel, (p, p), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=lax.Precision.HIGHEST)
    return y + bias


def _module(p, dim, dtype, param_dtype=jnp.float32):
    m = PatchEmbed(p, dim, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    rng = np.random.default_rng(p * dim)
    m.proj.bias[...] = jnp.asarray(rng.standard_normal(dim), param_dtype)
    return m


# (patch, H, W): whole patches, and rows / columns past the last whole patch (dropped, as the
# VALID convolution drops them).
SHAPES = [(14, 28, 42), (14, 37, 53), (16, 32, 48), (4, 9, 13)]


@pytest.mark.parametrize("p, h, w", SHAPES)
def test_matches_the_convolution_in_float64(p, h, w):
    with jax.enable_x64(True):
        m = _module(p, 24, jnp.float64, jnp.float64)
        x = jnp.asarray(np.random.default_rng(h * w).standard_normal((2, h, w, 3)))
        kernel, bias = m.proj.kernel[...], m.proj.bias[...]
        got = m(x)
        want = conv_reference(x, kernel, bias, p)
        assert got.shape == want.shape == (2, h // p, w // p, 24) and got.dtype == jnp.float64
        # The same products summed in another order: float64 rounding only.
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-12)

        weights = jnp.cos(jnp.arange(24.0))
        g_mod, g_x = nnx.grad(lambda m, x: jnp.sum(m(x) * weights), argnums=(0, 1))(m, x)
        g_ref = jax.grad(lambda x, k, b: jnp.sum(conv_reference(x, k, b, p) * weights),
                         argnums=(0, 1, 2))(x, kernel, bias)
        ours = (g_x, g_mod["proj"]["kernel"][...], g_mod["proj"]["bias"][...])
        for name, a, r in zip(("dx", "dkernel", "dbias"), ours, g_ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=0, atol=1e-11, err_msg=name)


@pytest.mark.parametrize("p, h, w", SHAPES[:2])
def test_float32_and_bfloat16_against_float64(p, h, w):
    x64 = np.random.default_rng(p + h).standard_normal((2, h, w, 3))
    m32 = _module(p, 24, jnp.float32)
    kernel64 = np.asarray(m32.proj.kernel[...], np.float64)
    bias64 = np.asarray(m32.proj.bias[...], np.float64)
    with jax.enable_x64(True):
        want = np.asarray(conv_reference(jnp.asarray(x64), jnp.asarray(kernel64), jnp.asarray(bias64), p))
    scale = np.abs(want).max()
    got32 = np.asarray(m32(jnp.asarray(x64, jnp.float32)))
    # float32 inputs, 588 products per output: within 1e-5 of the largest output.
    np.testing.assert_allclose(got32, want, rtol=0, atol=1e-5 * scale)
    mbf = _module(p, 24, jnp.bfloat16)
    got_bf = mbf(jnp.asarray(x64, jnp.float32).astype(jnp.bfloat16))
    assert got_bf.dtype == jnp.bfloat16
    # bfloat16 inputs and kernel (relative 2**-9 each) and a bfloat16 result: 2e-2 of the largest.
    np.testing.assert_allclose(np.asarray(got_bf, np.float64), want, rtol=0, atol=2e-2 * scale)
