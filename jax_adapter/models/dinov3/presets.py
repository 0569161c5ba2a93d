"""The DINOv3 family's entries in the registry: its kinds, architectures and published weights.

Trunks are Meta's hub models (``dinov3/hub/backbones.py``) with the hub's arguments; each has an
adapter ``<trunk>_adapter``: upstream's ``DINOv3_Adapter`` defaults, tapping the blocks upstream's
segmentor taps. ``dinov3_vitl16_sat`` is the ViT-L of the SAT-493M weights (with its unused
``local_cls_norm``). The weights are gated: Meta sends a signed URL per user, which
``load_pretrained`` takes directly; their file names carry a sha256 prefix, checked on download.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

from jax_adapter import registry
from jax_adapter.models.base import IMAGENET_MEAN, IMAGENET_STD
from jax_adapter.errors import ConfigError
from jax_adapter.models.dinov3.adapter import DinoV3Adapter
from jax_adapter.models.dinov3.config import DinoV3AdapterConfig, DinoV3Config, default_interaction_indexes
from jax_adapter.models.dinov3.trunk import DinoV3

FAMILY = "dinov3"
TRUNK_KIND, ADAPTER_KIND = "dinov3", "dinov3_adapter"
# The hub models: embed_dim, depth, num_heads, ffn_ratio, ffn_layer, and the arguments that
# differ from the shared hub defaults (DinoV3Config's defaults).
HUB_VARIANTS: Dict[str, Tuple[int, int, int, float, str, Dict[str, Any]]] = {
    "vits16": (384, 12, 6, 4.0, "mlp", {}),
    "vits16plus": (384, 12, 6, 6.0, "swiglu", {}),
    "vitb16": (768, 12, 12, 4.0, "mlp", {}),
    "vitl16": (1024, 24, 16, 4.0, "mlp", {}),
    "vitl16_sat": (1024, 24, 16, 4.0, "mlp", {"untie_global_and_local_cls_norm": True}),
    "vitl16plus": (1024, 24, 16, 6.0, "swiglu", {}),
    "vith16plus": (1280, 32, 20, 6.0, "swiglu", {}),
    "vit7b16": (4096, 40, 32, 3.0, "swiglu64", {"qkv_bias": False, "untie_global_and_local_cls_norm": True}),
}
# The SAT-493M weights' statistics (DINOv3's README).
SAT_MEAN, SAT_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)
LICENSE = "DINOv3 License (https://ai.meta.com/resources/models-and-libraries/dinov3-license/)"
GATED = ("request access from Meta (https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/) "
         "and pass the signed URL you receive")
# Published trunk weights: (architecture, dataset tag, sha256 prefix of the file).
WEIGHTS = (
    ("vits16", "lvd1689m", "08c60483"), ("vits16plus", "lvd1689m", "4057cbaa"),
    ("vitb16", "lvd1689m", "73cec8be"), ("vitl16", "lvd1689m", "8aa4cbdd"),
    ("vitl16_sat", "sat493m", "eadcf0ff"), ("vitl16plus", "lvd1689m", "46503df0"),
    ("vith16plus", "lvd1689m", "7c1da9a5"), ("vit7b16", "lvd1689m", "a955f4ea"),
    ("vit7b16", "sat493m", "a6675841"),
)


def hub_config(variant: str, **overrides: Any) -> DinoV3Config:
    """The config of hub model ``dinov3_<variant>`` (e.g. ``"vitb16"``), with ``overrides``."""
    if variant not in HUB_VARIANTS:
        raise ConfigError(f"unknown DINOv3 variant {variant!r}; known: {', '.join(HUB_VARIANTS)}")
    dim, depth, heads, ratio, ffn, extra = HUB_VARIANTS[variant]
    return DinoV3Config(embed_dim=dim, depth=depth, num_heads=heads, ffn_ratio=ratio, ffn_layer=ffn,
                        **{**extra, **overrides})


def adapter(variant: str) -> DinoV3AdapterConfig:
    """Upstream's adapter defaults around hub trunk ``variant``, tapping upstream's blocks."""
    t = hub_config(variant)
    return DinoV3AdapterConfig(backbone=t, interaction_indexes=default_interaction_indexes(t.depth))


def tiny_adapter() -> DinoV3AdapterConfig:
    """The test fixture's shape (embed 96, depth 4, 6 heads, conv_inplane 16), for CPU smoke runs."""
    t = hub_config("vits16").replace(embed_dim=96, depth=4, num_heads=6)
    return DinoV3AdapterConfig(backbone=t, interaction_indexes=(0, 1, 2, 3), conv_inplane=16,
                               drop_path_rate=0.0, with_cp=False)


registry.register_kind(TRUNK_KIND, family=FAMILY, role="trunk", model=DinoV3, config=DinoV3Config)
registry.register_kind(ADAPTER_KIND, family=FAMILY, role="adapter", model=DinoV3Adapter,
                       config=DinoV3AdapterConfig, trunk=TRUNK_KIND)

registry.register_model("dinov3_tiny", TRUNK_KIND, lambda: tiny_adapter().backbone,
                        description="the DINOv3 adapter test fixture's trunk (embed 96, depth 4)")
registry.register_model("dinov3_tiny_adapter", ADAPTER_KIND, tiny_adapter, trunk="dinov3_tiny",
                        description="the DINOv3 adapter test fixture's shape")
for _v in HUB_VARIANTS:
    registry.register_model(f"dinov3_{_v}", TRUNK_KIND, lambda v=_v: hub_config(v),
                            description=f"Meta's hub trunk dinov3_{_v.replace('_sat', '')}"
                            + (" (SAT-493M weights' variant)" if _v.endswith("_sat") else ""))
    registry.register_model(f"dinov3_{_v}_adapter", ADAPTER_KIND, lambda v=_v: adapter(v),
                            trunk=f"dinov3_{_v}", description=f"Meta's DINOv3_Adapter around dinov3_{_v}")
for _v, _data, _hash in WEIGHTS:
    _arch = f"dinov3_{_v}"
    _plain = _v.replace("_sat", "")
    _sat = _data == "sat493m"
    registry.register_weights(registry.Weights(
        name=f"{_arch}.{_data}", architecture=_arch,
        file_name=f"dinov3_{_plain}_pretrain_{_data}-{_hash}.pth", url=None, sha256=_hash,
        mean=SAT_MEAN if _sat else IMAGENET_MEAN, std=SAT_STD if _sat else IMAGENET_STD,
        license=LICENSE, source_format="dinov3_hub", gated=GATED,
        hf_repo=f"facebook/dinov3-{_plain}-pretrain-{_data}",
        # Earlier names: the SAT weights by their hub name, the ViT-L ones by their trunk's.
        aliases=((f"dinov3_{_plain}.sat493m",) if _v == "vitl16_sat" else ())
        + ((f"{_arch}_sat",) if _sat and _v == "vit7b16" else ())))
