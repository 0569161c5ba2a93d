"""What DINOv3 tensors say about their config (for :mod:`convert.resolve`), and the DINOv3 styles
of a ``--config`` file: an adapter JSON with ``"backbone"``, a trunk's ``DinoVisionTransformer``
arguments, a Hugging Face ``DINOv3ViTConfig``.

The tables (FFN widths, the hub's heads and shapes) are the model package's; nothing here
repeats them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from jax_adapter.errors import ConversionError
from jax_adapter.models.dinov3 import DinoV3AdapterConfig, DinoV3Config, default_interaction_indexes
from jax_adapter.models.dinov3.config import FFN_LAYERS, ffn_hidden
from jax_adapter.models.dinov3.presets import ADAPTER_KIND, HUB_VARIANTS, TRUNK_KIND, hub_config

from ...resolve import Inferred, Shapes, count_indexed, hf_patch_size, infer_adapter, same
from .keys import BACKBONE, BIAS_MASK, PERIODS, is_hf

TRUNK_FIELDS = tuple(f.name for f in dataclasses.fields(DinoV3Config))
ADAPTER_FIELDS = tuple(f.name for f in dataclasses.fields(DinoV3AdapterConfig) if f.name != "backbone")
# Hub widths -> heads, and hub trunk shapes (width, depth, gated FFN, FFN width) -> architecture.
HUB_HEADS = {dim: heads for dim, _, heads, *_ in HUB_VARIANTS.values()}
_HUB_SHAPES = {(dim, depth, ffn != "mlp", ffn_hidden(dim, ratio, ffn)): f"dinov3_{v}"
               for v, (dim, depth, _, ratio, ffn, extra) in HUB_VARIANTS.items() if not extra.get(
                   "untie_global_and_local_cls_norm") or v == "vit7b16"}
# The hub's arguments where the tensors say nothing (DinoV3Config's defaults are the hub's).
_HUB_DEFAULTS = ("norm_layer", "pos_embed_rope_base", "pos_embed_rope_normalize_coords",
                 "pos_embed_rope_rescale_coords", "pos_embed_rope_dtype", "mask_k_bias", "layerscale_init")


def _ffn_choice(dim: int, gated: bool, width: int) -> Optional[Tuple[str, float]]:
    """An ``(ffn_layer, ffn_ratio)`` giving ``width``: the hub's ratios first, then exact ones."""
    layers = tuple(k for k, align in FFN_LAYERS.items() if (align is not None) == gated)
    base = width * 1.5 / dim if gated else width / dim
    ratios = (4.0, 6.0, 3.0, base, float(np.nextafter(base, np.inf)), (width * 1.5 + 1) / dim)
    for layer in layers:
        for r in ratios:
            if ffn_hidden(dim, r, layer) == width:
                return layer, r
    return None


