"""DINOv3 formats: Meta's hub ``.pth`` (``dinov3_hub``), Hugging Face ``DINOv3ViTModel``
(``hf_dinov3``) and Meta's ``DINOv3_Adapter`` ``state_dict`` (``dinov3_adapter``; also inside a
segmentor checkpoint under ``segmentation_model.0.``).

Canonical names are Meta's ``state_dict`` names, which the :class:`~jax_adapter.models.dinov3.DinoV3`
module paths follow (the adapter's trunk under ``backbone.``), less two buffers the library
recomputes: ``rope_embed.periods`` (checked against the config's periods, refused on a mismatch)
and ``blocks.N.attn.qkv.bias_mask`` (checked to be exactly ``[1.., 0.., 1..]`` over q, k, v,
refused otherwise). The stored ``qkv.bias`` keeps its key third as given: the trunk multiplies
by the same constant mask, so an export writes the source's tensor back bit for bit.

Hugging Face splits ``qkv`` into ``q_proj``/``k_proj``/``v_proj`` and has no key bias; the
fused bias gets a zero key third. Its MLP names are a trap: ``up_proj`` is the GELU MLP's
``fc1`` but the SwiGLU's *linear* branch ``w2`` (``gate_proj`` is ``w1``, the SiLU branch), so
each layer is mapped by whether it has a ``gate_proj``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from jax_adapter.errors import ConversionError
from jax_adapter.hub import check_hash_prefix

from ..tensors import ArrayTensor, concat, load
from . import Configured, Family, Format

TRUNK_KIND, ADAPTER_KIND = "dinov3", "dinov3_adapter"
BACKBONE = "backbone."
PERIODS = "rope_embed.periods"
_BIAS_MASK = re.compile(r"^(?P<block>blocks\.\d+)\.attn\.qkv\.bias_mask$")
_HF_LAYER = re.compile(r"^(?P<outer>(?:model\.)?layer\.)(?P<i>\d+)\.(?P<rest>.+)$")
# Canonical keys a trunk may lack without being incomplete (the model keeps them when it can).
_OPTIONAL = ("mask_token", "local_cls_norm.weight", "local_cls_norm.bias")
# SwiGLU alignments by ffn_layer, as in DINOv3's SwiGLUFFN.
_SWIGLU = {"swiglu": 8, "swiglu64": 64, "swiglu32": 32, "swiglu128": 128}
# Hub trunk shapes -> preset name: (embed_dim, depth, gated FFN, FFN width).
_VARIANTS = {
    (384, 12, False, 1536): "dinov3_vits16", (384, 12, True, 1536): "dinov3_vits16plus",
    (768, 12, False, 3072): "dinov3_vitb16", (1024, 24, False, 4096): "dinov3_vitl16",
    (1024, 24, True, 4096): "dinov3_vitl16plus", (1280, 32, True, 5120): "dinov3_vith16plus",
    (4096, 40, True, 8192): "dinov3_vit7b16",
}


def _classes():
    """``(DinoV3Config, DinoV3AdapterConfig)`` (imported on use: the model modules are heavy)."""
    from jax_adapter.models.dinov3 import DinoV3Config
    from jax_adapter.models.dinov3_adapter import DinoV3AdapterConfig

    return DinoV3Config, DinoV3AdapterConfig


def _fields(cls) -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


# --- lazy tensor handles -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Reshaped:
    """A tensor viewed with another shape (Hugging Face ``mask_token [1, 1, D]`` -> ``[1, D]``)."""

    parts: Tuple[Any]
    shape: Tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    def load(self) -> np.ndarray:
        return load(self.parts[0]).reshape(self.shape)


# --- key maps --------------------------------------------------------------------------------


def is_trunk_key(key: str) -> bool:
    """Whether an adapter-canonical key is the trunk's."""
    return key.startswith(BACKBONE)


def _optional(key: str) -> bool:
    return key.removeprefix(BACKBONE) in _OPTIONAL


