"""DinoAdapter behaviour beyond fixture parity: any size under jit, presets, bad input, init."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_adapter import AdapterConfig, DinoAdapter, compute_geometry
from jax_adapter.nn.deform_attn import MSDeformAttn
from tests.helpers import FIXTURES

TINY = AdapterConfig(**json.loads((FIXTURES / "seed_adapter_tiny.json").read_text()))


@pytest.fixture(scope="module")
def tiny():
    return DinoAdapter(TINY, rngs=nnx.Rngs(0))


def _jit_forward(model):
    graph, state = nnx.split(model)

    @jax.jit
    def forward(state, images):
        return nnx.merge(graph, state)(images)

    return lambda images: forward(state, images)


@pytest.mark.parametrize("size", [(256, 704), (37, 53), (14, 14), (64, 64), (224, 230)])
def test_any_size_jits_with_geometry_shapes(tiny, size):
    h, w = size
    geom = compute_geometry(h, w)
    out = _jit_forward(tiny)(jnp.ones((1, h, w, 3), jnp.float32))
    assert [f.shape[1:3] for f in out.features] == list(geom.output_sizes)
    assert out.vit.shape == (1, *geom.vit_output_size, TINY.embed_dim)
    assert all(bool(jnp.isfinite(f).all()) for f in out.features)


@pytest.mark.slow
def test_add_vit_feature_is_defined_for_patch_14():
    model = DinoAdapter(TINY.replace(add_vit_feature=True), rngs=nnx.Rngs(0))
    base = DinoAdapter(TINY, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 61, 83, 3))
    a, b = model(x), base(x)
    assert [f.shape for f in a.features] == [f.shape for f in b.features]
    # Same weights, so the difference is exactly the added ViT maps.
    assert all(float(jnp.abs(fa - fb).max()) > 1e-3 for fa, fb in zip(a.features, b.features))


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((61, 83, 3), np.float32), "rank 3"),
        (np.zeros((1, 3, 61, 83), np.float32), "3 channels last"),
        (np.zeros((1, 61, 83, 4), np.float32), "3 channels last"),
        (np.zeros((1, 61, 83, 3), np.uint8), "floating point"),
        (np.zeros((1, 15, 29, 3), np.float32), "too small"),
        (np.zeros((0, 61, 83, 3), np.float32), "empty"),
    ],
)
def test_bad_images_raise_value_error(tiny, images, match):
    with pytest.raises(ValueError, match=match):
        tiny(images)
    with pytest.raises(ValueError, match=match):
        _jit_forward(tiny)(images)


def test_train_and_eval_modes(tiny):
    tiny.train()
    assert not tiny.norm1.use_running_average and not tiny.spm.stem[1].use_running_average
    tiny.eval()
    assert tiny.norm1.use_running_average


def test_msdeformattn_init_matches_pytorch_reset_parameters():
    attn = MSDeformAttn(32, n_levels=2, n_heads=8, n_points=3, rngs=nnx.Rngs(0))
    bias = np.asarray(attn.sampling_offsets.bias[...]).reshape(8, 2, 3, 2)
    np.testing.assert_allclose(bias[0, :, :, 0], [[1, 2, 3]] * 2, atol=1e-6)  # head 0: +x
    np.testing.assert_allclose(bias[0, :, :, 1], 0, atol=1e-6)
    np.testing.assert_allclose(bias[1, 1, 2], [3, 3], atol=1e-6)  # 45 degrees, scaled to max 1
    np.testing.assert_allclose(bias[2, 0, 0], [0, 1], atol=1e-6)  # 90 degrees
    assert np.all(np.asarray(attn.sampling_offsets.kernel[...]) == 0)
    assert np.all(np.asarray(attn.attention_weights.kernel[...]) == 0)
    assert np.all(np.asarray(attn.attention_weights.bias[...]) == 0)


def test_unknown_preset_and_config_fields():
    with pytest.raises(ValueError, match="unknown model"):
        AdapterConfig.preset("dinov2_vitx14")
    with pytest.raises(ValueError, match="unknown DinoV2AdapterConfig fields: bogus"):
        AdapterConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="interaction_indexes"):
        AdapterConfig(interaction_indexes=((0, 2), (4, 5)))


def test_vitb_preset_is_the_seed_detector_config():
    # The configuration trained in the detector (SPEC section 5), written out field by field.
    seed = dict(num_heads=12, embed_dim=768, depth=12, pretrain_size=518, patch_size=14, mlp_ratio=4,
                conv_inplane=64, n_points=4, deform_num_heads=6, init_values=0.0,
                interaction_indexes=((0, 2), (3, 5), (6, 8), (9, 11)), with_cffn=True, cffn_ratio=0.25,
                deform_ratio=1.0, add_vit_feature=False, use_extra_extractor=True)
    cfg = AdapterConfig.preset("dinov2_vitb14")
    assert {k: getattr(cfg, k) for k in seed} == seed


def _first_use(eqns, var) -> int:
    return next(i for i, e in enumerate(eqns) if any(v is var for v in e.invars))


@pytest.mark.parametrize("family", ["dinov2", "dinov3"])
def test_fc1_runs_after_the_interactions(family):
    """``c1 = spm.fc1(stem map)`` is formed after the interactions, behind an optimization barrier
    on the final level tokens: XLA may not hold the D-channel stride-4 map through the trunk (on a
    TPU its scheduler did, which set the adapter forward's peak)."""
    import jax_adapter
    model = jax_adapter.create_model(f"{family}_tiny_adapter")
    graph, state = nnx.split(model)
    leaves = nnx.to_flat_state(state)
    paths = ["/".join(map(str, path)) for path, _ in leaves]
    jaxpr = jax.make_jaxpr(lambda leaves, x: nnx.merge(graph, nnx.from_flat_state(leaves))(x))(
        leaves, jnp.zeros((1, 64, 96, 3))).jaxpr
    invars = dict(zip(paths, jaxpr.invars))
    eqns = jaxpr.eqns
    barriers = [i for i, e in enumerate(eqns) if e.primitive.name == "optimization_barrier"]
    assert len(barriers) == 1, barriers
    last = len(model.interactions) - 1
    last_extractor = next(p for p in paths if p.startswith(f"interactions/{last}/extractor/"))
    assert _first_use(eqns, invars[last_extractor]) < barriers[0] < _first_use(eqns, invars["spm/fc1/kernel"])
