"""The registry: every registered architecture builds and traces, every registered weight is
well formed, and the names mean the same thing in every family."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_adapter
from jax_adapter import registry
from jax_adapter.errors import ConfigError, FetchError
from jax_adapter.models.base import trunk_names
from jax_adapter.models.dinov3.presets import HUB_VARIANTS
from jax_adapter.preprocessing import STATS

# Parameter counts of the DINOv2 hub state dicts; they include mask_token [1, D], which we drop.
DINOV2_HUB_PARAMS = {"s": 22_056_576, "b": 86_580_480, "l": 304_368_640, "g": 1_136_480_768}
# Published DINOv3 sizes (model card, millions, rounded down: 21M for 21.6M); ViT-L+ has none.
DINOV3_PUBLISHED_M = {"vits16": 21, "vits16plus": 29, "vitb16": 86, "vitl16": 300, "vitl16_sat": 300,
                      "vith16plus": 840, "vit7b16": 6716}


def _abstract(name: str):
    kind = registry.kind(registry.architecture(name).kind)
    cfg = registry.config_of(name)
    return kind, cfg, nnx.eval_shape(lambda: kind.model(cfg, rngs=nnx.Rngs(0)))


def _trunk_param_count(model, cls) -> int:
    names = trunk_names(cls)
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return sum(int(np.prod(v.shape)) for k, v in flat.items() if k.split(".")[0] in names)


def _dinov3_param_count(cfg) -> int:
    """A DINOv3 trunk's parameter count from its architecture (no buffers)."""
    d, h, r = cfg.embed_dim, cfg.ffn_hidden, cfg.n_storage_tokens
    n = cfg.patch_size ** 2 * 3 * d + d  # patch_embed.proj
    n += d + r * d + d  # cls_token, storage_tokens, mask_token
    block = 2 * 2 * d  # norm1, norm2
    block += 3 * d * d + (3 * d if cfg.qkv_bias else 0) + d * d + d  # qkv, proj
    block += 2 * d  # ls1, ls2
    block += (2 * d * h + h + d) if cfg.ffn_layer == "mlp" else (3 * d * h + 2 * h + d)
    n += cfg.depth * block + 2 * d  # blocks, norm
    n += 2 * d if cfg.untie_global_and_local_cls_norm else 0
    return n


def _trace(kind, cfg, model):
    """The output shapes of a forward, traced (adapters take any size; trunks multiples of their
    patch: 112x224 is one of 14 and of 16)."""
    graph, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, 64, 96, 3) if kind.role == "adapter" else (2, 112, 224, 3), jnp.float32)
    out = jax.eval_shape(lambda s, x: nnx.merge(graph, s)(x), state, x)
    d = cfg.embed_dim
    if kind.role == "adapter":
        assert [f.shape for f in out.features] == [(2, 16, 24, d), (2, 8, 12, d), (2, 4, 6, d), (2, 2, 3, d)]
    else:
        n = cfg.num_prefix_tokens
        assert out.patches.shape[-1] == d and out.cls.shape == (2, d) and out.registers.shape == (2, n - 1, d)


@pytest.mark.parametrize("name", registry.list_models())
def test_every_model_builds_and_traces(name):
    kind, cfg = registry.kind(registry.architecture(name).kind), registry.config_of(name)
    if kind.role == "adapter":
        # The adapter's trunk is its trunk architecture (the parts that shape the weights).
        trunk_cfg = registry.config_of(registry.architecture(name).trunk)
        shape = ("embed_dim", "depth", "num_heads", "patch_size", "ffn_hidden")
        assert [getattr(cfg.trunk_config(), k) for k in shape] == [getattr(trunk_cfg, k) for k in shape]
        if cfg.depth > 12:
            # Building (10-30 s on 2 cores) and tracing a deep adapter checks nothing that its
            # trunk's test and the depth-12 adapters do not.
            return
    kind, cfg, model = _abstract(name)
    assert registry.kind_of_model(model) is kind and registry.kind_of_config(cfg) is kind
    # Tracing a deep trunk's forward takes 10-30 s on 2 cores and checks nothing the depth-12
    # models do not: the deep ones are built and counted only.
    if cfg.depth <= 12:
        _trace(kind, cfg, model)
    d = cfg.embed_dim
    if kind.role == "adapter":
        trunk_cls = type(model).TRUNK_CLASS
        trunk_model = model if not type(model).TRUNK_PATH else getattr(model, type(model).TRUNK_PATH[0])
    else:
        trunk_cls, trunk_model = type(model), model
    # The trunk's parameter groups cover the trunk: every top-level name it holds is grouped.
    held = {str(p[0]) for p, _ in nnx.to_flat_state(nnx.state(trunk_model, nnx.Param))}
    if kind.role == "trunk" or type(model).TRUNK_PATH:
        assert held <= set(trunk_names(trunk_cls)), held - set(trunk_names(trunk_cls))
    # Published sizes of the hub trunks.
    m = re.fullmatch(r"dinov2_vit([sblg])14(_reg)?", name)
    if m:
        regs = 4 * d if m.group(2) else 0
        assert _trunk_param_count(model, trunk_cls) == DINOV2_HUB_PARAMS[m.group(1)] - d + regs
    m = re.fullmatch(r"dinov3_(.+)", name)
    if m and m.group(1) in HUB_VARIANTS:
        count = _trunk_param_count(model, trunk_cls)
        assert count == _dinov3_param_count(cfg)
        if m.group(1) in DINOV3_PUBLISHED_M:
            want = DINOV3_PUBLISHED_M[m.group(1)]
            assert abs(count / 1e6 - want) / want < 0.03, count