def from_meta(sd: Mapping[str, Any]) -> Dict[str, Any]:
    """Meta trunk (or adapter) ``state_dict`` -> canonical: the periods and bias masks dropped
    (they are checked once the config is known, by :func:`check_source`)."""
    out = {}
    for key, v in sd.items():
        rel = key.removeprefix(BACKBONE)
        if rel == PERIODS or _BIAS_MASK.match(rel):
            continue
        out[key] = v
    return out


def _hf_layer(i: str, parts: Dict[str, Any], outer: str) -> Tuple[Dict[str, Any], List[str]]:
    """One Hugging Face layer's tensors (names relative to the layer) -> ``blocks.i.*``; returns
    the converted tensors and the absent Hugging Face names of incomplete groups."""
    out: Dict[str, Any] = {}
    absent: List[str] = []
    b = f"blocks.{i}."
    hf = f"{outer}{i}."
    qkv = [f"attention.{x}_proj.weight" for x in "qkv"]
    if any(n in parts for n in qkv):
        missing = [n for n in qkv if n not in parts]
        if missing:
            absent += [hf + n for n in missing]
        else:
            out[b + "attn.qkv.weight"] = concat([parts.pop(n) for n in qkv])
    biases = [f"attention.{x}_proj.bias" for x in "qkv"]
    present = [n for n in biases if n in parts]
    if present:
        # Hugging Face has no key bias (and may lack the query or value one): zeros, so that
        # the fused bias is what the split projections add.
        ref = parts[present[0]]
        zeros = ArrayTensor(np.zeros(tuple(ref.shape), np.dtype(ref.dtype)))
        out[b + "attn.qkv.bias"] = concat([parts.pop(n) if n in parts else zeros for n in biases])
    renames = {"attention.o_proj": "attn.proj", "norm1": "norm1", "norm2": "norm2"}
    gated = "mlp.gate_proj.weight" in parts
    if gated:
        renames.update({"mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w2", "mlp.down_proj": "mlp.w3"})
        if "mlp.up_proj.weight" not in parts:
            absent.append(hf + "mlp.up_proj.weight")
    else:
        renames.update({"mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"})
    for name in list(parts):
        if name in ("layer_scale1.lambda1", "layer_scale2.lambda1"):
            out[b + f"ls{name[11]}.gamma"] = parts.pop(name)
            continue
        module, _, leaf = name.rpartition(".")
        if module in renames and leaf in ("weight", "bias"):
            out[b + renames[module] + "." + leaf] = parts.pop(name)
    out.update({hf + n: v for n, v in parts.items()})  # unknown: reported as unexpected
    return out, absent


def from_hf(sd: Mapping[str, Any]) -> Dict[str, Any]:
    """Hugging Face ``DINOv3ViTModel`` (saved ``layer.N.*`` or in-memory ``model.layer.N.*``)
    -> canonical Meta names. An incomplete q/k/v or gate/up group is a ``ConversionError``
    naming the absent Hugging Face keys."""
    out: Dict[str, Any] = {}
    layers: Dict[str, Dict[str, Any]] = {}
    outer = "layer."
    top = {"embeddings.cls_token": "cls_token", "embeddings.register_tokens": "storage_tokens",
           "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
           "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
    for key, v in sd.items():
        m = _HF_LAYER.match(key)
        if m:
            outer = m.group("outer")
            layers.setdefault(m.group("i"), {})[m.group("rest")] = v
        elif key == "embeddings.mask_token":
            shape = tuple(v.shape)
            out["mask_token"] = _Reshaped((v,), (1, shape[-1])) if len(shape) == 3 else v
        elif key == "embeddings.register_tokens" and tuple(v.shape)[1:2] == (0,):
            continue
        else:
            out[top.get(key, key)] = v
    absent: List[str] = []
    for i, parts in sorted(layers.items(), key=lambda kv: int(kv[0])):
        converted, missing = _hf_layer(i, dict(parts), outer)
        out.update(converted)
        absent += missing
    if absent:
        raise ConversionError(f"missing keys: {', '.join(sorted(absent))}")
    return out


_HF_NAMES = [
    (re.compile(r"^cls_token$"), ["embeddings.cls_token"]),
    (re.compile(r"^storage_tokens$"), ["embeddings.register_tokens"]),
    (re.compile(r"^mask_token$"), ["embeddings.mask_token"]),
    (re.compile(r"^patch_embed\.proj\.(\w+)$"), ["embeddings.patch_embeddings.{0}"]),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(\w+)$"),
     ["layer.{0}.attention.q_proj.{1}", "layer.{0}.attention.k_proj.{1}", "layer.{0}.attention.v_proj.{1}"]),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\.(\w+)$"), ["layer.{0}.attention.o_proj.{1}"]),
    (re.compile(r"^blocks\.(\d+)\.ls(\d)\.gamma$"), ["layer.{0}.layer_scale{1}.lambda1"]),
    (re.compile(r"^blocks\.(\d+)\.(norm\d)\.(\w+)$"), ["layer.{0}.{1}.{2}"]),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc1\.(\w+)$"), ["layer.{0}.mlp.up_proj.{1}"]),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc2\.(\w+)$"), ["layer.{0}.mlp.down_proj.{1}"]),
    (re.compile(r"^blocks\.(\d+)\.mlp\.w1\.(\w+)$"), ["layer.{0}.mlp.gate_proj.{1}"]),
    (re.compile(r"^blocks\.(\d+)\.mlp\.w2\.(\w+)$"), ["layer.{0}.mlp.up_proj.{1}"]),
    (re.compile(r"^blocks\.(\d+)\.mlp\.w3\.(\w+)$"), ["layer.{0}.mlp.down_proj.{1}"]),
]


