"""The config of a converted model: what the tensors say, completed or overridden by the user's
``--config`` / ``--preset``. One rule for every family; the families say what their tensors
fix (:mod:`.formats.dinov2.infer`, :mod:`.formats.dinov3.infer`).

Fields split three ways, for the trunk and for the adapter alike (:class:`Fields`):

- *fixed* by the tensors (widths, depth, registers, FFN kind, patch size, adapter structure): a
  config that says otherwise is an error naming the field;
- *defaults* the tensors only suggest (the heads of a known width, the tapped blocks): a config
  replaces them;
- *unknown* (the heads of an unknown width, ...): a config must give them.

Deformable attention: ``attention_weights`` has ``heads * levels * points`` rows, so the tensors
fix ``heads * points`` but not the split. A config giving either one decides; otherwise 4 points
(every published ViT-Adapter and DINOv3 adapter config) when ``heads * points / 4`` divides the
value width, else 6 heads (the seed's). Every failure is a :class:`ConversionError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from jax_adapter import registry
from jax_adapter.errors import ConversionError
from jax_adapter.files import read_json

Shapes = Mapping[str, Tuple[int, ...]]
HINT = "pass --config or --preset"
# ``split(d, label, kind) -> (trunk fields, adapter fields)`` of a config dict in any style a
# family accepts (its own fields, PyTorch arguments, a Hugging Face config.json).
Split = Callable[[Dict[str, Any], str, str], Tuple[Dict[str, Any], Dict[str, Any]]]


@dataclasses.dataclass
class Fields:
    """What the tensors say about one config's fields (see the module notes)."""

    fixed: Dict[str, Any] = dataclasses.field(default_factory=dict)
    defaults: Dict[str, Any] = dataclasses.field(default_factory=dict)
    unknown: Dict[str, str] = dataclasses.field(default_factory=dict)  # field -> why


@dataclasses.dataclass
class Inferred:
    """A family's reading of a source's tensors: trunk and adapter fields, and the two facts that
    are not fields (``heads_x_points``: deformable heads times points; ``interactions``: the
    number of interaction blocks). ``facts``: other family-specific findings its checks read;
    ``provenance``: what the conversion record should say."""

    trunk: Fields = dataclasses.field(default_factory=Fields)
    adapter: Fields = dataclasses.field(default_factory=Fields)
    heads_x_points: Optional[int] = None
    interactions: Optional[int] = None
    facts: Dict[str, Any] = dataclasses.field(default_factory=dict)
    provenance: Dict[str, Any] = dataclasses.field(default_factory=dict)


def count_indexed(keys, head: str) -> int:
    """How many ``head<i>.`` entries (``blocks.``, ``interactions.``) the keys hold: max i + 1."""
    idx = {int(k[len(head):].split(".")[0]) for k in keys
           if k.startswith(head) and k[len(head):].split(".")[0].isdigit()}
    return max(idx) + 1 if idx else 0


@dataclasses.dataclass(frozen=True)
class Configured:
    """A resolved config and what the provenance record should say about it."""

    config: Any  # the kind's config object (has ``to_dict``)
    provenance: Dict[str, Any]


def hf_patch_size(cfg: Mapping[str, Any], default: int, problems: List[str]) -> int:
    """A Hugging Face ``config.json``'s patch size (an int or a square pair); what no ViT here can
    take (non-RGB input, a non-square patch) is added to ``problems``."""
    if cfg.get("num_channels", 3) != 3:
        problems.append(f"num_channels {cfg['num_channels']}")
    patch = cfg.get("patch_size", default)
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            problems.append(f"non-square patch_size {patch}")
        patch = patch[0]
    return patch


def infer_adapter(shapes: Shapes, d: int, out: Inferred, *, attention: str, levels: int) -> None:
    """The ViT-Adapter fields every family's adapter tensors fix (trunk width ``d``): the SPM's
    width, the interactions, the extra extractors, the ConvFFN, the value width and the
    deformable heads times points, read off ``interactions.0.<attention>.attn`` (which attends
    to ``levels`` levels)."""
    fixed = out.adapter.fixed
    stem = shapes.get("spm.stem.0.weight")
    if stem is not None:
        fixed["conv_inplane"] = stem[0]
    out.interactions = count_indexed(shapes, "interactions.")
    fixed["use_extra_extractor"] = any(".extra_extractors." in k for k in shapes)
    fc1 = shapes.get("interactions.0.extractor.ffn.fc1.weight")
    fixed["with_cffn"] = fc1 is not None
    if fc1 is not None:
        fixed["cffn_ratio"] = fc1[0] / d
    value = shapes.get(f"interactions.0.{attention}.attn.value_proj.weight")
    if value is not None:
        fixed["deform_ratio"] = value[0] / d
    weights = shapes.get(f"interactions.0.{attention}.attn.attention_weights.weight")
    if weights is not None:
        out.heads_x_points = weights[0] // levels  # rows: heads * levels * points


