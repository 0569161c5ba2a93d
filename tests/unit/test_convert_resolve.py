"""The one config rule of the converters (``convert.resolve``) with each family's reading of the
tensors: configs come back from their shapes, given fields complete or contradict them."""

import pytest

from jax_adapter import registry
from jax_adapter.convert import resolve
from jax_adapter.convert.formats import dinov2, dinov3
from jax_adapter.convert.formats.dinov2.keys import from_dinov2_hub
from jax_adapter.convert.keys import slots
from jax_adapter.errors import ConversionError
from jax_adapter.models.build import abstract_model

FAMILIES = {"dinov2": dinov2.FAMILY, "dinov3": dinov3.FAMILY}
# The format a family's trunk or adapter architecture is read from.
FORMATS = {("dinov2", "trunk"): "dinov2_hub", ("dinov2", "adapter"): "dinoadapter",
           ("dinov3", "trunk"): "dinov3_hub", ("dinov3", "adapter"): "dinov3_adapter"}


def _shapes(name: str):
    """``(family, kind, canonical shapes, source shapes)`` of an architecture's weights as its
    upstream file holds them (DINOv3's buffers included)."""
    arch = registry.architecture(name)
    kind = registry.kind(arch.kind)
    cfg = registry.config_of(name)
    shapes = {k: s.torch_shape for k, s in slots(abstract_model(kind.name, cfg)).items()}
    source = dict(shapes)
    if kind.family == "dinov3":
        adapter = kind.role == "adapter"
        trunk, prefix = (cfg.trunk_config(), "backbone.") if adapter else (cfg, "")
        source[prefix + "rope_embed.periods"] = (trunk.head_dim // 4,)
        if trunk.qkv_bias and trunk.mask_k_bias:
            source.update({f"{prefix}blocks.{i}.attn.qkv.bias_mask": (3 * trunk.embed_dim,)
                           for i in range(trunk.depth)})
    return FAMILIES[kind.family], kind, shapes, source


def _resolve(family, kind, shapes, source, given=None, label="cfg"):
    fmt = FORMATS[(family.name, kind.role)]
    inferred = family.infer(shapes, source, fmt, None, kind.name)
    trunk, adapter = family.split(dict(given or {}), label, kind.name)
    return resolve.resolve(family, inferred, trunk, adapter, label, kind.name)


ROUND_TRIP = ["dinov2_vits14", "dinov2_vitb14_reg", "dinov2_vitg14", "dinov2_vitb14_adapter",
              "dinov3_vits16", "dinov3_vits16plus", "dinov3_vitl16_sat", "dinov3_vit7b16", "dinov3_vitb16_adapter"]


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_configs_come_back_from_their_shapes(name):
    """Every hub variant's config from its tensor shapes alone (ViT-g: SwiGLU 4096; the 7B:
    SwiGLU-64 without qkv bias; the SAT ViT-L: its local_cls_norm), and as ``--preset`` too."""
    family, kind, shapes, source = _shapes(name)
    cfg = registry.config_of(name)
    if name == "dinov2_vitg14":
        assert shapes["blocks.39.mlp.w12.weight"] == (2 * 4096, 1536)
    assert _resolve(family, kind, shapes, source) == cfg
    fmt = FORMATS[(family.name, kind.role)]
    inferred = family.infer(shapes, source, fmt, None, kind.name)
    trunk, adapter, label = resolve.given_fields(None, name, family.split, kind.name)
    assert resolve.resolve(family, inferred, trunk, adapter, label, kind.name) == cfg


def test_deform_split_follows_the_config_when_given():
    family, kind, shapes, source = _shapes("dinov2_tiny_adapter")
    cfg = registry.config_of("dinov2_tiny_adapter").replace(deform_num_heads=4, n_points=3)  # 12 = 6 * 2 too
    shapes = {k: s.torch_shape for k, s in slots(abstract_model(kind.name, cfg)).items()}
    assert _resolve(family, kind, shapes, shapes, {"num_heads": 3, "deform_num_heads": 4}).n_points == 3
    assert _resolve(family, kind, shapes, shapes, {"num_heads": 3, "n_points": 3}).deform_num_heads == 4
    with pytest.raises(ConversionError, match=r"deform_num_heads \* n_points: the checkpoint has 12"):
        _resolve(family, kind, shapes, shapes, {"num_heads": 3, "deform_num_heads": 6, "n_points": 4})
    # Undecided: 4 points (documented; an adapter with other points needs --config).
    undecided = _resolve(family, kind, shapes, shapes, {"num_heads": 3})
    assert (undecided.deform_num_heads, undecided.n_points) == (3, 4)


@pytest.mark.parametrize("name", ["dinov2_vitb14", "dinov3_vitb16"])
def test_contradictions_and_gaps_are_one_error_naming_each_field(name):
    family, kind, shapes, source = _shapes(name)
    with pytest.raises(ConversionError) as e:
        _resolve(family, kind, shapes, source, {"embed_dim": 384, "depth": 6})
    assert "embed_dim: the checkpoint has 768, cfg gives 384" in str(e.value)
    assert "depth: the checkpoint has 12, cfg gives 6" in str(e.value)
    # A width no variant has: the heads must be given.
    wide = {k: tuple(640 if d == 768 else d for d in s) for k, s in shapes.items()}
    with pytest.raises(ConversionError, match="cannot infer num_heads"):
        _resolve(family, kind, wide, {k: s for k, s in wide.items() if "periods" not in k})


def test_one_rule_for_config_or_preset():
    with pytest.raises(ConversionError, match="give --config or --preset, not both"):
        resolve.given_fields({}, "dinov2_vitb14", dinov2.FAMILY.split, "dinov2")
    with pytest.raises(ConversionError, match=r"is a DinoV3AdapterConfig \(dinov3 adapter\), not a DinoV2AdapterConfig"):
        resolve.given_fields(None, "dinov3_vits16_adapter", dinov2.FAMILY.split, "dinov2_adapter")
    with pytest.raises(ConversionError, match="describes a DINOv3 model, the checkpoint is DINOv2"):
        resolve.given_fields({"backbone": {}}, None, dinov2.FAMILY.split, "dinov2_adapter")
    with pytest.raises(ConversionError, match="describes a DINOv2 model, the checkpoint is DINOv3"):
        resolve.given_fields({"num_register_tokens": 4}, None, dinov3.FAMILY.split, "dinov3")
    with pytest.raises(ConversionError, match="unknown config fields in the given config: bogus"):
        resolve.given_fields({"bogus": 1}, None, dinov3.FAMILY.split, "dinov3")


def test_chunked_keys_unchunk():
    sd = {"blocks.0.0.norm1.weight": 1, "blocks.1.7.mlp.fc1.bias": 2, "blocks.3.norm1.weight": 3, "mask_token": 4}
    assert from_dinov2_hub(sd) == {"blocks.0.norm1.weight": 1, "blocks.7.mlp.fc1.bias": 2, "blocks.3.norm1.weight": 3}