def hf_names(key: str) -> List[str]:
    """The Hugging Face names a canonical trunk key comes from, for messages."""
    for pattern, names in _HF_NAMES:
        m = pattern.match(key)
        if m:
            return [n.format(*m.groups()) for n in names]
    return [key]


# --- detection -------------------------------------------------------------------------------


def _is_hf(keys: set) -> bool:
    return "embeddings.patch_embeddings.weight" in keys or any(_HF_LAYER.match(k) for k in keys)


def _is_meta_trunk(keys: set) -> bool:
    # DINOv3 has no position table: a ViT with a patch embedding and no pos_embed.
    return "patch_embed.proj.weight" in keys and "pos_embed" not in keys and any(
        k.startswith("blocks.") for k in keys)


def _is_adapter(keys: set) -> bool:
    # Meta's DINOv3_Adapter: SPM and extractors, no injector, the trunk under backbone.
    return (any(k.startswith(("spm.", "interactions.")) for k in keys)
            and not any(".injector." in k for k in keys)
            and (any(k.startswith(BACKBONE) for k in keys) or "level_embed" in keys))


# --- config inference ------------------------------------------------------------------------


@dataclasses.dataclass
class Inferred:
    """What the tensors say about a DINOv3 config (trunk and adapter fields kept apart).

    ``fixed`` fields are facts (a config saying otherwise is refused); ``defaults`` are the hub's
    choices a config may replace; ``unknown`` must be given. ``ffn`` is ``(gated, width)``,
    compared with a config through the width its ``ffn_layer``/``ffn_ratio`` produce.
    """

    trunk_fixed: Dict[str, Any] = dataclasses.field(default_factory=dict)
    trunk_defaults: Dict[str, Any] = dataclasses.field(default_factory=dict)
    trunk_unknown: Dict[str, str] = dataclasses.field(default_factory=dict)
    ffn: Optional[Tuple[bool, int]] = None
    adapter_fixed: Dict[str, Any] = dataclasses.field(default_factory=dict)
    adapter_defaults: Dict[str, Any] = dataclasses.field(default_factory=dict)
    adapter_unknown: Dict[str, str] = dataclasses.field(default_factory=dict)
    heads_x_points: Optional[int] = None
    interactions: Optional[int] = None


def ffn_width(dim: int, ratio: float, layer: str) -> int:
    """DINOv3's FFN hidden width for ``ffn_layer``/``ffn_ratio`` (SwiGLU: 2/3, aligned)."""
    hidden = int(dim * ratio)
    if layer in _SWIGLU:
        d = int(hidden * 2 / 3)
        hidden = d + (-d % _SWIGLU[layer])
    return hidden


