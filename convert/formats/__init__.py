"""The registry of source formats: one :class:`Format` record per checkpoint naming scheme.

A record says how to recognise a format (``detect`` over prefix-stripped keys, ``anchors`` that
locate a backbone inside a larger file), how to rename its tensors into the library's canonical
PyTorch names (``to_canonical``) and back for messages (``source_names``). Each record belongs to
a :class:`Family` (DINOv2, DINOv3), which knows the family's two checkpoint kinds (trunk,
adapter), how a trunk sits inside its adapter, how to infer and resolve a config, what to check
once the config is known, and how to write the upstream names back on export.

The pipeline (:mod:`..pipeline`) looks records up by name and never branches on format strings,
so a new family is one package here (``keys``, ``infer``, ``export``; the records in its
``__init__``) plus its registration below. The records' types are in :mod:`.base`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

from jax_adapter.errors import ConversionError

from . import dinov2, dinov3
from .base import Family, Format

_FORMATS: Dict[str, Format] = {}
_FAMILIES: Dict[str, Family] = {}


def register(fmt: Format) -> None:
    """Add a format (detection tries formats in registration order)."""
    _FORMATS[fmt.name] = fmt
    _FAMILIES[fmt.family.name] = fmt.family


def get(name: str) -> Format:
    if name not in _FORMATS:
        raise ConversionError(f"unknown source format {name!r}; known: {', '.join(_FORMATS)}")
    return _FORMATS[name]


def names() -> List[str]:
    return list(_FORMATS)


def family_of_kind(kind: str) -> Family:
    """The family whose trunk or adapter checkpoint kind is ``kind``."""
    for fam in _FAMILIES.values():
        if kind in (fam.trunk_kind, fam.adapter_kind):
            return fam
    raise ConversionError(f"no converter knows checkpoint kind {kind!r}")


def anchors() -> List[Tuple[str, str]]:
    """Every format's anchors, without repeats."""
    out: List[Tuple[str, str]] = []
    for fmt in _FORMATS.values():
        out += [a for a in fmt.anchors if a not in out]
    return out


def detect_format(keys) -> str:
    """The name of the first registered format whose ``detect`` accepts ``keys``."""
    keys = set(keys)
    for fmt in _FORMATS.values():
        if fmt.detect(keys):
            return fmt.name
    sample = ", ".join(sorted(keys)[:4])
    raise ConversionError(
        f"unknown checkpoint format: none of {', '.join(_FORMATS)} "
        f"(found {len(keys)} tensors: {sample}{', ...' if len(keys) > 4 else ''})"
    )


def hf_format(hf_config: Optional[Mapping[str, Any]], detected: str) -> Tuple[str, Optional[Mapping[str, Any]]]:
    """The format a Hugging Face ``config.json`` beside the weights names, and the config if it
    describes the detected format's family (else None: an unrelated config.json is ignored)."""
    if hf_config is None:
        return detected, None
    family = get(detected).family
    model_type = str(hf_config.get("model_type", ""))
    for fmt in _FORMATS.values():
        if model_type in fmt.hf_model_types and fmt.family is family:
            if not get(detected).hf_model_types:
                return detected, None  # the weights are not Hugging Face's: ignore the config
            return fmt.name, hf_config
    return detected, None


def hf_model_types() -> Tuple[str, ...]:
    return tuple(t for fmt in _FORMATS.values() for t in fmt.hf_model_types)


# Registration order is detection order: the DINOv3 formats recognise themselves by keys that
# DINOv2 files never hold, so they go first.
for _fmt in dinov3.FORMATS + dinov2.FORMATS:
    register(_fmt)
