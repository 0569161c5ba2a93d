"""``resize_nhwc`` (PyTorch's ``F.interpolate`` on NHWC maps) against PyTorch."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_adapter
from jax_adapter.nn.resize import interp_matrix, resize_nhwc
from tests.helpers import rel_err

pytestmark = pytest.mark.torch

# float32 against PyTorch's float32 kernel (whose source coordinates, computed in float32, the
# interpolation matrices reproduce): the same products summed in another order.
F32_TOL = 1e-5
# bfloat16 (input rounded to bfloat16, float32 arithmetic, output rounded): measured up to 5.5e-3.
BF16_TOL = 1e-2


def torch_resize(x: np.ndarray, size, mode: str) -> np.ndarray:
    t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    y = torch.nn.functional.interpolate(t, size=size, mode=mode, align_corners=False)
    return y.numpy().transpose(0, 2, 3, 1)


def formulation(name: str):
    """Trace for a target whose rule picks ``name``: the CPU's ``"taps"``, a TPU's ``"matmul"``
    (the program still runs here: the formulation is plain XLA)."""
    return contextlib.nullcontext() if name == "taps" else jax_adapter.target("tpu", ahead_of_time=False)


FORMULATIONS = ["taps", "matmul"]
SIZES = [((34, 90), (67, 179)), ((68, 180), (67, 179)), ((18, 50), (64, 176)), ((19, 51), (9, 23))]


@pytest.mark.parametrize("impl", FORMULATIONS)
@pytest.mark.parametrize("src, size", SIZES)
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_matches_pytorch_in_float32_and_bfloat16(src, size, mode, impl):
    x = np.random.default_rng(0).standard_normal((2, *src, 8)).astype(np.float32)
    ref = torch_resize(x, size, mode)
    with formulation(impl) as t:
        got = resize_nhwc(jnp.asarray(x), size, mode)
        got16 = resize_nhwc(jnp.asarray(x, jnp.bfloat16), size, mode)
    if t is not None:
        assert dict(t.decisions["resize"]) == {"matmul": 2}
    assert got.dtype == jnp.float32 and got.shape == ref.shape
    assert rel_err(np.asarray(got), ref) < F32_TOL
    assert got16.dtype == jnp.bfloat16
    assert rel_err(np.asarray(got16, np.float32), ref) < BF16_TOL


@pytest.mark.parametrize("impl", FORMULATIONS)
@pytest.mark.parametrize("src, size", SIZES)
@pytest.mark.parametrize("mode, antialias", [("bilinear", False), ("bicubic", False), ("bicubic", True)])
def test_value_and_gradient_against_float64_matrices(src, size, mode, antialias, impl):
    """Both formulations against ``M_h x M_w^T`` and its transpose in float64 numpy: the resize
    and its gradient to float64 rounding."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, *src, 3))
    g = rng.standard_normal((2, *size, 3))
    mh = interp_matrix(src[0], size[0], mode, None, antialias)
    mw = interp_matrix(src[1], size[1], mode, None, antialias)
    want = np.einsum("oh,pw,bhwc->bopc", mh, mw, x)
    want_grad = np.einsum("oh,pw,bopc->bhwc", mh, mw, g)
    with jax.enable_x64(True), formulation(impl):
        fn = lambda x: resize_nhwc(x, size, mode, antialias=antialias)  # noqa: E731
        got, vjp = jax.vjp(fn, jnp.asarray(x))
        (got_grad,) = vjp(jnp.asarray(g))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(got_grad), want_grad, rtol=0, atol=1e-12)

