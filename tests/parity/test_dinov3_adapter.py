"""The DINOv3 adapter: the tiny fixture against upstream's outputs (eval mode), the pad-and-crop
contract at sizes upstream refuses, the pad-to-32 geometry, the config, and the frozen trunk."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_adapter.models import load_config_file
from jax_adapter.errors import ConfigError, InputError
from jax_adapter.models.dinov3 import DinoV3AdapterConfig, DinoV3Config, default_interaction_indexes
from jax_adapter.nn.geometry import compute_geometry, dinov3_geometry, reference_points
from tests.helpers import FIXTURES, dinov3_adapter as fixture_model, dinov3_adapter_config as fixture_config, load_npz

# Forward outputs are O(1..10); a faithful float32 port lands within 1e-4 absolute.
ATOL = 1e-4
STRIDES = (4, 8, 16, 32)


@pytest.fixture(scope="module")
def model():
    return fixture_model()


@pytest.fixture(scope="module")
def forward(model):
    graph, state = nnx.split(model)
    jitted = jax.jit(lambda state, x: nnx.merge(graph, state)(x))
    return lambda images: jitted(state, jnp.asarray(images))


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("k", [0, 1])
def test_fixture_outputs_match_upstream(forward, k):
    io = load_npz("dinov3_adapter_tiny_io.npz")
    x = io[f"input{k}"].transpose(0, 2, 3, 1)
    out = forward(x)
    b, h, w, _ = x.shape
    for i, f in enumerate(out.features):
        ref = io[f"input{k}_f{i + 1}"]
        assert nchw(f).shape == ref.shape
        np.testing.assert_allclose(nchw(f), ref, rtol=0, atol=ATOL, err_msg=f"f{i + 1}")
    # The ViT map: the last tapped block (final norm applied) on the patch grid.
    assert out.vit.shape == (b, h // 16, w // 16, 96)


@pytest.mark.parametrize("size", [(70, 100), (61, 83)])
def test_other_sizes_are_the_zero_padded_image_cropped(forward, size):
    # The contract at sizes upstream refuses: upstream's math on the image zero-padded (bottom,
    # right) to the next multiple of 32, f1..f4 cropped to h//4..h//32, the ViT map to h//16.
    h, w = size
    x = np.random.default_rng(h * w).standard_normal((1, h, w, 3)).astype(np.float32)
    hp, wp = -(-h // 32) * 32, -(-w // 32) * 32
    padded = np.zeros((1, hp, wp, 3), np.float32)
    padded[:, :h, :w] = x
    out, ref = forward(x), forward(padded)
    for i, (f, r, s) in enumerate(zip(out.features, ref.features, STRIDES)):
        assert f.shape == (1, h // s, w // s, 96)
        assert r.shape == (1, hp // s, wp // s, 96)
        np.testing.assert_allclose(np.asarray(f), np.asarray(r)[:, :h // s, :w // s], rtol=0, atol=1e-5,
                                   err_msg=f"f{i + 1}")
    assert out.vit.shape == (1, h // 16, w // 16, 96)
    np.testing.assert_allclose(np.asarray(out.vit), np.asarray(ref.vit)[:, :h // 16, :w // 16], rtol=0, atol=1e-5)


# Odd, prime, tiny and multiple-of-32 sizes (518: DINOv2's native size, refused upstream).
SIZES = [(32, 32), (33, 65), (61, 83), (97, 101), (127, 31 * 32 + 1), (518, 518), (64, 96), (256, 704),
         (32, 1009)]


@pytest.mark.parametrize("size", SIZES)
def test_geometry_pads_to_32_with_exact_halvings(size):
    h, w = size
    g = dinov3_geometry(h, w)
    hp, wp = g.padded
    assert hp % 32 == 0 and wp % 32 == 0 and 0 <= hp - h < 32 and 0 <= wp - w < 32
    assert g.patch_size == 16 and g.pad_to == 32
    assert g.spm_shapes == tuple((hp // s, wp // s) for s in STRIDES)
    # The ViT grid is c3, the extractor's value level.
    assert g.vit_grid == g.spm_shapes[2] == (hp // 16, wp // 16)
    if (hp, wp) == (h, w):
        assert not g.needs_crop and g.output_sizes == g.spm_shapes
    else:
        assert g.needs_crop and g.output_sizes == tuple((h // s, w // s) for s in STRIDES)
    assert g.vit_output_size == (h // 16, w // 16)
    # Queries: upstream's floor-derived reference points of the padded canvas, one per SPM token.
    floor_levels = tuple((hp // s, wp // s) for s in (8, 16, 32))
    assert g.level_shapes == floor_levels
    np.testing.assert_array_equal(g.extractor_reference_points, reference_points(floor_levels))
    assert g.extractor_reference_points.shape == (g.num_spm_tokens, 2)
    assert g.level_starts == (0, g.level_lengths[0], g.level_lengths[0] + g.level_lengths[1])


def test_geometry_of_518_and_describe():
    g = dinov3_geometry(518, 518)
    assert g.padded == (544, 544)
    assert g.output_sizes == ((129, 129), (64, 64), (32, 32), (16, 16))
    assert "multiple of 32" in g.describe()
    # The DINOv2 policy is unchanged: pad to the patch size, ceil-halving chain.
    g2 = compute_geometry(518, 518, 14)
    assert g2.padded == (518, 518) and g2.pad_to == 14 and "multiple of" not in g2.describe()


@pytest.mark.parametrize("size", [(31, 64), (64, 31), (16, 16), (1, 1), (31, 1000)])
def test_sizes_with_empty_outputs_are_refused(size):
    with pytest.raises(InputError, match="too small.*f4.*multiple of 32"):
        dinov3_geometry(*size)


@pytest.mark.parametrize("bad", [(0, 32), (-32, 32), (32.0, 32), (True, 32)])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ValueError):
        dinov3_geometry(*bad)


def test_model_refuses_small_images_before_running(model):
    with pytest.raises(InputError, match="too small"):
        model(jnp.zeros((1, 31, 64, 3)))
    with pytest.raises(ValueError, match="channels"):
        model(jnp.zeros((1, 3, 64, 64)))


@pytest.mark.slow
def test_trunk_stays_frozen_and_in_eval_mode(model):
    """Differentiating every parameter gives exactly zero on the trunk (it runs under
    stop_gradient), and train mode does not reach the trunk."""
    graph, state = nnx.split(model)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 64, 96, 3)), jnp.float32)

    @jax.jit
    def grads(state):
        m = nnx.merge(graph, state)
        m.train()

        def loss(m):
            out = m(x)
            return sum(jnp.sum(f * f) for f in out.features) + jnp.sum(out.vit)

        return nnx.grad(loss)(m)

    flat = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads(state))}
    trunk = {k: v for k, v in flat.items() if k.startswith("backbone.")}
    adapter = {k: v for k, v in flat.items() if not k.startswith("backbone.")}
    assert len(trunk) > 50 and len(adapter) > 100
    assert all(not v.any() for v in trunk.values()), [k for k, v in trunk.items() if v.any()]
    assert all(np.isfinite(v).all() for v in adapter.values())
    assert np.abs(adapter["interactions.3.extractor.attn.value_proj.kernel"]).max() > 0

    m = nnx.merge(graph, state)
    m.train()
    assert m.spm.stem[1].use_running_average is False
    assert m.backbone.rope_embed.deterministic is True


# ---- config and presets ----

def test_fixture_config_and_tiny_preset():
    cfg = fixture_config()
    assert cfg == DinoV3AdapterConfig.preset("dinov3_tiny_adapter")
    assert isinstance(load_config_file(str(FIXTURES / "dinov3_adapter_tiny.json")), DinoV3AdapterConfig)
    assert isinstance(load_config_file(str(FIXTURES / "dinov3_tiny_mlp.json")), DinoV3Config)
    assert not isinstance(load_config_file(str(FIXTURES / "seed_adapter_tiny.json")),
                          (DinoV3AdapterConfig, DinoV3Config))
    assert (cfg.embed_dim, cfg.depth, cfg.patch_size) == (96, 4, 16)
    assert DinoV3AdapterConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("name,indexes,dim", [
    ("dinov3_vits16_adapter", (2, 5, 8, 11), 384), ("dinov3_vits16plus_adapter", (2, 5, 8, 11), 384),
    ("dinov3_vitb16_adapter", (2, 5, 8, 11), 768), ("dinov3_vitl16_adapter", (4, 11, 17, 23), 1024),
    ("dinov3_vitl16plus_adapter", (4, 11, 17, 23), 1024), ("dinov3_vith16plus_adapter", (7, 15, 23, 31), 1280),
    ("dinov3_vit7b16_adapter", (9, 19, 29, 39), 4096),
])
def test_presets_tap_upstreams_blocks_with_upstreams_defaults(name, indexes, dim):
    cfg = DinoV3AdapterConfig.preset(name)
    assert cfg.interaction_indexes == indexes and cfg.embed_dim == dim
    assert cfg.backbone == DinoV3Config.preset(name[:-len("_adapter")])
    assert (cfg.conv_inplane, cfg.n_points, cfg.deform_num_heads, cfg.drop_path_rate, cfg.cffn_ratio,
            cfg.deform_ratio, cfg.add_vit_feature, cfg.use_extra_extractor, cfg.with_cp) == \
        (64, 4, 16, 0.3, 0.25, 0.5, True, True, True)
    assert default_interaction_indexes(cfg.depth) == indexes


@pytest.mark.parametrize("changes,match", [
    ({"interaction_indexes": [0, 1, 2]}, "exactly 4"),
    ({"interaction_indexes": [0, 1, 2, 3, 3]}, "exactly 4"),
    ({"interaction_indexes": [3, 1, 2, 0]}, "sorted"),
    ({"interaction_indexes": [0, 1, 1, 3]}, "unique"),
    ({"interaction_indexes": [0, 1, 2, 4]}, "depth=4"),
    ({"interaction_indexes": [-1, 1, 2, 3]}, "sorted"),
    ({"interaction_indexes": [0, 1, 2, 3.0]}, "ints"),
    ({"deform_num_heads": 5}, "divisible by deform_num_heads"),
    ({"backbone": None}, "needs 'backbone'"),
    ({"trunk_dtype": "float64"}, "trunk_dtype"),
])
def test_config_validation(changes, match):
    d = fixture_config().to_dict()
    d.update(changes)
    with pytest.raises(ConfigError, match=match):
        DinoV3AdapterConfig.from_dict(d)


def test_config_trunk_dtype_sets_the_trunks_dtype():
    cfg = fixture_config(trunk_dtype="bfloat16", param_dtype="bfloat16")
    assert (cfg.backbone.dtype, cfg.backbone.param_dtype) == ("bfloat16", "bfloat16")
    d = fixture_config().to_dict()
    d["backbone"] = dict(d["backbone"], dtype="bfloat16")
    with pytest.raises(ConfigError, match="trunk_dtype"):
        DinoV3AdapterConfig.from_dict(d)
    d["backbone"]["patch_size"] = 14
    d["backbone"].pop("dtype")
    with pytest.raises(ConfigError, match="patch-16"):
        DinoV3AdapterConfig.from_dict(d)


def test_save_and_load_pretrained(model, tmp_path):
    from jax_adapter import load_pretrained, save_pretrained
    from jax_adapter.models.build import kind_of

    assert kind_of(model) == "dinov3_adapter"
    save_pretrained(model, str(tmp_path / "ckpt"))
    loaded = load_pretrained(str(tmp_path / "ckpt"))
    assert type(loaded) is type(model) and loaded.cfg == model.cfg
    ours = dict(nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))
    theirs = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Any(nnx.Param, nnx.BatchStat))))
    assert set(ours) == set(theirs)
    for k in ours:
        np.testing.assert_array_equal(np.asarray(ours[k][...]), np.asarray(theirs[k][...]), err_msg=str(k))


# The tiny one, ViT-S and the 7B (SwiGLU-64, no qkv bias): tracing each larger one takes seconds.
@pytest.mark.parametrize("name", ["dinov3_tiny_adapter", "dinov3_vits16_adapter", "dinov3_vit7b16_adapter"])
def test_every_dinov3_adapter_preset_traces_at_518x518(name):
    # Abstractly (no weights, no compute): 518 is not a multiple of 32, so the outputs are the
    # 544x544 canvas's cropped to 518 // s.
    from jax_adapter import DinoV3Adapter

    cfg = DinoV3AdapterConfig.preset(name)
    model = nnx.eval_shape(lambda: DinoV3Adapter(cfg, rngs=nnx.Rngs(0)))
    graph, state = nnx.split(model)
    out = jax.eval_shape(lambda s, x: nnx.merge(graph, s)(x), state,
                         jax.ShapeDtypeStruct((1, 518, 518, 3), jnp.float32))
    d = cfg.embed_dim
    assert [f.shape for f in out.features] == [(1, 518 // s, 518 // s, d) for s in STRIDES]
    assert out.vit.shape == (1, 32, 32, d)
