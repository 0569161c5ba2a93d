"""The registry of source formats: one :class:`Format` record per checkpoint naming scheme.

A record says how to recognise a format (``detect`` over prefix-stripped keys, ``anchors`` that
locate a backbone inside a larger file), how to rename its tensors into the library's canonical
PyTorch names (``to_canonical``) and back for messages (``source_names``). Each record belongs to
a :class:`Family` (DINOv2, DINOv3), which knows the family's two checkpoint kinds (trunk,
adapter), how a trunk sits inside its adapter, how to infer and resolve a config, what to check
once the config is known, and how to write the upstream names back on export.

The pipeline (:mod:`..pipeline`) looks records up by name and never branches on format strings,
so a new family is one module here plus its registration below.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from jax_adapter.errors import ConversionError

Shapes = Mapping[str, Tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Configured:
    """A resolved config and what the provenance record should say about it."""

    config: Any  # the kind's config object (has ``to_dict``)
    provenance: Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Family:
    """What all formats of one model family share.

    ``trunk_prefix``: where the trunk's canonical names sit inside the adapter's (``""`` for the
    DINOv2 DinoAdapter, whose trunk parameters are top-level; ``"backbone."`` for DINOv3).
    ``is_trunk_key``: whether an adapter-canonical name belongs to the trunk.
    ``configure(shapes, source_shapes, format, hf_config, config, preset, kind)`` ->
    :class:`Configured` (``shapes``: canonical names of ``kind``; ``source_shapes``: the
    source's own, buffers included).
    ``describe(shapes, source_shapes, format, hf_config, kind)`` -> ``inspect``'s fields
    (``config``, ``variant``, ``unresolved`` when a config would be needed), never raising on
    an incomplete config.
    ``variant(config dict)``: the preset name of a config of hub shape, or None.
    ``check(source_tensors, canonical_tensors, config, kind)``: data checks that need the
    config (reads only small tensors); raises ``ValueError``.
    ``check_files(file_records)``: checks on the source files (names vs hashes).
    ``optional(key)``: canonical keys the model may lack (dropped then, not "unexpected").
    ``export_trunk(sd, config)`` / ``export_adapter(sd, config)``: canonical torch-layout
    arrays -> the upstream ``state_dict`` (buffers added back).
    """

    name: str
    trunk_kind: str
    adapter_kind: str
    trunk_prefix: str
    is_trunk_key: Callable[[str], bool]
    configure: Callable[..., Configured]
    describe: Callable[..., Dict[str, Any]]
    export_trunk: Callable[[Dict[str, Any], Any], Dict[str, Any]]
    export_adapter: Callable[[Dict[str, Any], Any], Dict[str, Any]]
    trunk_names: str  # what export_trunk writes, for the export record
    adapter_names: str
    variant: Callable[[Mapping[str, Any]], Optional[str]] = lambda cfg: None
    check: Callable[..., None] = lambda source, tensors, config, kind: None
    check_files: Callable[[Sequence[dict]], None] = lambda records: None
    optional: Callable[[str], bool] = lambda key: False

    def trunk_of(self, sd: Mapping[str, Any]) -> Dict[str, Any]:
        """The trunk's part of adapter-canonical tensors, in trunk names."""
        p = self.trunk_prefix
        return {k[len(p):]: v for k, v in sd.items() if self.is_trunk_key(k)}

    def in_adapter(self, sd: Mapping[str, Any]) -> Dict[str, Any]:
        """Trunk-canonical tensors in the adapter's names."""
        return {self.trunk_prefix + k: v for k, v in sd.items()}


@dataclasses.dataclass(frozen=True)
class Format:
    """One source naming scheme.

    ``anchors``: ``(marker, companion)`` key pairs; a key ending in ``marker`` puts a backbone
    candidate at its prefix, confirmed when ``prefix + companion`` exists too.
    ``holds_adapter``: the format's canonical names are the adapter's (else the trunk's).
    ``hf_model_types``: the ``config.json`` ``model_type`` values that describe this format.
    """

    name: str
    family: Family
    detect: Callable[[set], bool]
    to_canonical: Callable[[Mapping[str, Any]], Dict[str, Any]]
    source_names: Callable[[str], List[str]] = lambda key: [key]
    anchors: Tuple[Tuple[str, str], ...] = ()
    holds_adapter: bool = False
    hf_model_types: Tuple[str, ...] = ()


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
from . import dinov3 as _dinov3  # noqa: E402
from . import dinov2 as _dinov2  # noqa: E402

for _fmt in _dinov3.FORMATS + _dinov2.FORMATS:
    register(_fmt)