def _ffn_choice(dim: int, gated: bool, width: int) -> Optional[Tuple[str, float]]:
    """An ``(ffn_layer, ffn_ratio)`` giving ``width``: the hub's ratios first, then exact ones."""
    layers = ("swiglu", "swiglu64", "swiglu32", "swiglu128") if gated else ("mlp",)
    base = width * 1.5 / dim if gated else width / dim
    ratios = (4.0, 6.0, 3.0, base, float(np.nextafter(base, np.inf)), (width * 1.5 + 1) / dim)
    for layer in layers:
        for r in ratios:
            if ffn_width(dim, r, layer) == width:
                return layer, r
    return None


# Hub widths -> heads (64 channels a head; 128 for the 7B).
HUB_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 20, 4096: 32}


def _count(keys, head: str) -> int:
    idx = {int(k[len(head):].split(".")[0]) for k in keys
           if k.startswith(head) and k[len(head):].split(".")[0].isdigit()}
    return max(idx) + 1 if idx else 0


def infer_trunk(shapes: Mapping[str, Tuple[int, ...]], source_shapes: Mapping[str, Tuple[int, ...]],
                hf_config: Optional[Mapping[str, Any]], out: Inferred) -> int:
    """Trunk fields from canonical trunk ``shapes`` (and the source's buffers); returns D."""
    fixed, defaults = out.trunk_fixed, out.trunk_defaults
    patch = shapes.get("patch_embed.proj.weight")
    if patch is None or len(patch) != 4:
        raise ConversionError("missing keys: patch_embed.proj.weight" if patch is None else
                              f"patch_embed.proj.weight has shape {patch}, expected [D, 3, p, p]")
    d = patch[0]
    fixed.update(embed_dim=d, patch_size=patch[-1], depth=_count(shapes, "blocks."))
    if not fixed["depth"]:
        raise ConversionError("no transformer blocks (blocks.N.*) in the checkpoint")
    storage = shapes.get("storage_tokens")
    fixed["n_storage_tokens"] = storage[1] if storage is not None and len(storage) == 3 else 0
    fixed["qkv_bias"] = "blocks.0.attn.qkv.bias" in shapes
    if fixed["qkv_bias"]:
        if _is_hf(set(source_shapes)):
            # Hugging Face adds no key bias unless it has a k_proj.bias: Meta's mask does the same.
            fixed["mask_k_bias"] = not any(k.endswith(".attention.k_proj.bias") for k in source_shapes)
        else:
            # Meta stores the mask of a LinearKMaskedBias; without it the key bias is added.
            fixed["mask_k_bias"] = any(_BIAS_MASK.match(k.removeprefix(BACKBONE)) for k in source_shapes)
    fixed["untie_global_and_local_cls_norm"] = "local_cls_norm.weight" in shapes
    fixed["untie_cls_and_patch_norms"] = "cls_norm.weight" in shapes
    if "blocks.0.ls1.gamma" not in shapes:
        fixed["layerscale_init"] = None
    gated = "blocks.0.mlp.w1.weight" in shapes
    up = shapes.get("blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight")
    if up is not None:
        out.ffn = (gated, up[0])
        choice = _ffn_choice(d, gated, up[0])
        if choice is None:
            out.trunk_unknown["ffn_ratio"] = (f"no ffn_layer/ffn_ratio of DINOv3 gives a "
                                              f"{'SwiGLU' if gated else 'MLP'} width of {up[0]}")
        else:
            defaults["ffn_layer"], defaults["ffn_ratio"] = choice
    periods = next((s for k, s in source_shapes.items() if k.removeprefix(BACKBONE) == PERIODS), None)
    if periods is not None and len(periods) == 1 and periods[0] and d % (4 * periods[0]) == 0:
        fixed["num_heads"] = d // (4 * periods[0])  # the buffer holds head_dim / 4 periods
    if hf_config is not None:
        for k, v in hf_fields(hf_config).items():
            if k in fixed and not _same(fixed[k], v):
                raise ConversionError(f"config.json gives {k} {v!r}, the tensors have {fixed[k]!r}")
            fixed[k] = v
    if "num_heads" not in fixed:
        if d in HUB_HEADS:
            defaults["num_heads"] = HUB_HEADS[d]
        else:
            out.trunk_unknown["num_heads"] = (f"embed_dim {d} is not a hub width {sorted(HUB_HEADS)} and "
                                              f"the source has no rope_embed.periods or config.json")
    return d


