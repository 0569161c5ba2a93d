"""DINOv3 formats: Meta's hub ``.pth`` (``dinov3_hub``), Hugging Face ``DINOv3ViTModel``
(``hf_dinov3``) and Meta's ``DINOv3_Adapter`` ``state_dict`` (``dinov3_adapter``; also inside a
segmentor checkpoint under ``segmentation_model.0.``). ``keys``: names; ``infer``: configs;
``export``: checks and the way back."""

from __future__ import annotations

from jax_adapter.models.dinov3.presets import ADAPTER_KIND, FAMILY as NAME, TRUNK_KIND

from ..base import Family, Format
from . import export, infer, keys

FAMILY = Family(
    name=NAME, trunk_kind=TRUNK_KIND, adapter_kind=ADAPTER_KIND, trunk_prefix=keys.BACKBONE,
    is_trunk_key=keys.is_trunk_key, infer=infer.infer, split=infer.split, assemble=infer.assemble,
    check_fields=infer.check_fields, trunk_fields=infer.TRUNK_FIELDS, adapter_fields=infer.ADAPTER_FIELDS,
    export_trunk=export.export_trunk, export_adapter=export.export_adapter,
    trunk_names="dinov3_hub", adapter_names="dinov3_adapter", variant=infer.variant_name,
    check=export.check_source, check_files=export.check_files, optional=keys.optional,
)

FORMATS = [
    Format("dinov3_adapter", FAMILY, keys.is_adapter, keys.from_meta,
           anchors=(("level_embed", "backbone.patch_embed.proj.weight"),), holds_adapter=True),
    Format("hf_dinov3", FAMILY, keys.is_hf, keys.from_hf, keys.hf_names,
           anchors=(("embeddings.patch_embeddings.weight", "embeddings.cls_token"),),
           hf_model_types=("dinov3_vit",)),
    Format("dinov3_hub", FAMILY, keys.is_meta_trunk, keys.from_meta,
           anchors=(("cls_token", "patch_embed.proj.weight"),)),
]
