"""DINOv2 formats as registry records: the seed DinoAdapter, the DINOv2 hub ``.pth`` and Hugging
Face ``Dinov2Model`` / ``Dinov2WithRegistersModel``. The key converters live in
:mod:`..sources` and the config inference in :mod:`..infer`; this module only binds them."""

from __future__ import annotations

from typing import Any, Dict

from .. import sources
from ..infer import ADAPTER_FIELDS, TRUNK_FIELDS, given_fields, infer, resolve, variant_name
from . import Configured, Family, Format


def _configure(shapes, source_shapes, fmt: str, hf_config, config, preset, kind: str) -> Configured:
    inferred = infer(shapes, fmt, hf_config)
    given, label = given_fields(config, preset, kind=kind)
    cfg = resolve(inferred, given, label, kind)
    return Configured(cfg, {"source_pos_embed_resize": inferred.source_pos_resize})


def _describe(shapes, source_shapes, fmt: str, hf_config, kind: str) -> Dict[str, Any]:
    inferred = infer(shapes, fmt, hf_config)
    info: Dict[str, Any] = {}
    try:
        info["config"] = resolve(inferred, {}, "no config", kind,
                                 missing_hint="jax-adapter convert needs --config or --preset for it").to_dict()
    except ValueError as e:
        names = ADAPTER_FIELDS if kind == "adapter" else TRUNK_FIELDS
        known = {**inferred.defaults, **inferred.fixed, "pos_embed_resize": inferred.source_pos_resize}
        info["config"] = {k: v for k, v in known.items() if k in names}
        info["unresolved"] = str(e)
    # A conversion keeps the source's position-embedding resize for --trunk-only only (a
    # DinoAdapter resizes with bicubic_size): show both, so that inspect and convert agree.
    info["source_pos_embed_resize"] = inferred.source_pos_resize
    info["variant"] = variant_name(info["config"])
    return info


FAMILY = Family(
    name="dinov2", trunk_kind="dinov2", adapter_kind="adapter", trunk_prefix="",
    is_trunk_key=sources.is_trunk_key, configure=_configure, describe=_describe,
    export_trunk=lambda sd, cfg: sources.to_dinov2_hub(sd), export_adapter=lambda sd, cfg: dict(sd),
    trunk_names="dinov2_hub", adapter_names="dinoadapter", variant=variant_name,
)


def _detected(name: str):
    def detect(keys) -> bool:
        try:
            return sources.detect_format(keys) == name
        except ValueError:
            return False
    return detect


_HUB_ANCHOR = ("pos_embed", "patch_embed.proj.weight")
_HF_ANCHOR = ("embeddings.position_embeddings", "embeddings.patch_embeddings.projection.weight")
_HF_TYPES = ("dinov2",)

FORMATS = [
    Format("dinoadapter", FAMILY, _detected("dinoadapter"), sources.from_dinov2_hub,
           anchors=(_HUB_ANCHOR,), holds_adapter=True),
    Format("dinov2_hub", FAMILY, _detected("dinov2_hub"), sources.from_dinov2_hub, anchors=(_HUB_ANCHOR,)),
    Format("hf_dinov2", FAMILY, _detected("hf_dinov2"), sources.from_hf, sources.hf_names,
           anchors=(_HF_ANCHOR,), hf_model_types=("dinov2",)),
    Format("hf_dinov2_with_registers", FAMILY, _detected("hf_dinov2_with_registers"), sources.from_hf,
           sources.hf_names, anchors=(_HF_ANCHOR,), hf_model_types=("dinov2_with_registers",)),
]
