"""DINOv2 formats: the seed DinoAdapter ``state_dict`` (``dinoadapter``; also inside a detector
checkpoint under its prefix), the DINOv2 hub ``.pth`` (``dinov2_hub``) and Hugging Face
``Dinov2Model`` / ``Dinov2WithRegistersModel``. ``keys``: names and the way back; ``infer``:
configs."""

from __future__ import annotations

from jax_adapter.models.dinov2.presets import ADAPTER_KIND, FAMILY as NAME, TRUNK_KIND

from ..base import Family, Format
from . import infer, keys

FAMILY = Family(
    name=NAME, trunk_kind=TRUNK_KIND, adapter_kind=ADAPTER_KIND, trunk_prefix="",
    is_trunk_key=keys.is_trunk_key, infer=infer.infer, split=infer.split, assemble=infer.assemble,
    check_fields=infer.check_fields, trunk_fields=infer.TRUNK_FIELDS, adapter_fields=infer.ADAPTER_FIELDS,
    same=infer.same_as,
    export_trunk=lambda sd, cfg: keys.to_dinov2_hub(sd), export_adapter=lambda sd, cfg: dict(sd),
    trunk_names="dinov2_hub", adapter_names="dinoadapter", variant=infer.variant_name,
)


def _detected(name: str):
    def detect(key_set) -> bool:
        try:
            return keys.detect_format(key_set) == name
        except ValueError:
            return False
    return detect


_HUB_ANCHOR = ("pos_embed", "patch_embed.proj.weight")
_HF_ANCHOR = ("embeddings.position_embeddings", "embeddings.patch_embeddings.projection.weight")

FORMATS = [
    Format("dinoadapter", FAMILY, _detected("dinoadapter"), keys.from_dinov2_hub,
           anchors=(_HUB_ANCHOR,), holds_adapter=True),
    Format("dinov2_hub", FAMILY, _detected("dinov2_hub"), keys.from_dinov2_hub, anchors=(_HUB_ANCHOR,)),
    Format("hf_dinov2", FAMILY, _detected("hf_dinov2"), keys.from_hf, keys.hf_names,
           anchors=(_HF_ANCHOR,), hf_model_types=("dinov2",)),
    Format("hf_dinov2_with_registers", FAMILY, _detected("hf_dinov2_with_registers"), keys.from_hf,
           keys.hf_names, anchors=(_HF_ANCHOR,), hf_model_types=("dinov2_with_registers",)),
]
