"""The model config of a source checkpoint: read from its tensor shapes, completed or
overridden by ``--config`` / ``--preset``.

Fields split three ways:

- *fixed* by the tensors (embed dim, depth, registers, SwiGLU, patch size, MLP widths,
  ``conv_inplane``, the adapter's structure): a config that says otherwise is an error naming
  the field;
- *defaults* the tensors only suggest (heads of a known variant, the even split of blocks into
  interactions): a config replaces them;
- *unknown* (heads of an unknown embed dim, ...): a config must give them.

A trunk-only source converted into a DinoAdapter gets a fresh adapter: the presets' deformable
heads (6, or embed_dim / 64 when larger, lowered to a divisor of embed_dim) and 4 interactions
splitting the blocks evenly, unless the config says otherwise.

Deformable attention: ``attention_weights`` has ``heads * levels * points`` rows (levels = 3 in
the injector) and ``sampling_offsets`` twice that, so the tensors fix ``heads * points`` but not
the split. A config giving either one decides; otherwise 4 points are taken (the value of every
published ViT-Adapter config and of the seed: 6 heads * 4 points for the seed's ViT-S/B, 12 * 4
for ViT-Adapter-B, 16 * 4 for L) when ``heads * points / 4`` divides the value width, else 6
heads. An adapter trained with other points must be converted with ``--config``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, Mapping, Optional, Tuple

from jax_adapter.models.dinov2 import VARIANTS, DinoV2Config
from jax_adapter.models.dinov2_adapter import AdapterConfig
from jax_adapter.errors import ConfigError, ConversionError

TRUNK_FIELDS = tuple(f.name for f in dataclasses.fields(DinoV2Config))
ADAPTER_FIELDS = tuple(f.name for f in dataclasses.fields(AdapterConfig))
HEADS_BY_DIM = {dim: heads for dim, _, heads, _ in VARIANTS.values()}
# Constructor arguments that mark a JSON file as DINOv2 hub ``vit_*`` keyword arguments.
_HUB_MARKERS = ("img_size", "block_chunks", "interpolate_antialias", "interpolate_offset")


@dataclasses.dataclass
class Inferred:
    fixed: Dict[str, Any]
    defaults: Dict[str, Any]
    unknown: Dict[str, str]  # field -> why it cannot be inferred
    source_pos_resize: str  # how the source model itself resizes its position embedding
    num_interactions: Optional[int] = None
    deform_heads_x_points: Optional[int] = None


def source_pos_resize(fmt: str, num_registers: int) -> str:
    """The position-embedding resize of the source's own forward (docs/SPEC.md section 6)."""
    if fmt == "hf_dinov2":
        return "bicubic_size"
    if fmt == "hf_dinov2_with_registers":
        return "bicubic_size_antialias"
    # Hub models (and the hub trunk inside a DinoAdapter): registers models antialias.
    return "bicubic_size_antialias" if num_registers else "bicubic_scale_offset"


def _ffn_hidden(dim: int, ratio: float, ffn: str) -> int:
    return DinoV2Config(embed_dim=dim, num_heads=1, mlp_ratio=ratio, ffn_layer=ffn).ffn_hidden


def _mlp_ratio(dim: int, hidden: int, ffn: str) -> Optional[float]:
    for r in (4.0, hidden / dim, hidden * 1.5 / dim):
        if _ffn_hidden(dim, r, ffn) == hidden:
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
    if cfg.get("num_channels", 3) != 3:
        problems.append(f"num_channels {cfg['num_channels']}")
    patch = cfg.get("patch_size", 14)
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            problems.append(f"non-square patch_size {patch}")
        patch = patch[0]
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


def _count(shapes: Mapping[str, Tuple[int, ...]], head: str) -> int:
    idx = {int(k.split(".")[1]) for k in shapes if k.startswith(head) and k.split(".")[1].isdigit()}
    return max(idx) + 1 if idx else 0


