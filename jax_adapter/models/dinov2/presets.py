"""The DINOv2 family's entries in the registry: its kinds, architectures and published weights.

Trunks ``dinov2_vit{s,b,l,g}14`` and ``..._reg`` (4 register tokens); adapters are the trunk's
name plus ``_adapter`` (the seed detector's ViT-Adapter); ``dinov2_tiny[_adapter]`` have the test
fixture's shape, for smoke runs.
"""

from __future__ import annotations

from typing import Dict, Tuple

from jax_adapter import registry
from jax_adapter.models.base import IMAGENET_MEAN, IMAGENET_STD
from jax_adapter.models.dinov2.adapter import DinoV2Adapter
from jax_adapter.models.dinov2.config import DinoV2AdapterConfig, DinoV2Config, adapter_around
from jax_adapter.models.dinov2.trunk import DinoV2

FAMILY = "dinov2"
TRUNK_KIND, ADAPTER_KIND = "dinov2", "dinov2_adapter"
# embed_dim, depth, num_heads, ffn_layer of the four DINOv2 variants.
VARIANTS: Dict[str, Tuple[int, int, int, str]] = {
    "s": (384, 12, 6, "mlp"),
    "b": (768, 12, 12, "mlp"),
    "l": (1024, 24, 16, "mlp"),
    "g": (1536, 40, 24, "swiglu"),
}
_URL = "https://dl.fbaipublicfiles.com/dinov2"
# Hugging Face repositories of the same weights (transformers' Dinov2Model[WithRegisters]).
_HF_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}
LICENSE = "Apache-2.0"


def trunk(variant: str, registers: int = 0) -> DinoV2Config:
    """The hub trunk ``dinov2_vit<variant>14`` (with ``registers`` register tokens)."""
    dim, depth, heads, ffn = VARIANTS[variant]
    # The hub's register models resize their position grid with antialias, the others by scale.
    return DinoV2Config(embed_dim=dim, depth=depth, num_heads=heads, ffn_layer=ffn,
                        num_register_tokens=registers,
                        pos_embed_resize="bicubic_size_antialias" if registers else "bicubic_scale_offset")


def even_interactions(depth: int, n: int = 4) -> Tuple[Tuple[int, int], ...]:
    """``n`` interactions splitting ``depth`` blocks evenly, as ``(first, last)`` pairs."""
    step = depth // n
    return tuple((i * step, (i + 1) * step - 1) for i in range(n))


def adapter(variant: str, registers: int = 0) -> DinoV2AdapterConfig:
    """The seed's adapter around ``dinov2_vit<variant>14``: 4 even interactions; deformable heads
    6 for S and B (the seed detector's choice), 64 channels a head for L and g."""
    t = trunk(variant, registers)
    return adapter_around(t, deform_num_heads=6 if t.embed_dim <= 768 else t.embed_dim // 64,
                          interaction_indexes=even_interactions(t.depth))


def tiny_adapter() -> DinoV2AdapterConfig:
    """The test fixture's shape (embed 96, depth 4, 3 heads, conv_inplane 16), for smoke runs."""
    return DinoV2AdapterConfig(num_heads=3, embed_dim=96, depth=4, conv_inplane=16,
                               interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3)))


registry.register_kind(TRUNK_KIND, family=FAMILY, role="trunk", model=DinoV2, config=DinoV2Config)
registry.register_kind(ADAPTER_KIND, family=FAMILY, role="adapter", model=DinoV2Adapter,
                       config=DinoV2AdapterConfig, trunk=TRUNK_KIND, aliases=("adapter",))

registry.register_model("dinov2_tiny", TRUNK_KIND, lambda: tiny_adapter().trunk_config(),
                        description="the DINOv2 test fixture's trunk (embed 96, depth 4)")
registry.register_model("dinov2_tiny_adapter", ADAPTER_KIND, tiny_adapter, trunk="dinov2_tiny",
                        aliases=("tiny",), description="the seed adapter test fixture's shape")
for _v in VARIANTS:
    for _suffix, _regs in (("", 0), ("_reg", 4)):
        _name = f"dinov2_vit{_v}14{_suffix}"
        registry.register_model(_name, TRUNK_KIND, lambda v=_v, r=_regs: trunk(v, r),
                                description=f"DINOv2 ViT-{_v.upper()}/14" + (" with 4 registers" if _regs else ""))
        registry.register_model(_name + "_adapter", ADAPTER_KIND, lambda v=_v, r=_regs: adapter(v, r),
                                trunk=_name, description=f"the seed's ViT-Adapter around {_name}")
        _file = f"dinov2_vit{_v}14{'_reg4' if _regs else ''}_pretrain.pth"
        registry.register_weights(registry.Weights(
            name=f"{_name}.lvd142m", architecture=_name, file_name=_file,
            url=f"{_URL}/dinov2_vit{_v}14/{_file}", sha256=None,  # upstream publishes no hash
            mean=IMAGENET_MEAN, std=IMAGENET_STD, license=LICENSE, source_format="dinov2_hub",
            hf_repo=f"facebook/dinov2-{'with-registers-' if _regs else ''}{_HF_SIZES[_v]}"))
