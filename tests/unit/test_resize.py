"""``resize_nhwc`` (PyTorch's ``F.interpolate`` on NHWC maps) against PyTorch."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax_adapter.nn.resize import resize_nhwc
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


@pytest.mark.parametrize("src, size", [((34, 90), (67, 179)), ((68, 180), (67, 179)), ((18, 50), (64, 176))])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_matches_pytorch_in_float32_and_bfloat16(src, size, mode):
    x = np.random.default_rng(0).standard_normal((2, *src, 8)).astype(np.float32)
    ref = torch_resize(x, size, mode)
    got = resize_nhwc(jnp.asarray(x), size, mode)
    assert got.dtype == jnp.float32 and got.shape == ref.shape
    assert rel_err(np.asarray(got), ref) < F32_TOL
    got16 = resize_nhwc(jnp.asarray(x, jnp.bfloat16), size, mode)
    assert got16.dtype == jnp.bfloat16
    assert rel_err(np.asarray(got16, np.float32), ref) < BF16_TOL

