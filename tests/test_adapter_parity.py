"""The tiny DinoAdapter against the PyTorch reference's outputs (eval mode)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_adapter.models.dinov2_adapter import DinoAdapter
from jax_adapter import AdapterConfig
from jax_adapter.convert.keys import load_state_dict
from jax_adapter.convert.torch_io import find_state_dict, read_pth, to_numpy
from conftest import FIXTURES, load_npz

# Forward outputs are O(1); a faithful float32 port lands within 1e-4 absolute.
ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny_model():
    cfg = AdapterConfig(**json.loads((FIXTURES / "seed_adapter_tiny.json").read_text()))
    model = DinoAdapter(cfg, rngs=nnx.Rngs(0))
    sd = to_numpy(find_state_dict(read_pth(str(FIXTURES / "seed_adapter_tiny.pth"))))
    load_state_dict(model, sd)
    model.eval()
    return model


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("k", [0, 1])
def test_tiny_adapter_outputs_match_reference(tiny_model, k):
    io = load_npz("seed_adapter_tiny_io.npz")
    images = jnp.asarray(io[f"input{k}"].transpose(0, 2, 3, 1))
    graph, state = nnx.split(tiny_model)

    @jax.jit
    def forward(state, images):
        return nnx.merge(graph, state)(images)

    out = forward(state, images)
    for i, f in enumerate(out.features):
        ref = io[f"input{k}_f{i + 1}"]
        assert nchw(f).shape == ref.shape
        np.testing.assert_allclose(nchw(f), ref, rtol=0, atol=ATOL, err_msg=f"f{i + 1}")
    ref = io[f"input{k}_x_out"]
    assert nchw(out.vit).shape == ref.shape
    np.testing.assert_allclose(nchw(out.vit), ref, rtol=0, atol=ATOL, err_msg="x_out")
