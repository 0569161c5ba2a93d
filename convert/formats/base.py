"""The records of the converter registry: a :class:`Family` (what all formats of one model
family share) and a :class:`Format` (one checkpoint naming scheme)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..resolve import Configured, same  # noqa: F401 - Configured: the families' result type

Shapes = Mapping[str, Tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Family:
    """What all formats of one model family share.

    Kinds and names: ``trunk_kind`` / ``adapter_kind`` (registry kinds); ``trunk_prefix``, where
    the trunk's canonical names sit inside the adapter's (``""`` for the DINOv2 DinoAdapter, whose
    trunk parameters are top-level; ``"backbone."`` for DINOv3); ``is_trunk_key``, whether an
    adapter-canonical name belongs to the trunk.

    Configs (:mod:`convert.resolve` runs the one rule with these): ``infer(shapes,
    source_shapes, format, hf_config, kind) -> Inferred`` (``shapes``: canonical names of
    ``kind``; ``source_shapes``: the source's own, buffers included); ``split(dict, label, kind)
    -> (trunk fields, adapter fields)`` of a given config in any style the family reads;
    ``assemble(trunk, adapter, kind) -> dict`` of the kind's config class; ``check_fields``: the
    family's rules between the tensors and the merged fields (appends messages); ``same``: how
    two values of a field compare; ``trunk_fields`` / ``adapter_fields``: the names each part
    takes; ``variant(config dict)``: the architecture name of a config of hub shape, or None.

    Data and files: ``check(source_tensors, canonical_tensors, config, kind)``: checks that need
    the config (reads only small tensors; raises ``ValueError``); ``check_files(file_records)``:
    checks on the source files (names vs hashes); ``optional(key)``: canonical keys the model may
    lack (dropped then, not "unexpected"). Export: ``export_trunk(sd, config)`` /
    ``export_adapter(sd, config)``: canonical torch-layout arrays -> the upstream ``state_dict``
    (buffers added back), named ``trunk_names`` / ``adapter_names`` in the export record.
    """

    name: str
    trunk_kind: str
    adapter_kind: str
    trunk_prefix: str
    is_trunk_key: Callable[[str], bool]
    infer: Callable[..., Any]
    split: Callable[[Dict[str, Any], str, str], Tuple[Dict[str, Any], Dict[str, Any]]]
    assemble: Callable[[Dict[str, Any], Dict[str, Any], str], Dict[str, Any]]
    check_fields: Callable[..., None]
    trunk_fields: Tuple[str, ...]
    adapter_fields: Tuple[str, ...]
    export_trunk: Callable[[Dict[str, Any], Any], Dict[str, Any]]
    export_adapter: Callable[[Dict[str, Any], Any], Dict[str, Any]]
    trunk_names: str
    adapter_names: str
    same: Callable[[str, Any, Any, Mapping[str, Any]], bool] = same
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