def infer(shapes: Mapping[str, Tuple[int, ...]], fmt: str, hf_config: Optional[dict] = None) -> Inferred:
    """Config fields from ``{seed name: shape}`` of a source in format ``fmt``."""
    fixed: Dict[str, Any] = {}
    defaults: Dict[str, Any] = {}
    unknown: Dict[str, str] = {}
    pos = shapes.get("pos_embed")
    if pos is None or len(pos) != 3:
        raise ConversionError("missing keys: pos_embed" if pos is None else f"pos_embed has shape {pos}, expected [1, N, D]")
    d, n = pos[2], pos[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ConversionError(f"pos_embed has {n} patch positions, not a square grid")
    patch = shapes.get("patch_embed.proj.weight")
    p = patch[-1] if patch is not None and len(patch) == 4 else 14
    fixed.update(embed_dim=d, patch_size=p, pretrain_size=m * p, depth=_count(shapes, "blocks."))
    if not fixed["depth"]:
        raise ConversionError("no transformer blocks (blocks.N.*) in the checkpoint")
    regs = shapes.get("register_tokens")
    fixed["num_register_tokens"] = regs[1] if regs is not None and len(regs) == 3 else 0
    ffn = "swiglu" if "blocks.0.mlp.w12.weight" in shapes else "mlp"
    fixed["ffn_layer"] = ffn
    fc1 = shapes.get("blocks.0.mlp.w12.weight" if ffn == "swiglu" else "blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        hidden = fc1[0] // 2 if ffn == "swiglu" else fc1[0]
        ratio = _mlp_ratio(d, hidden, ffn)
        if ratio is None:
            unknown["mlp_ratio"] = f"no mlp_ratio gives an FFN width of {hidden}"
        else:
            fixed["mlp_ratio"] = ratio
    if hf_config is not None:
        hf = hf_fields(hf_config)
        fixed["num_heads"] = hf["num_heads"]
        if "drop_path_rate" in hf:
            defaults["drop_path_rate"] = hf["drop_path_rate"]
    elif d in HEADS_BY_DIM:
        defaults["num_heads"] = HEADS_BY_DIM[d]
    else:
        unknown["num_heads"] = (f"embed_dim {d} is not one of the DINOv2 variants' "
                                f"{sorted(HEADS_BY_DIM)}")
    out = Inferred(fixed, defaults, unknown, source_pos_resize(fmt, fixed["num_register_tokens"]))
    if fmt == "dinoadapter":
        _infer_adapter(shapes, d, out)
    else:
        # A fresh adapter around this trunk: the presets' choice (6 heads, or 64 channels a
        # head for wide trunks), lowered to a divisor of the width if need be.
        defaults["deform_num_heads"] = next(h for h in range(max(6, d // 64), 0, -1) if d % h == 0)
    n_inter = 4 if out.num_interactions is None else out.num_interactions
    depth = fixed["depth"]
    if n_inter and depth % n_inter == 0:
        step = depth // n_inter
        defaults["interaction_indexes"] = [[i * step, (i + 1) * step - 1] for i in range(n_inter)]
    else:
        unknown["interaction_indexes"] = f"depth {depth} does not split evenly into {n_inter} interactions"
    return out


def _infer_adapter(shapes: Mapping[str, Tuple[int, ...]], d: int, out: Inferred) -> None:
    fixed = out.fixed
    stem = shapes.get("spm.stem.0.weight")
    if stem is not None:
        fixed["conv_inplane"] = stem[0]
    out.num_interactions = _count(shapes, "interactions.")
    fixed["use_extra_extractor"] = any(".extra_extractors." in k for k in shapes)
    fc1 = shapes.get("interactions.0.extractor.ffn.fc1.weight")
    fixed["with_cffn"] = fc1 is not None
    if fc1 is not None:
        fixed["cffn_ratio"] = fc1[0] / d
    value = shapes.get("interactions.0.injector.attn.value_proj.weight")
    if value is not None:
        fixed["deform_ratio"] = value[0] / d
    weights = shapes.get("interactions.0.injector.attn.attention_weights.weight")
    if weights is not None:
        out.deform_heads_x_points = weights[0] // 3  # the injector attends to 3 levels


# How two values of a field compare: ratios by the layer widths they produce.
def _same(field: str, a: Any, b: Any, fields: Mapping[str, Any]) -> bool:
    d = fields.get("embed_dim", 1)
    if field == "mlp_ratio":
        ffn = fields.get("ffn_layer", "mlp")
        return _ffn_hidden(d, float(a), ffn) == _ffn_hidden(d, float(b), ffn)
    if field in ("cffn_ratio", "deform_ratio"):
        return int(d * float(a)) == int(d * float(b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def read_config_json(path: str) -> Tuple[Dict[str, Any], str]:
    """Fields from a JSON file: our own config fields, DINOv2 hub ``vit_*`` keyword arguments,
    or a Hugging Face ``config.json``. Returns ``(fields, style)``."""
    try:
        with open(path) as f:
            d = json.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object of config fields")
    if str(d.get("model_type", "")).startswith("dinov2"):
        return hf_fields(d), "hf"
    if any(k in d for k in _HUB_MARKERS):
        cfg = dinov2_config_from_hub(d).to_dict()
        return {k: cfg[k] for k in TRUNK_FIELDS if k in cfg}, "hub"
    return d, "fields"


def given_fields(config: Any = None, preset: Optional[str] = None, *, kind: str) -> Tuple[Dict[str, Any], str]:
    """``(fields, label)`` of a user's ``--config`` (path, dict or config object) or ``--preset``.

    Only explicitly given fields are returned; a preset gives all of its fields but the
    position-embedding resize, which is the source's.
    """
    if config is not None and preset is not None:
        raise ConfigError("give --config or --preset, not both")
    if preset is not None:
        cfg = AdapterConfig.preset(preset) if kind == "adapter" else DinoV2Config.preset(preset)
        fields = cfg.to_dict()
        fields.pop("pos_embed_resize")
        return fields, f"--preset {preset}"
    if config is None:
        return {}, "no config"
    if isinstance(config, str):
        fields, style = read_config_json(config)
        label = f"--config {config}"
        if kind == "adapter" and style != "fields":
            # These describe the trunk's own forward; the adapter resizes its own way.
            fields.pop("pos_embed_resize", None)
    elif isinstance(config, (AdapterConfig, DinoV2Config)):
        fields, label = config.to_dict(), "the given config"
    elif isinstance(config, Mapping):
        fields, label = dict(config), "the given config"
    else:
        raise TypeError(f"config must be a path, a dict or a config object, not {type(config).__name__}")
    if kind == "dinov2":
        fields = {k: v for k, v in fields.items() if k in TRUNK_FIELDS or k not in ADAPTER_FIELDS}
    return fields, label


def resolve(inferred: Inferred, given: Mapping[str, Any], label: str, kind: str, *,
            missing_hint: str = "pass --config or --preset"):
    """The :class:`AdapterConfig` (``kind="adapter"``) or :class:`DinoV2Config` of the
    converted model; ``ConversionError`` naming each field where ``given`` contradicts the
    tensors or where a needed field is neither inferable nor given (then ``missing_hint`` says
    what to do)."""
    cls = AdapterConfig if kind == "adapter" else DinoV2Config
    names = ADAPTER_FIELDS if kind == "adapter" else TRUNK_FIELDS
    fields: Dict[str, Any] = dict(inferred.defaults)
    # The trunk alone keeps its source's resize; the DinoAdapter resizes size-based, no
    # antialias, whatever its trunk came from (docs/SPEC.md section 5).
    fields["pos_embed_resize"] = inferred.source_pos_resize if kind == "dinov2" else "bicubic_size"
    fields.update(given)
    fields.update({k: v for k, v in inferred.fixed.items() if k not in given})
    basis = {**fields, **inferred.fixed}  # ratios compare by the widths of the checkpoint's dims
    bad = [
        f"{k}: the checkpoint has {v!r}, {label} gives {given[k]!r}"
        for k, v in inferred.fixed.items() if k in given and k in names and not _same(k, v, given[k], basis)
    ]
    unknown = {k: why for k, why in inferred.unknown.items() if k in names and k not in given}
    if kind == "adapter":
        n = inferred.num_interactions
        if n is not None and "interaction_indexes" in given and len(given["interaction_indexes"]) != n:
            bad.append(f"interaction_indexes: the checkpoint has {n} interaction blocks, {label} gives "
                       f"{len(given['interaction_indexes'])}")
        if inferred.deform_heads_x_points is not None:
            split = _deform_split(inferred.deform_heads_x_points, given, label, basis)
            if isinstance(split, str):
                bad.append(split)
            elif split is None:
                unknown["deform_num_heads"] = (f"{inferred.deform_heads_x_points} = heads * points "
                                               f"has no default split")
            else:
                fields["deform_num_heads"], fields["n_points"] = split
    if bad:
        raise ConversionError("config does not match the checkpoint: " + "; ".join(bad))
    if unknown:
        missing = "; ".join(f"{k} ({why})" for k, why in unknown.items())
        raise ConversionError(f"cannot infer {missing} from the checkpoint: {missing_hint}")
    extra = sorted(set(fields) - set(ADAPTER_FIELDS))
    if extra:
        raise ConfigError(f"unknown config fields in {label}: {', '.join(extra)}")
    try:
        return cls.from_dict({k: v for k, v in fields.items() if k in names})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config ({label}): {e}") from None


def _deform_split(prod: int, given: Mapping[str, Any], label: str, fields: Mapping[str, Any]):
    """``(heads, points)`` with ``heads * points == prod``; a message if ``given`` contradicts
    it; None if nothing decides."""
    heads, points = given.get("deform_num_heads"), given.get("n_points")
    what = f"deform_num_heads * n_points: the checkpoint has {prod} (attention_weights rows / 3 levels)"
    if heads is not None and points is not None:
        return (heads, points) if heads * points == prod else f"{what}, {label} gives {heads} * {points}"
    if heads is not None or points is not None:
        one = heads if heads is not None else points
        if prod % one:
            return f"{what}, not a multiple of {label}'s {one}"
        return (one, prod // one) if heads is not None else (prod // one, one)
    value_width = int(fields["embed_dim"] * fields.get("deform_ratio", 1.0))
    # Every published ViT-Adapter config (and the seed) uses 4 points; then the seed's 6 heads.
    if prod % 4 == 0 and value_width % (prod // 4) == 0:
        return prod // 4, 4
    if prod % 6 == 0 and value_width % 6 == 0:
        return 6, prod // 6
    return None


def variant_name(cfg: Mapping[str, Any]) -> Optional[str]:
    """``dinov2_vitb14_reg``-style preset name of a config, or None for other shapes."""
    for v, (dim, depth, heads, ffn) in VARIANTS.items():
        if (cfg.get("embed_dim"), cfg.get("depth"), cfg.get("ffn_layer")) == (dim, depth, ffn) \
                and cfg.get("patch_size") == 14:
            regs = cfg.get("num_register_tokens", 0)
            return f"dinov2_vit{v}14" + ("_reg" if regs == 4 else f"_reg{regs}" if regs else "")
    return None


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