def infer_adapter(shapes: Mapping[str, Tuple[int, ...]], d: int, depth: int, out: Inferred) -> None:
    """Adapter fields from canonical adapter ``shapes`` (trunk width ``d``, ``depth`` blocks)."""
    fixed = out.adapter_fixed
    stem = shapes.get("spm.stem.0.weight")
    if stem is not None:
        fixed["conv_inplane"] = stem[0]
    out.interactions = _count(shapes, "interactions.")
    fixed["use_extra_extractor"] = any(".extra_extractors." in k for k in shapes)
    fc1 = shapes.get("interactions.0.extractor.ffn.fc1.weight")
    fixed["with_cffn"] = fc1 is not None
    if fc1 is not None:
        fixed["cffn_ratio"] = fc1[0] / d
    value = shapes.get("interactions.0.extractor.attn.value_proj.weight")
    if value is not None:
        fixed["deform_ratio"] = value[0] / d
    weights = shapes.get("interactions.0.extractor.attn.attention_weights.weight")
    if weights is not None:
        out.heads_x_points = weights[0]  # the extractor attends to one level


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
    if cfg.get("num_channels", 3) != 3:
        problems.append(f"num_channels {cfg['num_channels']}")
    for flag in ("proj_bias", "mlp_bias"):
        if not cfg.get(flag, True):
            problems.append(f"{flag} false")
    if bool(cfg.get("query_bias", True)) != bool(cfg.get("value_bias", True)):
        problems.append("query_bias and value_bias differ")
    patch = cfg.get("patch_size", 16)
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            problems.append(f"non-square patch_size {patch}")
        patch = patch[0]
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


def infer(shapes: Mapping[str, Tuple[int, ...]], source_shapes: Mapping[str, Tuple[int, ...]],
          hf_config: Optional[Mapping[str, Any]], kind: str) -> Inferred:
    """Config fields from canonical ``shapes`` of ``kind`` (trunk or adapter names)."""
    out = Inferred()
    trunk = {k[len(BACKBONE):]: s for k, s in shapes.items() if k.startswith(BACKBONE)} \
        if kind == ADAPTER_KIND else shapes
    d = infer_trunk(trunk, source_shapes, hf_config, out)
    # The hub's arguments where the tensors say nothing.
    for k, v in (("norm_layer", "layernormbf16"), ("pos_embed_rope_base", 100.0),
                 ("pos_embed_rope_normalize_coords", "separate"), ("pos_embed_rope_rescale_coords", 2.0),
                 ("pos_embed_rope_dtype", "fp32"), ("mask_k_bias", True), ("layerscale_init", 1e-5)):
        out.trunk_defaults.setdefault(k, v)
    if kind == ADAPTER_KIND:
        depth = out.trunk_fixed["depth"]
        if any(not k.startswith(BACKBONE) for k in shapes):  # else: a trunk, the adapter is fresh
            infer_adapter(shapes, d, depth, out)
        from jax_adapter.models.dinov3_adapter import default_interaction_indexes

        try:
            out.adapter_defaults["interaction_indexes"] = list(default_interaction_indexes(depth))
        except ValueError as e:
            out.adapter_unknown["interaction_indexes"] = str(e)
    return out


# --- given configs and resolution ------------------------------------------------------------


