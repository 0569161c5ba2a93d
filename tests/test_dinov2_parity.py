"""The DINOv2 trunk against the PyTorch hub reference, with and without register tokens."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_adapter.convert.infer import dinov2_config_from_hub
from jax_adapter.models.dinov2 import DinoV2
from jax_adapter.convert.keys import load_state_dict
from jax_adapter.convert.sources import from_dinov2_hub
from jax_adapter.convert.torch_io import read_pth, to_numpy
from conftest import FIXTURES, load_npz

# Outputs are LayerNorm-ed tokens, O(1); a faithful float32 port lands within 1e-4 absolute.
ATOL = 1e-4


def load_trunk(name):
    cfg = dinov2_config_from_hub(json.loads((FIXTURES / f"{name}.json").read_text()))
    model = DinoV2(cfg, rngs=nnx.Rngs(0))
    load_state_dict(model, from_dinov2_hub(to_numpy(read_pth(str(FIXTURES / f"{name}.pth")))))
    return model


@pytest.mark.parametrize("name, mode", [("dinov2_tiny_reg4", "bicubic_size_antialias"),
                                        ("dinov2_tiny_noreg", "bicubic_scale_offset")])
def test_trunk_tokens_match_reference(name, mode):
    model = load_trunk(name)
    assert model.cfg.pos_embed_resize == mode
    io = load_npz(f"{name}_io.npz")
    fwd = nnx.jit(lambda m, x: m(x))
    for k in (0, 1):
        out = fwd(model, jnp.asarray(io[f"input{k}"].transpose(0, 2, 3, 1)))
        np.testing.assert_allclose(out.cls, io[f"input{k}_x_norm_clstoken"], rtol=0, atol=ATOL)
        np.testing.assert_allclose(out.patches, io[f"input{k}_x_norm_patchtokens"], rtol=0, atol=ATOL)
        if model.cfg.num_register_tokens:
            np.testing.assert_allclose(out.registers, io[f"input{k}_x_norm_regtokens"], rtol=0, atol=ATOL)
        else:
            assert out.registers.shape[1] == 0


def test_chunked_hub_keys_convert():
    sd = to_numpy(read_pth(str(FIXTURES / "dinov2_tiny_noreg.pth")))
    chunked = {k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k: v for k, v in sd.items()}
    assert from_dinov2_hub(chunked).keys() == from_dinov2_hub(sd).keys()


def test_trunk_rejects_non_multiple_sizes():
    model = load_trunk("dinov2_tiny_noreg")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(jnp.zeros((1, 30, 28, 3)))