def infer_trunk(shapes: Shapes, source_shapes: Shapes, hf_config: Optional[Mapping[str, Any]],
                out: Inferred) -> int:
    """Trunk fields from canonical trunk ``shapes`` (and the source's buffers); returns D."""
    fixed, defaults = out.trunk.fixed, out.trunk.defaults
    patch = shapes.get("patch_embed.proj.weight")
    if patch is None or len(patch) != 4:
        raise ConversionError("missing keys: patch_embed.proj.weight" if patch is None else
                              f"patch_embed.proj.weight has shape {patch}, expected [D, 3, p, p]")
    d = patch[0]
    fixed.update(embed_dim=d, patch_size=patch[-1], depth=count_indexed(shapes, "blocks."))
    if not fixed["depth"]:
        raise ConversionError("no transformer blocks (blocks.N.*) in the checkpoint")
    storage = shapes.get("storage_tokens")
    fixed["n_storage_tokens"] = storage[1] if storage is not None and len(storage) == 3 else 0
    fixed["qkv_bias"] = "blocks.0.attn.qkv.bias" in shapes
    if fixed["qkv_bias"]:
        if is_hf(set(source_shapes)):
            # Hugging Face adds no key bias unless it has a k_proj.bias: Meta's mask does the same.
            fixed["mask_k_bias"] = not any(k.endswith(".attention.k_proj.bias") for k in source_shapes)
        else:
            # Meta stores the mask of a LinearKMaskedBias; without it the key bias is added.
            fixed["mask_k_bias"] = any(BIAS_MASK.match(k.removeprefix(BACKBONE)) for k in source_shapes)
    fixed["untie_global_and_local_cls_norm"] = "local_cls_norm.weight" in shapes
    fixed["untie_cls_and_patch_norms"] = "cls_norm.weight" in shapes
    if "blocks.0.ls1.gamma" not in shapes:
        fixed["layerscale_init"] = None
    gated = "blocks.0.mlp.w1.weight" in shapes
    up = shapes.get("blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight")
    if up is not None:
        out.facts["ffn"] = (gated, up[0])
        hub = _HUB_SHAPES.get((d, fixed["depth"], gated, up[0]))
        # A hub shape takes the hub's spelling (the 7B's "swiglu64" and "swiglu" give one width).
        choice = (hub_config(hub[len("dinov3_"):]).ffn_layer, hub_config(hub[len("dinov3_"):]).ffn_ratio) \
            if hub else _ffn_choice(d, gated, up[0])
        if choice is None:
            out.trunk.unknown["ffn_ratio"] = (f"no ffn_layer/ffn_ratio of DINOv3 gives a "
                                              f"{'SwiGLU' if gated else 'MLP'} width of {up[0]}")
        else:
            defaults["ffn_layer"], defaults["ffn_ratio"] = choice
    periods = next((s for k, s in source_shapes.items() if k.removeprefix(BACKBONE) == PERIODS), None)
    if periods is not None and len(periods) == 1 and periods[0] and d % (4 * periods[0]) == 0:
        fixed["num_heads"] = d // (4 * periods[0])  # the buffer holds head_dim / 4 periods
    if hf_config is not None:
        for k, v in hf_fields(hf_config).items():
            if k in fixed and not same(k, fixed[k], v, fixed):
                raise ConversionError(f"config.json gives {k} {v!r}, the tensors have {fixed[k]!r}")
            fixed[k] = v
    if "num_heads" not in fixed:
        if d in HUB_HEADS:
            defaults["num_heads"] = HUB_HEADS[d]
        else:
            out.trunk.unknown["num_heads"] = (f"embed_dim {d} is not a hub width {sorted(HUB_HEADS)} and "
                                              f"the source has no rope_embed.periods or config.json")
    return d