def _split_given(d: Mapping[str, Any], label: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(trunk fields, adapter fields)`` of a dict: an adapter config with ``backbone``, a
    trunk config, or a Hugging Face ``DINOv3ViTConfig``."""
    trunk_cls, adapter_cls = _classes()
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
    trunk_names, adapter_names = set(_fields(trunk_cls)), set(_fields(adapter_cls))
    trunk = {k: v for k, v in d.items() if k in trunk_names}
    adapter = {k: v for k, v in d.items() if k not in trunk_names}
    unknown = sorted(k for k in adapter if k not in adapter_names)
    if unknown:
        raise ConversionError(f"unknown config fields in {label}: {', '.join(unknown)}")
    return trunk, adapter


def given_fields(config: Any, preset: Optional[str]) -> Tuple[Dict[str, Any], Dict[str, Any], str]:
    """``(trunk fields, adapter fields, label)`` of ``--config`` (a JSON path, a dict or a config
    object: adapter with ``backbone``, trunk, or Hugging Face) or ``--preset``."""
    if config is not None and preset is not None:
        raise ConversionError("give --config or --preset, not both")
    if preset is not None:
        from jax_adapter import presets

        obj, label = presets.get(preset), f"--preset {preset}"
    elif isinstance(config, str):
        label = f"--config {config}"
        try:
            with open(config) as f:
                obj = json.load(f)
        except OSError as e:
            raise ConversionError(f"{config}: cannot read config ({e.strerror})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{config}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise ConversionError(f"{config}: expected a JSON object of config fields")
    elif config is None:
        return {}, {}, "no config"
    else:
        obj, label = config, "the given config"
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if not isinstance(obj, Mapping):
        raise ConversionError(f"config must be a path, a dict or a config object, not {type(obj).__name__}")
    trunk, adapter = _split_given(obj, label)
    # Dtypes are the adapter's business when there is one (its fields set the trunk's).
    return trunk, adapter, label


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _merge(fixed, defaults, unknown, given, label, names, bad, missing) -> Dict[str, Any]:
    fields = dict(defaults)
    fields.update(given)
    for k, v in fixed.items():
        if k in given and k in names:
            g = given[k]
            # "Has LayerScale" is the fact; its init value is not.
            same = (v is None) == (g is None) if k == "layerscale_init" else _same(v, g)
            if not same:
                bad.append(f"{k}: the checkpoint has {v!r}, {label} gives {g!r}")
        else:
            fields[k] = v
    missing.update({k: why for k, why in unknown.items() if k in names and k not in given})
    return {k: v for k, v in fields.items() if k in names}


def resolve(inferred: Inferred, given_trunk: Mapping[str, Any], given_adapter: Mapping[str, Any],
            label: str, kind: str):
    """The :class:`DinoV3Config` (``kind="dinov3"``) or :class:`DinoV3AdapterConfig` of the
    converted model; ``ConversionError`` naming each field where the given config contradicts
    the tensors, or that neither the tensors nor the config decide."""
    trunk_cls, adapter_cls = _classes()
    bad: List[str] = []
    missing: Dict[str, str] = {}
    trunk = _merge(inferred.trunk_fixed, inferred.trunk_defaults, inferred.trunk_unknown, given_trunk,
                   label, set(_fields(trunk_cls)), bad, missing)
    if inferred.ffn is not None and "ffn_ratio" not in missing:
        gated, width = inferred.ffn
        layer = trunk.get("ffn_layer", "mlp")
        got = ffn_width(trunk["embed_dim"], float(trunk.get("ffn_ratio", 4.0)), layer)
        if (layer != "mlp") != gated or got != width:
            bad.append(f"ffn_layer/ffn_ratio: the checkpoint has a {'SwiGLU' if gated else 'GELU MLP'} "
                       f"FFN of width {width}, {label} gives {layer!r} with ratio "
                       f"{trunk.get('ffn_ratio')} (width {got})")
    adapter: Dict[str, Any] = {}
    if kind == ADAPTER_KIND:
        adapter = _merge(inferred.adapter_fixed, inferred.adapter_defaults, inferred.adapter_unknown,
                         given_adapter, label, set(_fields(adapter_cls)), bad, missing)
        n = inferred.interactions
        if n is not None and n != 4:
            bad.append(f"the checkpoint has {n} interaction blocks; the DINOv3 adapter has 4")
        if inferred.heads_x_points is not None:
            split = _deform_split(inferred.heads_x_points, adapter, given_adapter, label, trunk["embed_dim"])
            if isinstance(split, str):
                bad.append(split)
            elif split is None:
                missing["deform_num_heads"] = f"{inferred.heads_x_points} = heads * points has no default split"
            else:
                adapter["deform_num_heads"], adapter["n_points"] = split
    if bad:
        raise ConversionError("config does not match the checkpoint: " + "; ".join(bad))
    if missing:
        why = "; ".join(f"{k} ({v})" for k, v in missing.items())
        raise ConversionError(f"cannot infer {why} from the checkpoint: pass --config or --preset")
    try:
        if kind == TRUNK_KIND:
            return trunk_cls.from_dict(trunk)
        # The adapter's dtype fields set the trunk's.
        trunk = {k: v for k, v in trunk.items() if k not in ("dtype", "param_dtype")}
        return adapter_cls.from_dict({**adapter, "backbone": trunk})
    except (TypeError, ValueError) as e:
        raise ConversionError(f"invalid config ({label}): {e}") from None


def _deform_split(prod: int, fields: Mapping[str, Any], given: Mapping[str, Any], label: str, d: int):
    """``(heads, points)`` with ``heads * points == prod`` (attention_weights rows, one level)."""
    heads, points = given.get("deform_num_heads"), given.get("n_points")
    what = f"deform_num_heads * n_points: the checkpoint has {prod} (attention_weights rows)"
    if heads is not None and points is not None:
        return (heads, points) if heads * points == prod else f"{what}, {label} gives {heads} * {points}"
    if heads is not None or points is not None:
        one = heads if heads is not None else points
        if prod % one:
            return f"{what}, not a multiple of {label}'s {one}"
        return (one, prod // one) if heads is not None else (prod // one, one)
    width = int(d * float(fields.get("deform_ratio", 0.5)))
    # Upstream's defaults: 4 points (and 16 heads).
    if prod % 4 == 0 and width % (prod // 4) == 0:
        return prod // 4, 4
    return None


# --- the family's hooks ----------------------------------------------------------------------


def _trunk_config(cfg):
    return cfg.backbone if hasattr(cfg, "backbone") else cfg


def configure(shapes, source_shapes, fmt: str, hf_config, config, preset, kind: str) -> Configured:
    inferred = infer(shapes, source_shapes, hf_config, kind)
    trunk, adapter, label = given_fields(config, preset)
    cfg = resolve(inferred, trunk, adapter, label, kind)
    return Configured(cfg, {})


def describe(shapes, source_shapes, fmt: str, hf_config, kind: str) -> Dict[str, Any]:
    inferred = infer(shapes, source_shapes, hf_config, kind)
    info: Dict[str, Any] = {}
    try:
        info["config"] = resolve(inferred, {}, {}, "no config", kind).to_dict()
    except ValueError as e:
        trunk = {**inferred.trunk_defaults, **inferred.trunk_fixed}
        info["config"] = trunk if kind == TRUNK_KIND else {
            **inferred.adapter_defaults, **inferred.adapter_fixed, "backbone": trunk}
        info["unresolved"] = str(e)
    info["variant"] = variant_name(info["config"])
    return info


def variant_name(cfg: Mapping[str, Any]) -> Optional[str]:
    """``dinov3_vitb16``-style name of a trunk (or adapter) config dict of hub shape, else None."""
    bb = cfg.get("backbone") or cfg
    try:
        gated = bb["ffn_layer"] != "mlp"
        width = ffn_width(bb["embed_dim"], float(bb["ffn_ratio"]), bb["ffn_layer"])
        key = (bb["embed_dim"], bb["depth"], gated, width)
    except (KeyError, TypeError, ValueError):
        return None
    name = _VARIANTS.get(key)
    if name is None or bb.get("patch_size", 16) != 16:
        return None
    return name + ("_adapter" if "backbone" in cfg else "")


def check_source(source: Mapping[str, Any], tensors: Mapping[str, Any], cfg, kind: str) -> None:
    """Checks of the dropped buffers against the resolved config (small tensors are read):
    each ``qkv.bias_mask`` must be exactly ones, zeros, ones over q, k, v; the stored
    ``rope_embed.periods`` must be the config's (else the trunk would rotate differently)."""
    trunk = _trunk_config(cfg)
    for key, t in source.items():
        rel = key.removeprefix(BACKBONE)
        if _BIAS_MASK.match(rel):
            d = trunk.embed_dim
            want = np.concatenate([np.ones(d), np.zeros(d), np.ones(d)])
            got = np.asarray(load(t), np.float64)
            if got.shape != want.shape or not np.array_equal(got, want):
                off = "wrong shape" if got.shape != want.shape else \
                    f"{int(np.sum(got != want))} of {got.size} entries differ"
                raise ConversionError(
                    f"{key} is not DINOv3's key-bias mask (ones over q and v, zeros over k): {off}; "
                    f"a tampered mask would change which biases the model adds")
        elif rel == PERIODS:
            want = trunk.rope_periods()
            got = np.asarray(load(t), np.float64)
            if got.shape != want.shape or not np.allclose(got, want, rtol=1e-6, atol=0.0):
                raise ConversionError(
                    f"{key} {np.array2string(got.ravel()[:4], precision=4)}... differs from the "
                    f"periods of the config (head dim {trunk.head_dim}, base {trunk.pos_embed_rope_base}: "
                    f"{np.array2string(want.ravel()[:4], precision=4)}...); pass the right "
                    f"pos_embed_rope_* / num_heads with --config")


def check_files(records: Sequence[Mapping[str, Any]]) -> None:
    """A Meta file named ``...-<8 hex>.pth`` carries its sha256 prefix (torch.hub's convention):
    refuse a file whose content does not match (a corrupt or mislabelled download)."""
    for r in records:
        check_hash_prefix(r["name"], r["sha256"])


def export_trunk(sd: Dict[str, Any], cfg) -> Dict[str, Any]:
    """Canonical trunk arrays -> Meta's ``state_dict`` as ``load_state_dict(strict=True)`` expects:
    ``rope_embed.periods`` (float32) and each block's ``qkv.bias_mask`` put back, in Meta's order."""
    trunk = _trunk_config(cfg)
    ref = sd["cls_token"]
    out: Dict[str, Any] = {}
    for key in ("cls_token", "storage_tokens", "mask_token"):
        if key in sd:
            out[key] = sd[key]
    if "mask_token" not in out:
        out["mask_token"] = np.zeros((1, trunk.embed_dim), ref.dtype)
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        out[key] = sd[key]
    out[PERIODS] = trunk.rope_periods().astype(np.float32)
    for key, v in sd.items():
        if key in out:
            continue
        out[key] = v
        if key.endswith(".attn.qkv.bias") and trunk.mask_k_bias:
            d = trunk.embed_dim
            out[key[: -len("bias")] + "bias_mask"] = np.concatenate(
                [np.ones(d), np.zeros(d), np.ones(d)]).astype(v.dtype)
    return out


def export_adapter(sd: Dict[str, Any], cfg) -> Dict[str, Any]:
    """Adapter arrays in Meta's names: the trunk's part through :func:`export_trunk`."""
    trunk = export_trunk({k[len(BACKBONE):]: v for k, v in sd.items() if k.startswith(BACKBONE)}, cfg)
    return {**{BACKBONE + k: v for k, v in trunk.items()},
            **{k: v for k, v in sd.items() if not k.startswith(BACKBONE)}}


FAMILY = Family(
    name="dinov3", trunk_kind=TRUNK_KIND, adapter_kind=ADAPTER_KIND, trunk_prefix=BACKBONE,
    is_trunk_key=is_trunk_key, configure=configure, describe=describe,
    export_trunk=export_trunk, export_adapter=export_adapter,
    trunk_names="dinov3_hub", adapter_names="dinov3_adapter", variant=variant_name,
    check=check_source, check_files=check_files, optional=_optional,
)

FORMATS = [
    Format("dinov3_adapter", FAMILY, _is_adapter, from_meta,
           anchors=(("level_embed", "backbone.patch_embed.proj.weight"),), holds_adapter=True),
    Format("hf_dinov3", FAMILY, _is_hf, from_hf, hf_names,
           anchors=(("embeddings.patch_embeddings.weight", "embeddings.cls_token"),),
           hf_model_types=("dinov3_vit",)),
    Format("dinov3_hub", FAMILY, _is_meta_trunk, from_meta,
           anchors=(("cls_token", "patch_embed.proj.weight"),)),
]
