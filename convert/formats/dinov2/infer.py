"""What DINOv2 tensors say about their config (for :mod:`convert.resolve`), and the DINOv2 styles
of a ``--config`` file: our own fields, the DINOv2 hub's ``vit_*`` arguments, a Hugging Face
``config.json``.

A trunk-only source converted into an adapter gets a fresh adapter: the presets' deformable heads
(6, or embed_dim / 64 when larger, lowered to a divisor of embed_dim) and 4 interactions splitting
the blocks evenly, unless the config says otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional, Tuple

from jax_adapter.errors import ConversionError
from jax_adapter.models.dinov2 import DinoV2AdapterConfig, DinoV2Config
from jax_adapter.models.dinov2.config import ffn_hidden
from jax_adapter.models.dinov2.presets import TRUNK_KIND, VARIANTS, even_interactions

from ...resolve import Inferred, Shapes, count_indexed, hf_patch_size, infer_adapter, same

TRUNK_FIELDS = tuple(f.name for f in dataclasses.fields(DinoV2Config))
ADAPTER_FIELDS = tuple(f.name for f in dataclasses.fields(DinoV2AdapterConfig))
HEADS_BY_DIM = {dim: heads for dim, _, heads, _ in VARIANTS.values()}
# Constructor arguments that mark a JSON file as DINOv2 hub ``vit_*`` keyword arguments.
_HUB_MARKERS = ("img_size", "block_chunks", "interpolate_antialias", "interpolate_offset")


def source_pos_resize(fmt: str, num_registers: int) -> str:
    """The position-embedding resize of the source's own forward (docs/SPEC.md section 6)."""
    if fmt == "hf_dinov2":
        return "bicubic_size"
    if fmt == "hf_dinov2_with_registers":
        return "bicubic_size_antialias"
    # Hub models (and the hub trunk inside a DinoAdapter): registers models antialias.
    return "bicubic_size_antialias" if num_registers else "bicubic_scale_offset"


def _mlp_ratio(dim: int, hidden: int, ffn: str) -> Optional[float]:
    for r in (4.0, hidden / dim, hidden * 1.5 / dim):
        if ffn_hidden(dim, r, ffn) == hidden:
            return r
    return None


