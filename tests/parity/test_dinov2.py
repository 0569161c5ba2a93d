"""The DINOv2 family against the PyTorch references: the hub trunk (with and without register
tokens) and the seed DinoAdapter (eval mode, two input sizes)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import dinov2_trunk, load_npz, nchw, nhwc, seed_adapter

pytestmark = pytest.mark.torch

# Outputs are LayerNorm-ed tokens and BatchNorm-ed maps, O(1); a faithful float32 port lands
# within 1e-4 absolute.
ATOL = 1e-4
forward = nnx.jit(lambda m, x: m(x))


@pytest.mark.parametrize("name, mode", [("dinov2_tiny_reg4", "bicubic_size_antialias"),
                                        ("dinov2_tiny_noreg", "bicubic_scale_offset")])
def test_trunk_tokens_match_reference(name, mode):
    model = dinov2_trunk(name)
    assert model.cfg.pos_embed_resize == mode
    io = load_npz(f"{name}_io.npz")
    for k in (0, 1):
        out = forward(model, jnp.asarray(nhwc(io[f"input{k}"])))
        np.testing.assert_allclose(out.cls, io[f"input{k}_x_norm_clstoken"], rtol=0, atol=ATOL)
        np.testing.assert_allclose(out.patches, io[f"input{k}_x_norm_patchtokens"], rtol=0, atol=ATOL)
        if model.cfg.num_register_tokens:
            np.testing.assert_allclose(out.registers, io[f"input{k}_x_norm_regtokens"], rtol=0, atol=ATOL)
        else:
            assert out.registers.shape[1] == 0


def test_trunk_intermediates_are_the_tokens_of_those_blocks():
    # The last block's normed output is the trunk's output; an earlier block's is a prefix of it.
    model = dinov2_trunk("dinov2_tiny_reg4")
    x = jnp.asarray(nhwc(load_npz("dinov2_tiny_reg4_io.npz")["input0"]))
    out = forward(model, x)
    layers = nnx.jit(lambda m, x: m.intermediates(x, [0, model.cfg.depth - 1]))(model, x)
    (first, _), (last, cls) = layers
    np.testing.assert_allclose(last.reshape(out.patches.shape), out.patches, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cls, out.cls, rtol=0, atol=1e-6)
    assert first.shape == last.shape and not np.allclose(first, last)


def test_trunk_rejects_non_multiple_sizes():
    model = dinov2_trunk("dinov2_tiny_noreg")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(jnp.zeros((1, 30, 28, 3)))


@pytest.mark.parametrize("k", [0, 1])
def test_seed_adapter_outputs_match_reference(k):
    io = load_npz("seed_adapter_tiny_io.npz")
    out = forward(seed_adapter(), jnp.asarray(nhwc(io[f"input{k}"])))
    for i, f in enumerate(out.features):
        ref = io[f"input{k}_f{i + 1}"]
        assert nchw(f).shape == ref.shape
        np.testing.assert_allclose(nchw(f), ref, rtol=0, atol=ATOL, err_msg=f"f{i + 1}")
    ref = io[f"input{k}_x_out"]
    assert nchw(out.vit).shape == ref.shape
    np.testing.assert_allclose(nchw(out.vit), ref, rtol=0, atol=ATOL, err_msg="x_out")
