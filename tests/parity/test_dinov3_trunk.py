"""The DINOv3 trunk: parity with Meta's reference on two golden fixtures, and its behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_adapter.pretrained import load_checkpoint as load_pretrained, save_pretrained
from jax_adapter.errors import ConfigError, InputError
from jax_adapter.models.dinov3 import DinoV3, DinoV3Config
from jax_adapter.nn.rope import rope_coords, rope_periods
from tests.helpers import (dinov3_config as fixture_config, dinov3_trunk as load_fixture_trunk, load_meta_trunk,
                           load_npz, new_dinov3_trunk as new_trunk, read_state_dict as read_meta_state_dict,
                           rel_err)

# Outputs are LayerNorm-ed tokens, O(1); a faithful float32 port lands within 1e-4 absolute.
ATOL = 1e-4
FIXTURES = ("dinov3_tiny_mlp", "dinov3_tiny_swiglu64")

# Jitted entry points: op-by-op execution of a whole trunk is slow on CPU.
fwd = nnx.jit(lambda m, x: m(x))
features = nnx.jit(lambda m, x, masks=None: m.forward_features(x, masks))


def intermediates(model, x, indices, norm=True):
    return nnx.jit(lambda m, x: m.intermediates(x, indices, norm=norm))(model, x)


@pytest.fixture(scope="module")
def trunks():
    return {name: load_fixture_trunk(name) for name in FIXTURES}


@pytest.fixture(scope="module")
def ios():
    return {name: load_npz(f"{name}_io.npz") for name in FIXTURES}


def nhwc(a):
    return jnp.asarray(a.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("name", FIXTURES)
def test_tokens_and_intermediates_match_reference(trunks, ios, name, k):
    model, io = trunks[name], ios[name]
    x = nhwc(io[f"input{k}"])
    out, prenorm = features(model, x)
    np.testing.assert_allclose(out.cls, io[f"input{k}_x_norm_clstoken"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(out.registers, io[f"input{k}_x_storage_tokens"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(out.patches, io[f"input{k}_x_norm_patchtokens"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(prenorm, io[f"input{k}_x_prenorm"], rtol=0, atol=ATOL)
    inter = intermediates(model, x, (0, 2))
    hg, wg = model.grid(*x.shape[1:3])
    for (patches, cls), j in zip(inter, (0, 2)):
        assert patches.shape == (x.shape[0], hg, wg, model.cfg.embed_dim)
        np.testing.assert_allclose(patches.reshape(x.shape[0], hg * wg, -1), io[f"input{k}_block{j}_normed_patches"],
                                   rtol=0, atol=ATOL)
        np.testing.assert_allclose(cls, io[f"input{k}_block{j}_normed_cls"], rtol=0, atol=ATOL)


def test_call_is_forward_features_tokens(trunks, ios):
    model, io = trunks["dinov3_tiny_mlp"], ios["dinov3_tiny_mlp"]
    x = nhwc(io["input0"])
    out = fwd(model, x)
    np.testing.assert_array_equal(out.patches, features(model, x)[0].patches)
    assert out.registers.shape == (2, 4, 96)


def test_intermediates_without_norm_are_prenorm_tokens(trunks, ios):
    model, io = trunks["dinov3_tiny_swiglu64"], ios["dinov3_tiny_swiglu64"]
    x = nhwc(io["input0"])
    (patches, cls), = intermediates(model, x, [model.cfg.depth - 1], norm=False)
    np.testing.assert_allclose(patches.reshape(2, 24, -1), io["input0_x_prenorm"][:, 5:], rtol=0, atol=ATOL)
    np.testing.assert_allclose(cls, io["input0_x_prenorm"][:, 0], rtol=0, atol=ATOL)


@pytest.mark.parametrize("indices, match", [
    ([2, 0], "sorted and unique"), ([1, 1], "sorted and unique"), ([0, 4], r"in \[0, 4\)"),
    ([-1], r"in \[0, 4\)"), ([], "empty"), ([0.5], "integers"),
])
def test_intermediate_indices_are_validated(trunks, indices, match):
    model = trunks["dinov3_tiny_mlp"]
    with pytest.raises(ConfigError, match=match):
        model.intermediates(jnp.zeros((1, 32, 32, 3)), indices)


def test_stored_key_bias_is_ignored_and_query_bias_is_not():
    sd = read_meta_state_dict("dinov3_tiny_mlp")
    x = nhwc(load_npz("dinov3_tiny_mlp_io.npz")["input0"])
    base = fwd(load_meta_trunk(new_trunk(fixture_config("dinov3_tiny_mlp")), sd), x)
    d = 96
    for third, changes in ((1, False), (0, True)):
        perturbed = dict(sd)
        bias = sd["blocks.1.attn.qkv.bias"].copy()
        bias[third * d:(third + 1) * d] += 10.0
        perturbed["blocks.1.attn.qkv.bias"] = bias
        out = fwd(load_meta_trunk(new_trunk(fixture_config("dinov3_tiny_mlp")), perturbed), x)
        diff = float(jnp.abs(out.patches - base.patches).max())
        assert (diff > 1e-3) if changes else (diff == 0.0), (third, diff)


def test_loader_refuses_other_periods_and_bias_mask():
    sd = read_meta_state_dict("dinov3_tiny_mlp")
    other = new_trunk(fixture_config("dinov3_tiny_mlp", pos_embed_rope_base=10.0))
    with pytest.raises(ValueError, match="rope_embed.periods"):
        load_meta_trunk(other, sd)
    bad = dict(sd)
    bad["blocks.0.attn.qkv.bias_mask"] = np.ones_like(sd["blocks.0.attn.qkv.bias_mask"])
    with pytest.raises(ValueError, match="bias_mask"):
        load_meta_trunk(new_trunk(fixture_config("dinov3_tiny_mlp")), bad)


def test_rope_periods_and_coords():
    # Spec values for a 64-wide head: 100 ** (j / 16).
    p = rope_periods(64, base=100)
    assert p.shape == (16,) and p.dtype == np.float32
    np.testing.assert_allclose(p[[0, 1, 2, 3, 15]], [1.0, 1.3335, 1.7783, 2.3714, 74.9894], rtol=1e-4)
    np.testing.assert_allclose(rope_periods(128, base=100)[[1, 31]], [1.1548, 86.5964], rtol=1e-4)
    # min/max: geometric from min_period to max_period.
    mm = rope_periods(32, min_period=0.5, max_period=8.0)
    np.testing.assert_allclose(mm, 0.5 * 16.0 ** (np.arange(8) / 7), rtol=1e-6)
    with pytest.raises(ValueError):
        rope_periods(64, base=100, min_period=1, max_period=10)
    with pytest.raises(ValueError):
        rope_periods(64)
    # "separate": patch centres span (-1, 1) on each axis; y is column 0, row-major over the grid.
    c = np.asarray(rope_coords((2, 4), "separate"))
    np.testing.assert_allclose(c[:4, 0], -0.5)
    np.testing.assert_allclose(c[:4, 1], [-0.75, -0.25, 0.25, 0.75])
    # "max": both axes divided by the longer side, so the short axis does not reach the edges.
    np.testing.assert_allclose(np.asarray(rope_coords((2, 4), "max"))[::4, 0], [-0.75, -0.25])
    # The stored buffer of both fixtures equals the recomputed periods.
    for name in FIXTURES:
        np.testing.assert_allclose(read_meta_state_dict(name)["rope_embed.periods"],
                                   fixture_config(name).rope_periods(), rtol=1e-6)


def test_rope_is_deterministic_in_train_mode_unless_augment_is_asked_for():
    sd = read_meta_state_dict("dinov3_tiny_mlp")
    x = nhwc(load_npz("dinov3_tiny_mlp_io.npz")["input0"])
    model = load_meta_trunk(new_trunk(fixture_config("dinov3_tiny_mlp")), sd)
    ref = fwd(model, x).patches
    model.train()
    np.testing.assert_array_equal(fwd(model, x).patches, ref)
    aug = load_meta_trunk(new_trunk(fixture_config("dinov3_tiny_mlp", rope_augment=True)), sd)
    np.testing.assert_array_equal(fwd(aug, x).patches, ref)  # eval mode: no noise
    aug.train()
    a, b = fwd(aug, x).patches, fwd(aug, x).patches
    assert float(jnp.abs(a - ref).max()) > 1e-3 and float(jnp.abs(a - b).max()) > 1e-3
    aug.eval()
    np.testing.assert_array_equal(fwd(aug, x).patches, ref)


def test_any_size_uses_the_floor_grid(trunks):
    model = trunks["dinov3_tiny_mlp"]
    x = jax.random.normal(jax.random.key(1), (1, 70, 100, 3))
    assert model.grid(70, 100) == (4, 6)
    out = fwd(model, x)
    cropped = fwd(model, x[:, :64, :96])
    assert out.patches.shape == (1, 24, 96)
    np.testing.assert_array_equal(out.patches, cropped.patches)
    (patches, _), = intermediates(model, x, [3])
    assert patches.shape == (1, 4, 6, 96)
    assert fwd(model, jnp.zeros((1, 16, 31, 3))).patches.shape == (1, 1, 96)


@pytest.mark.parametrize("shape", [(1, 15, 64, 3), (1, 64, 8, 3)])
def test_too_small_images_are_refused(trunks, shape):
    with pytest.raises(InputError, match=f"{shape[1]}x{shape[2]}"):
        trunks["dinov3_tiny_mlp"](jnp.zeros(shape))


def test_nchw_images_are_refused(trunks):
    with pytest.raises(ValueError, match="channels last"):
        trunks["dinov3_tiny_mlp"](jnp.zeros((1, 3, 64, 64)))


def test_masks_replace_patch_tokens(trunks):
    model = trunks["dinov3_tiny_mlp"]
    x = jax.random.normal(jax.random.key(2), (1, 32, 48, 3))
    ref = fwd(model, x)
    none = features(model, x, jnp.zeros((1, 6), bool))[0]
    np.testing.assert_array_equal(none.patches, ref.patches)
    masked = features(model, x, jnp.ones((1, 6), bool))[0]
    assert float(jnp.abs(masked.patches - ref.patches).max()) > 1e-3
    with pytest.raises(InputError, match="masks"):
        model.forward_features(x, jnp.ones((1, 5), bool))


@pytest.mark.parametrize("name", FIXTURES)
def test_bfloat16_is_close_to_float32(ios, name):
    # bfloat16 matmuls (f32 residual stream, LayerNorm statistics, softmax and RoPE): the outputs
    # (magnitudes up to ~5) stay within 2% of their largest value; measured ~1%.
    model = load_fixture_trunk(name, dtype="bfloat16")
    io = ios[name]
    out, prenorm = features(model, nhwc(io["input2"]))
    assert out.patches.dtype == jnp.bfloat16 and prenorm.dtype == jnp.float32
    assert rel_err(out.patches.astype(jnp.float32), io["input2_x_norm_patchtokens"]) < 0.02
    assert rel_err(out.cls.astype(jnp.float32), io["input2_x_norm_clstoken"]) < 0.02
    assert rel_err(prenorm, io["input2_x_prenorm"]) < 0.02
    (patches, _), = intermediates(model, nhwc(io["input2"]), [2])
    assert rel_err(patches.reshape(1, 196, -1).astype(jnp.float32), io["input2_block2_normed_patches"]) < 0.02


def test_jit_through_split_and_merge(trunks):
    model = trunks["dinov3_tiny_swiglu64"]
    x = jax.random.normal(jax.random.key(3), (2, 48, 64, 3))
    graphdef, state = nnx.split(model)
    pure = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    out = pure(state, x)
    ref = fwd(model, x)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_local_cls_norm_is_kept_and_unused(trunks, ios):
    model = trunks["dinov3_tiny_swiglu64"]
    assert model.local_cls_norm.scale.shape == (128,)
    x = nhwc(ios["dinov3_tiny_swiglu64"]["input0"])
    ref = fwd(model, x)
    model.local_cls_norm.scale[...] = model.local_cls_norm.scale[...] * 3.0
    try:
        np.testing.assert_array_equal(fwd(model, x).cls, ref.cls)
    finally:
        model.local_cls_norm.scale[...] = model.local_cls_norm.scale[...] / 3.0


def test_untied_cls_norm_normalises_the_prefix():
    cfg = fixture_config("dinov3_tiny_mlp", untie_cls_and_patch_norms=True)
    model = load_meta_trunk(new_trunk(cfg), {**read_meta_state_dict("dinov3_tiny_mlp"),
                                            "cls_norm.weight": np.ones(96, np.float32),
                                            "cls_norm.bias": np.full(96, 5.0, np.float32)})
    x = jax.random.normal(jax.random.key(4), (1, 32, 32, 3))
    out = fwd(model, x)
    # cls and storage go through cls_norm (bias 5), the patches through norm (bias 0).
    assert abs(float(out.cls.mean()) - 5.0) < 1e-3 and abs(float(out.registers.mean()) - 5.0) < 1e-3
    assert abs(float(out.patches.mean())) < 1e-3
    (patches, cls), = intermediates(model, x, [0])
    assert abs(float(cls.mean()) - 5.0) < 1e-3 and abs(float(patches.mean())) < 1e-3


def test_checkpoint_round_trip(tmp_path, trunks):
    model = trunks["dinov3_tiny_swiglu64"]
    save_pretrained(model, str(tmp_path / "ckpt"))
    back = load_pretrained(str(tmp_path / "ckpt"))
    assert type(back) is DinoV3 and back.cfg == model.cfg
    x = jax.random.normal(jax.random.key(5), (1, 32, 32, 3))
    np.testing.assert_array_equal(fwd(back, x).patches, fwd(model, x).patches)


# --- config -----------------------------------------------------------------------------------

def test_config_dict_round_trip_and_replace():
    cfg = fixture_config("dinov3_tiny_swiglu64")
    assert DinoV3Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.ffn_hidden == 256 and cfg.head_dim == 32 and cfg.norm_eps == 1e-5
    assert cfg.replace(dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ConfigError, match="unknown DinoV3Config fields: bogus"):
        DinoV3Config.from_dict({"bogus": 1})


@pytest.mark.parametrize("changes, field", [
    ({"ffn_layer": "swiglu7"}, "ffn_layer"),
    ({"norm_layer": "rmsnorm"}, "norm_layer"),
    ({"pos_embed_rope_dtype": "bf16"}, "pos_embed_rope_dtype"),
    ({"pos_embed_rope_normalize_coords": "none"}, "pos_embed_rope_normalize_coords"),
    ({"embed_dim": 96, "num_heads": 16}, "embed_dim"),
    ({"in_chans": 4}, "in_chans"),
    ({"pos_embed_rope_min_period": 1.0, "pos_embed_rope_max_period": 10.0}, "pos_embed_rope_base"),
    ({"pos_embed_rope_base": None}, "pos_embed_rope_base"),
    ({"pos_embed_rope_rescale_coords": 0.5}, "pos_embed_rope_rescale_coords"),
    ({"dtype": "int8"}, "dtype"),
])
def test_config_refuses_what_the_port_does_not_support(changes, field):
    with pytest.raises(ConfigError, match=field):
        DinoV3Config(**changes)


def test_min_max_periods_config():
    cfg = DinoV3Config(pos_embed_rope_base=None, pos_embed_rope_min_period=0.5, pos_embed_rope_max_period=50.0)
    p = cfg.rope_periods()
    np.testing.assert_allclose([p[0], p[-1]], [0.5, 50.0], rtol=1e-6)


@pytest.mark.parametrize("variant, align", [("vits16plus", 8), ("vitl16plus", 8), ("vith16plus", 8), ("vit7b16", 64)])
def test_swiglu_widths_of_the_hub(variant, align):
    # The hidden widths the spec lists for the hub's SwiGLU models.
    want = {"vits16plus": 1536, "vitl16plus": 4096, "vith16plus": 5120, "vit7b16": 8192}[variant]
    assert DinoV3Config.preset(f"dinov3_{variant}").ffn_hidden == want