def given_fields(config: Any, preset: Optional[str], split: Split, kind: str
                 ) -> Tuple[Dict[str, Any], Dict[str, Any], str]:
    """``(trunk fields, adapter fields, label)`` of ``--config`` (a JSON path, a dict or a config
    object) or ``--preset`` (a registered architecture, read as a config of ``kind``); only the
    fields they give explicitly."""
    if config is not None and preset is not None:
        raise ConversionError("give --config or --preset, not both")
    if preset is not None:
        try:
            obj, label = registry.config_of(preset, registry.kind(kind).config), f"--preset {preset}"
        except ValueError as e:
            raise ConversionError(str(e)) from None
        # A preset's position-embedding resize is its own hub source's; the checkpoint's source
        # decides that (it is no field of other families).
        obj = {k: v for k, v in obj.to_dict().items() if k != "pos_embed_resize"}
    elif config is None:
        return {}, {}, "no config"
    elif isinstance(config, str):
        obj, label = read_json(config, ConversionError), f"--config {config}"
    else:
        obj, label = config, "the given config"
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if not isinstance(obj, Mapping):
        raise ConversionError(f"config must be a path, a dict or a config object, not {type(obj).__name__}")
    trunk, adapter = split(dict(obj), label, kind)
    return trunk, adapter, label


def _normal(v: Any) -> Any:
    """Lists and tuples compare alike (JSON's pairs and the config's tuples)."""
    return json.loads(json.dumps(v)) if isinstance(v, (list, tuple)) else v


def same(field: str, a: Any, b: Any, basis: Mapping[str, Any]) -> bool:
    """Whether two values of ``field`` mean the same model: ratios by the layer widths they give
    (``basis`` holds the embedding width), LayerScale by whether it exists, numbers to 1e-9."""
    d = basis.get("embed_dim", 1)
    if field in ("cffn_ratio", "deform_ratio"):
        return int(d * float(a)) == int(d * float(b))
    if field == "layerscale_init":
        return (a is None) == (b is None)  # "has LayerScale" is the fact; its init value is not
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return _normal(a) == _normal(b)


def merge(found: Fields, given: Mapping[str, Any], label: str, names: Sequence[str],
          bad: List[str], missing: Dict[str, str],
          same_as: Callable[[str, Any, Any, Mapping[str, Any]], bool] = same) -> Dict[str, Any]:
    """Defaults, then what is given, then what the tensors fix; contradictions of fixed fields go
    to ``bad``, unknown fields nobody gave to ``missing``. Only ``names`` are kept."""
    fields = dict(found.defaults)
    fields.update(given)
    basis = {**fields, **found.fixed}  # ratios compare by the widths of the checkpoint's dims
    for k, v in found.fixed.items():
        if k in given and k in names:
            if not same_as(k, v, given[k], basis):
                bad.append(f"{k}: the checkpoint has {v!r}, {label} gives {given[k]!r}")
        else:
            fields[k] = v
    missing.update({k: why for k, why in found.unknown.items() if k in names and k not in given})
    return {k: v for k, v in fields.items() if k in names}