def hf_fields(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Trunk fields from a Hugging Face ``DINOv3ViTConfig``; settings DINOv3 cannot express
    raise."""
    problems = []
    gated = bool(cfg.get("use_gated_mlp", False))
    act = cfg.get("hidden_act", "gelu")
    if act != ("silu" if gated else "gelu"):
        problems.append(f"hidden_act {act!r} with use_gated_mlp {gated} (DINOv3 uses "
                        f"{'silu' if gated else 'gelu'})")
    eps = float(cfg.get("layer_norm_eps", 1e-5))
    norms = {1e-5: "layernormbf16", 1e-6: "layernorm"}
    if eps not in norms:
        problems.append(f"layer_norm_eps {eps}")
    for flag in ("proj_bias", "mlp_bias"):
        if not cfg.get(flag, True):
            problems.append(f"{flag} false")
    if bool(cfg.get("query_bias", True)) != bool(cfg.get("value_bias", True)):
        problems.append("query_bias and value_bias differ")
    patch = hf_patch_size(cfg, 16, problems)
    if problems:
        raise ConversionError("unsupported Hugging Face DINOv3 config: " + ", ".join(problems))
    qkv_bias = bool(cfg.get("query_bias", True)) or bool(cfg.get("key_bias", False))
    out = {
        "embed_dim": cfg.get("hidden_size", 384), "depth": cfg.get("num_hidden_layers", 12),
        "num_heads": cfg.get("num_attention_heads", 6), "patch_size": patch,
        "n_storage_tokens": cfg.get("num_register_tokens", 0), "qkv_bias": qkv_bias,
        "norm_layer": norms.get(eps, "layernormbf16"),
        "pos_embed_rope_base": float(cfg.get("rope_theta", 100.0)),
        "pos_embed_rope_shift_coords": cfg.get("pos_embed_shift"),
        "pos_embed_rope_jitter_coords": cfg.get("pos_embed_jitter"),
        "pos_embed_rope_rescale_coords": cfg.get("pos_embed_rescale", 2.0),
    }
    if qkv_bias:
        # Hugging Face's key bias is either absent (zeros, as Meta's mask gives) or real.
        out["mask_k_bias"] = not cfg.get("key_bias", False)
    return out


def infer(shapes: Shapes, source_shapes: Shapes, fmt: str, hf_config: Optional[Mapping[str, Any]],
          kind: str) -> Inferred:
    """Config fields from canonical ``shapes`` of ``kind`` (trunk or adapter names)."""
    out = Inferred()
    trunk = {k[len(BACKBONE):]: s for k, s in shapes.items() if k.startswith(BACKBONE)} \
        if kind == ADAPTER_KIND else shapes
    d = infer_trunk(trunk, source_shapes, hf_config, out)
    hub = DinoV3Config()
    for k in _HUB_DEFAULTS:
        out.trunk.defaults.setdefault(k, getattr(hub, k))
    if kind == ADAPTER_KIND:
        depth = out.trunk.fixed["depth"]
        if any(not k.startswith(BACKBONE) for k in shapes):  # else: a trunk, the adapter is fresh
            # The extractor attends to the ViT grid, one level.
            infer_adapter(shapes, d, out, attention="extractor", levels=1)
        try:
            out.adapter.defaults["interaction_indexes"] = list(default_interaction_indexes(depth))
        except ValueError as e:
            out.adapter.unknown["interaction_indexes"] = str(e)
    return out


def split(d: Dict[str, Any], label: str, kind: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(trunk fields, adapter fields)`` of a dict: an adapter config with ``backbone``, a
    trunk config, or a Hugging Face ``DINOv3ViTConfig``."""
    d = dict(d)
    if d.get("model_type") == "dinov3_vit":
        return hf_fields(d), {}
    if str(d.get("model_type", "")).startswith("dinov2") or "pos_embed_resize" in d \
            or "num_register_tokens" in d:
        raise ConversionError(f"{label} describes a DINOv2 model, the checkpoint is DINOv3")
    if "backbone" in d:
        bb = d.pop("backbone")
        bb = bb.to_dict() if hasattr(bb, "to_dict") else dict(bb or {})
        return bb, d
    trunk = {k: v for k, v in d.items() if k in TRUNK_FIELDS}
    adapter = {k: v for k, v in d.items() if k not in TRUNK_FIELDS}
    unknown = sorted(k for k in adapter if k not in ADAPTER_FIELDS)
    if unknown:
        raise ConversionError(f"unknown config fields in {label}: {', '.join(unknown)}")
    return trunk, adapter


def assemble(trunk: Dict[str, Any], adapter: Dict[str, Any], kind: str) -> Dict[str, Any]:
    """The config dict of ``kind``: the trunk's, or the adapter's with the trunk as ``backbone``
    (whose dtypes the adapter's fields set)."""
    if kind == TRUNK_KIND:
        return dict(trunk)
    return {**adapter, "backbone": {k: v for k, v in trunk.items() if k not in ("dtype", "param_dtype")}}


def check_fields(inferred: Inferred, trunk: Dict[str, Any], adapter: Dict[str, Any],
                 given_adapter: Mapping[str, Any], label: str, kind: str, bad: list) -> None:
    """The FFN the config describes must have the checkpoint's kind and width; an adapter has
    four interactions."""
    ffn = inferred.facts.get("ffn")
    if ffn is not None and "ffn_ratio" in trunk:
        gated, width = ffn
        layer = trunk.get("ffn_layer", "mlp")
        got = ffn_hidden(trunk["embed_dim"], float(trunk.get("ffn_ratio", 4.0)), layer)
        if (layer != "mlp") != gated or got != width:
            bad.append(f"ffn_layer/ffn_ratio: the checkpoint has a {'SwiGLU' if gated else 'GELU MLP'} "
                       f"FFN of width {width}, {label} gives {layer!r} with ratio "
                       f"{trunk.get('ffn_ratio')} (width {got})")
    n = inferred.interactions
    if kind == ADAPTER_KIND and n is not None and n != 4:
        bad.append(f"the checkpoint has {n} interaction blocks; the DINOv3 adapter has 4")


def variant_name(cfg: Mapping[str, Any]) -> Optional[str]:
    """``dinov3_vitb16``-style name of a trunk (or adapter) config dict of hub shape, else None."""
    bb = cfg.get("backbone") or cfg
    try:
        gated = bb["ffn_layer"] != "mlp"
        width = ffn_hidden(bb["embed_dim"], float(bb["ffn_ratio"]), bb["ffn_layer"])
        key = (bb["embed_dim"], bb["depth"], gated, width)
    except (KeyError, TypeError, ValueError):
        return None
    name = _HUB_SHAPES.get(key)
    if name is None or bb.get("patch_size", 16) != 16:
        return None
    return name + ("_adapter" if "backbone" in cfg else "")