@pytest.mark.parametrize("name", registry.list_pretrained())
def test_every_weight_is_named_hashed_and_normalised(name):
    from jax_adapter.convert import formats

    w = registry.weights(name)
    arch = registry.architecture(w.architecture)
    assert w.name == name and w.name.startswith(arch.name + ".") and re.fullmatch(r"[a-z0-9]+", w.tag)
    assert registry.kind(arch.kind).role == "trunk"
    assert w.source_format in formats.names()
    if w.sha256 is not None:
        # The hash prefix is the one in the upstream file name (torch.hub's convention).
        assert re.fullmatch(r"[0-9a-f]{8,64}", w.sha256) and w.file_name.endswith(f"-{w.sha256}.pth")
    else:
        assert registry.kind(arch.kind).family == "dinov2"  # upstream publishes no hash there
    assert (tuple(w.mean), tuple(w.std)) in STATS.values()
    assert (w.mean, w.std) == (STATS["sat"] if w.tag == "sat493m" else STATS["imagenet"])
    assert w.license
    if w.url is None:
        assert w.gated and "signed URL" in w.gated
    else:
        assert w.url.startswith("https://") and w.url.endswith("/" + w.file_name) and not w.gated
    assert registry.find_weights(w.file_name) == w and registry.find_weights(f"https://x/{w.file_name}?sig=1") == w


def test_names_mean_the_same_in_every_family():
    for family in ("dinov2", "dinov3"):
        trunks = registry.list_models(family=family, role="trunk")
        adapters = registry.list_models(family=family, role="adapter")
        assert trunks and adapters
        assert all(registry.architecture(a).trunk in trunks and a == registry.architecture(a).trunk + "_adapter"
                   for a in adapters)
        assert all(registry.kind(registry.architecture(t).kind).role == "trunk" for t in trunks)
    assert registry.list_models("dinov3_vitl16*", role="adapter") == ["dinov3_vitl16_adapter",
                                                                      "dinov3_vitl16_sat_adapter",
                                                                      "dinov3_vitl16plus_adapter"]
    assert registry.list_pretrained("*sat493m") == ["dinov3_vitl16_sat.sat493m", "dinov3_vit7b16.sat493m"]
    assert registry.list_pretrained("dinov3*", include_gated=False) == []
    # Earlier names resolve.
    assert registry.architecture("tiny").name == "dinov2_tiny_adapter"
    assert registry.weights("dinov3_vit7b16_sat").name == "dinov3_vit7b16.sat493m"
    assert registry.weights("dinov3_vitl16.sat493m").architecture == "dinov3_vitl16_sat"
    assert registry.kind("adapter").name == "dinov2_adapter"
    assert registry.weights_of("dinov2_vitb14_adapter")[0].name == "dinov2_vitb14.lvd142m"


def test_config_lookup_across_roles_and_families():
    from jax_adapter import DinoV2AdapterConfig, DinoV2Config, DinoV3AdapterConfig, DinoV3Config

    # A trunk name asked for as an adapter gives its adapter, and the other way round.
    assert DinoV2AdapterConfig.preset("dinov2_vitb14") == registry.config_of("dinov2_vitb14_adapter")
    assert DinoV2Config.preset("dinov2_vitb14_adapter") == registry.config_of("dinov2_vitb14")
    assert DinoV3AdapterConfig.preset("dinov3_vits16_adapter").backbone == DinoV3Config.preset("dinov3_vits16")
    with pytest.raises(ConfigError, match=r"is a DinoV2Config \(dinov2 trunk\), not a DinoV3Config"):
        DinoV3Config.preset("dinov2_vitb14")
    with pytest.raises(ConfigError, match=r"is a DinoV3AdapterConfig \(dinov3 adapter\), not a DinoV2AdapterConfig"):
        DinoV2AdapterConfig.preset("dinov3_vits16_adapter")
    with pytest.raises(ConfigError, match="unknown model 'dinov2_vitx14'"):
        DinoV2AdapterConfig.preset("dinov2_vitx14")
    with pytest.raises(ConfigError, match="registered twice"):
        registry.register_model("dinov2_vits14", "dinov2", lambda: None)


def test_create_model_random_and_from_a_weights_file(tmp_path, monkeypatch, fixtures_dir):
    monkeypatch.setenv("JAX_ADAPTER_CACHE", str(tmp_path / "cache"))
    model = jax_adapter.create_model("dinov2_tiny_adapter", with_cp=True)
    assert isinstance(model, jax_adapter.DinoV2Adapter) and model.cfg.with_cp
    assert model.spm.stem[1].use_running_average  # eval mode
    trunk = jax_adapter.create_model("dinov3_tiny", seed=1)
    assert isinstance(trunk, jax_adapter.DinoV3) and trunk.cfg.embed_dim == 96
    pytest.importorskip("torch")
    loaded = jax_adapter.create_model("dinov2_tiny_adapter", pretrained=str(fixtures_dir / "seed_adapter_tiny.pth"))
    from tests.helpers import seed_adapter

    reference = seed_adapter()
    a = nnx.state(loaded, nnx.Param)
    b = nnx.state(reference, nnx.Param)
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(va[...]), np.asarray(vb[...]), err_msg=str(pa))
    assert len(list((tmp_path / "cache" / "checkpoints").iterdir())) == 1


def test_create_model_without_weights_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_ADAPTER_CACHE", str(tmp_path))
    with pytest.raises(FetchError, match="dinov3_vitb16.lvd1689m are gated: request access"):
        jax_adapter.create_model("dinov3_vitb16_adapter", pretrained=True)
    with pytest.raises(FetchError, match="dinov2_tiny_adapter has no registered weights"):
        jax_adapter.create_model("dinov2_tiny_adapter", pretrained=True)