def deform_split(prod: int, given: Mapping[str, Any], label: str, value_width: int, rows: str
                 ) -> Any:
    """``(heads, points)`` with ``heads * points == prod``; a message when ``given`` contradicts
    it; ``None`` when nothing decides. ``rows`` says where ``prod`` was read, for messages."""
    heads, points = given.get("deform_num_heads"), given.get("n_points")
    what = f"deform_num_heads * n_points: the checkpoint has {prod} ({rows})"
    if heads is not None and points is not None:
        return (heads, points) if heads * points == prod else f"{what}, {label} gives {heads} * {points}"
    if heads is not None or points is not None:
        one = heads if heads is not None else points
        if prod % one:
            return f"{what}, not a multiple of {label}'s {one}"
        return (one, prod // one) if heads is not None else (prod // one, one)
    if prod % 4 == 0 and value_width % (prod // 4) == 0:
        return prod // 4, 4
    if prod % 6 == 0 and value_width % 6 == 0:
        return 6, prod // 6
    return None


def raise_problems(bad: List[str], missing: Mapping[str, str], hint: str = HINT) -> None:
    """One ``ConversionError`` for every contradiction, else for every field nobody decides."""
    if bad:
        raise ConversionError("config does not match the checkpoint: " + "; ".join(bad))
    if missing:
        why = "; ".join(f"{k} ({v})" for k, v in missing.items())
        raise ConversionError(f"cannot infer {why} from the checkpoint: {hint}")


def build(cls: type, fields: Mapping[str, Any], label: str) -> Any:
    """``cls.from_dict(fields)``, its refusal as a ``ConversionError`` naming ``label``."""
    try:
        return cls.from_dict(dict(fields))
    except (TypeError, ValueError) as e:
        raise ConversionError(f"invalid config ({label}): {e}") from None


# ---------------------------------------------------------------------------------------------
# The rule, for any family (``family``: a :class:`convert.formats.base.Family`)


def resolve(family: Any, inferred: Inferred, given_trunk: Mapping[str, Any],
            given_adapter: Mapping[str, Any], label: str, kind: str, *, hint: str = HINT) -> Any:
    """The config object of ``kind`` for the source ``inferred`` describes, with the given fields;
    one ``ConversionError`` naming every contradiction or undecided field."""
    bad: List[str] = []
    missing: Dict[str, str] = {}
    trunk = merge(inferred.trunk, given_trunk, label, family.trunk_fields, bad, missing, family.same)
    adapter: Dict[str, Any] = {}
    if kind == family.adapter_kind:
        adapter = merge(inferred.adapter, given_adapter, label, family.adapter_fields, bad, missing,
                        family.same)
        if inferred.heads_x_points is not None:
            ratio = float(adapter.get("deform_ratio", registry.kind(kind).config.deform_ratio))
            split = deform_split(inferred.heads_x_points, given_adapter, label,
                                 int(trunk["embed_dim"] * ratio), "attention_weights rows / levels")
            if isinstance(split, str):
                bad.append(split)
            elif split is None:
                missing["deform_num_heads"] = f"{inferred.heads_x_points} = heads * points has no default split"
            else:
                adapter["deform_num_heads"], adapter["n_points"] = split
    family.check_fields(inferred, trunk, adapter, given_adapter, label, kind, bad)
    raise_problems(bad, missing, hint)
    return build(registry.kind(kind).config, family.assemble(trunk, adapter, kind), label)


def configure(family: Any, shapes: Shapes, source_shapes: Shapes, fmt: str, hf_config: Any,
              config: Any, preset: Optional[str], kind: str) -> Configured:
    """The converted model's config: the tensors (``shapes``, canonical names of ``kind``) with
    ``--config`` / ``--preset``."""
    inferred = family.infer(shapes, source_shapes, fmt, hf_config, kind)
    trunk, adapter, label = given_fields(config, preset, family.split, kind)
    return Configured(resolve(family, inferred, trunk, adapter, label, kind), dict(inferred.provenance))


def describe(family: Any, shapes: Shapes, source_shapes: Shapes, fmt: str, hf_config: Any,
             kind: str) -> Dict[str, Any]:
    """``inspect``'s fields of a source: the config its tensors give (or as much of it as they
    decide, with ``unresolved`` saying what a conversion would need), the variant, provenance."""
    inferred = family.infer(shapes, source_shapes, fmt, hf_config, kind)
    info: Dict[str, Any] = {}
    try:
        info["config"] = resolve(family, inferred, {}, {}, "no config", kind,
                                 hint="jax-adapter convert needs --config or --preset for it").to_dict()
    except ValueError as e:
        trunk = {k: v for k, v in {**inferred.trunk.defaults, **inferred.trunk.fixed}.items()
                 if k in family.trunk_fields}
        adapter = {k: v for k, v in {**inferred.adapter.defaults, **inferred.adapter.fixed}.items()
                   if k in family.adapter_fields}
        info["config"] = family.assemble(trunk, adapter, kind)
        info["unresolved"] = str(e)
    info.update(inferred.provenance)
    info["variant"] = family.variant(info["config"])
    return info