def hf_fields(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Config fields from a Hugging Face ``config.json``; unsupported settings raise."""
    problems = []
    if float(cfg.get("layer_norm_eps", 1e-6)) != 1e-6:
        problems.append(f"layer_norm_eps {cfg['layer_norm_eps']} (this port uses 1e-6)")
    if cfg.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act {cfg['hidden_act']!r} (this port uses exact GELU, 'gelu')")
    if not cfg.get("qkv_bias", True):
        problems.append("qkv_bias false")
    patch = hf_patch_size(cfg, 14, problems)
    if problems:
        raise ConversionError("unsupported Hugging Face config: " + ", ".join(problems))
    image = cfg.get("image_size", 518)
    image = image[0] if isinstance(image, (list, tuple)) else image
    out = {
        "embed_dim": cfg.get("hidden_size", 768), "depth": cfg.get("num_hidden_layers", 12),
        "num_heads": cfg.get("num_attention_heads", 12), "mlp_ratio": float(cfg.get("mlp_ratio", 4)),
        "patch_size": patch, "pretrain_size": image,
        "num_register_tokens": cfg.get("num_register_tokens", 0),
        "ffn_layer": "swiglu" if cfg.get("use_swiglu_ffn", False) else "mlp",
        "pos_embed_resize": source_pos_resize(
            "hf_dinov2_with_registers" if cfg.get("model_type") == "dinov2_with_registers" else "hf_dinov2", 0),
    }
    if "drop_path_rate" in cfg:
        out["drop_path_rate"] = cfg["drop_path_rate"]
    return out


def infer(shapes: Shapes, source_shapes: Shapes, fmt: str, hf_config: Optional[Mapping[str, Any]],
          kind: str) -> Inferred:
    """Config fields from canonical ``shapes`` (seed names) of a source in format ``fmt``."""
    out = Inferred()
    trunk = out.trunk
    pos = shapes.get("pos_embed")
    if pos is None or len(pos) != 3:
        raise ConversionError("missing keys: pos_embed" if pos is None else f"pos_embed has shape {pos}, expected [1, N, D]")
    d, n = pos[2], pos[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ConversionError(f"pos_embed has {n} patch positions, not a square grid")
    patch = shapes.get("patch_embed.proj.weight")
    p = patch[-1] if patch is not None and len(patch) == 4 else 14
    trunk.fixed.update(embed_dim=d, patch_size=p, pretrain_size=m * p, depth=count_indexed(shapes, "blocks."))
    if not trunk.fixed["depth"]:
        raise ConversionError("no transformer blocks (blocks.N.*) in the checkpoint")
    regs = shapes.get("register_tokens")
    trunk.fixed["num_register_tokens"] = regs[1] if regs is not None and len(regs) == 3 else 0
    ffn = "swiglu" if "blocks.0.mlp.w12.weight" in shapes else "mlp"
    trunk.fixed["ffn_layer"] = ffn
    fc1 = shapes.get("blocks.0.mlp.w12.weight" if ffn == "swiglu" else "blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        hidden = fc1[0] // 2 if ffn == "swiglu" else fc1[0]
        ratio = _mlp_ratio(d, hidden, ffn)
        if ratio is None:
            trunk.unknown["mlp_ratio"] = f"no mlp_ratio gives an FFN width of {hidden}"
        else:
            trunk.fixed["mlp_ratio"] = ratio
    if hf_config is not None:
        hf = hf_fields(hf_config)
        trunk.fixed["num_heads"] = hf["num_heads"]
        if "drop_path_rate" in hf:
            trunk.defaults["drop_path_rate"] = hf["drop_path_rate"]
    elif d in HEADS_BY_DIM:
        trunk.defaults["num_heads"] = HEADS_BY_DIM[d]
    else:
        trunk.unknown["num_heads"] = f"embed_dim {d} is not one of the DINOv2 variants' {sorted(HEADS_BY_DIM)}"
    resize = source_pos_resize(fmt, trunk.fixed["num_register_tokens"])
    out.provenance["source_pos_embed_resize"] = resize
    # The trunk alone keeps its source's resize; the adapter resizes size-based, no antialias,
    # whatever its trunk came from (docs/SPEC.md section 5).
    trunk.defaults["pos_embed_resize"] = resize if kind == TRUNK_KIND else "bicubic_size"
    if fmt == "dinoadapter":
        infer_adapter(shapes, d, out, attention="injector", levels=3)
    else:
        # A fresh adapter around this trunk: the presets' choice (6 heads, or 64 channels a
        # head for wide trunks), lowered to a divisor of the width if need be.
        out.adapter.defaults["deform_num_heads"] = next(h for h in range(max(6, d // 64), 0, -1) if d % h == 0)
    n_inter = 4 if out.interactions is None else out.interactions
    depth = trunk.fixed["depth"]
    if n_inter and depth % n_inter == 0:
        out.adapter.defaults["interaction_indexes"] = [list(p) for p in even_interactions(depth, n_inter)]
    else:
        out.adapter.unknown["interaction_indexes"] = f"depth {depth} does not split evenly into {n_inter} interactions"
    return out


def same_as(field: str, a: Any, b: Any, basis: Mapping[str, Any]) -> bool:
    """:func:`convert.resolve.same`, with ``mlp_ratio`` compared by the FFN width it gives."""
    if field == "mlp_ratio":
        d, ffn = basis.get("embed_dim", 1), basis.get("ffn_layer", "mlp")
        return ffn_hidden(d, float(a), ffn) == ffn_hidden(d, float(b), ffn)
    return same(field, a, b, basis)


def dinov2_config_from_hub(kwargs: Dict[str, Any]) -> DinoV2Config:
    """A ``DinoV2Config`` from the DINOv2 hub ``vit_*`` constructor arguments."""
    known = {"img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "init_values",
             "ffn_layer", "block_chunks", "num_register_tokens", "interpolate_antialias",
             "interpolate_offset", "qkv_bias", "proj_bias", "ffn_bias", "drop_path_rate"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConversionError(f"unknown DINOv2 hub arguments: {', '.join(unknown)}")
    ffn = kwargs.get("ffn_layer", "mlp")
    if ffn not in ("mlp", "swiglu", "swiglufused"):
        raise ConversionError(f"unsupported DINOv2 ffn_layer {ffn!r}")
    if kwargs.get("interpolate_antialias", False):
        mode = "bicubic_size_antialias"
    elif kwargs.get("interpolate_offset", 0.1):
        mode = "bicubic_scale_offset"
    else:
        mode = "bicubic_size"
    return DinoV2Config(
        embed_dim=kwargs.get("embed_dim", 768), depth=kwargs.get("depth", 12),
        num_heads=kwargs.get("num_heads", 12), mlp_ratio=kwargs.get("mlp_ratio", 4.0),
        patch_size=kwargs.get("patch_size", 14), pretrain_size=kwargs.get("img_size", 518),
        num_register_tokens=kwargs.get("num_register_tokens", 0),
        ffn_layer="mlp" if ffn == "mlp" else "swiglu",
        layer_scale_init=kwargs.get("init_values", 1.0) or 1.0, pos_embed_resize=mode,
        drop_path_rate=kwargs.get("drop_path_rate", 0.0),
    )


def split(d: Dict[str, Any], label: str, kind: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(trunk fields, adapter fields)`` of a config dict: our own (or the seed DinoAdapter's)
    fields, the DINOv2 hub's ``vit_*`` arguments, or a Hugging Face ``config.json``."""
    if str(d.get("model_type", "")).startswith("dinov2"):
        fields, style = hf_fields(d), "hf"
    elif any(k in d for k in _HUB_MARKERS):
        fields, style = dinov2_config_from_hub(d).to_dict(), "hub"
    elif "backbone" in d or str(d.get("model_type", "")).startswith("dinov3"):
        raise ConversionError(f"{label} describes a DINOv3 model, the checkpoint is DINOv2")
    else:
        fields, style = dict(d), "fields"
    if kind != TRUNK_KIND and style != "fields":
        # These describe the trunk's own forward; the adapter resizes its own way.
        fields.pop("pos_embed_resize", None)
    unknown = sorted(set(fields) - set(ADAPTER_FIELDS))
    if unknown:
        raise ConversionError(f"unknown config fields in {label}: {', '.join(unknown)}")
    trunk = {k: v for k, v in fields.items() if k in TRUNK_FIELDS}
    adapter = {k: v for k, v in fields.items() if k not in TRUNK_FIELDS}
    return trunk, adapter


def assemble(trunk: Dict[str, Any], adapter: Dict[str, Any], kind: str) -> Dict[str, Any]:
    """The config dict of ``kind``: the trunk's fields, and for the adapter the adapter's beside
    them (the seed DinoAdapter's flat arguments)."""
    return dict(trunk) if kind == TRUNK_KIND else {**trunk, **adapter}


def check_fields(inferred: Inferred, trunk: Dict[str, Any], adapter: Dict[str, Any],
                 given_adapter: Mapping[str, Any], label: str, kind: str, bad: list) -> None:
    """A given ``interaction_indexes`` must have one pair per interaction block of the source."""
    n = inferred.interactions
    if kind != TRUNK_KIND and n is not None and "interaction_indexes" in given_adapter \
            and len(given_adapter["interaction_indexes"]) != n:
        bad.append(f"interaction_indexes: the checkpoint has {n} interaction blocks, {label} gives "
                   f"{len(given_adapter['interaction_indexes'])}")


def variant_name(cfg: Mapping[str, Any]) -> Optional[str]:
    """``dinov2_vitb14_reg``-style architecture name of a trunk config dict (``..._adapter`` of an
    adapter's), or None for other shapes."""
    for v, (dim, depth, heads, ffn) in VARIANTS.items():
        if (cfg.get("embed_dim"), cfg.get("depth"), cfg.get("ffn_layer")) == (dim, depth, ffn) \
                and cfg.get("patch_size") == 14:
            regs = cfg.get("num_register_tokens", 0)
            name = f"dinov2_vit{v}14" + ("_reg" if regs == 4 else f"_reg{regs}" if regs else "")
            return name + ("_adapter" if "interaction_indexes" in cfg else "")
    return None
