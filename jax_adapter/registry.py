"""What models and weights there are: a leaf registry that every model family registers into.

Three kinds of entries, each keyed by one string used everywhere (checkpoint records, configs,
converters, the command line):

- a :class:`Kind` is a model class with its config class (``"dinov2"``: :class:`DinoV2`,
  ``"dinov2_adapter"``, ``"dinov3"``, ``"dinov3_adapter"``); checkpoint directories record it;
- an :class:`Architecture` is a named config of a kind (``"dinov2_vitb14"`` is the ViT-B/14
  trunk, ``"dinov2_vitb14_adapter"`` the seed's ViT-Adapter around it): trunk names are bare,
  adapter names end in ``_adapter``, in every family;
- a :class:`Weights` entry is a published checkpoint of an architecture, named
  ``<architecture>.<tag>`` (``"dinov2_vitb14.lvd142m"``, ``"dinov3_vitl16_sat.sat493m"``), with
  its URL (or why there is none: DINOv3 is gated), its sha256 prefix, the image statistics it
  was trained with, its licence and its source format.

This module imports nothing of the project but its error types: model packages import it and
register themselves (``jax_adapter.models.dinov2.presets``), as timm's models do, so that
``import jax_adapter`` fills it. Lookups live here; building models is
:func:`jax_adapter.create_model`'s.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Dict, List, Optional, Tuple

from jax_adapter.errors import ConfigError

ROLES = ("trunk", "adapter")


@dataclasses.dataclass(frozen=True)
class Kind:
    """A model class and its config class. ``trunk``: for an adapter, the kind of trunk it holds
    (its pretrained weights are that trunk's)."""

    name: str
    family: str
    role: str
    model: type
    config: type
    trunk: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A named config of a kind. ``trunk``: for an adapter, the trunk architecture whose
    weights it takes; ``aliases``: earlier names that still resolve to it."""

    name: str
    kind: str
    config: Callable[[], Any]
    trunk: Optional[str] = None
    aliases: Tuple[str, ...] = ()
    description: str = ""


@dataclasses.dataclass(frozen=True)
class Weights:
    """Published weights of an architecture.

    ``url``: where to download them, or ``None`` when they are gated (``gated`` then says how to
    get them; a signed URL is passed to :func:`jax_adapter.load_pretrained` directly).
    ``file_name``: the upstream file name; ``sha256``: the hash prefix (or whole digest) the
    file must have, ``None`` where upstream publishes none. ``hf_repo``: the Hugging Face
    repository that holds the same weights (``hf-hub:<hf_repo>`` loads them). ``mean`` / ``std``: the per-channel
    statistics of pixels in [0, 1] that the weights were trained with. ``source_format``: the
    converter's name for the file's format.
    """

    name: str
    architecture: str
    file_name: str
    url: Optional[str]
    sha256: Optional[str]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    license: str
    source_format: str
    gated: Optional[str] = None
    aliases: Tuple[str, ...] = ()
    hf_repo: Optional[str] = None  # the same weights as a Hugging Face model repository

    @property
    def tag(self) -> str:
        return self.name.partition(".")[2]


_KINDS: Dict[str, Kind] = {}
_ARCHS: Dict[str, Architecture] = {}
_WEIGHTS: Dict[str, Weights] = {}
_ALIASES: Dict[str, str] = {}  # earlier names -> current names (architectures, weights, kinds)


def _check_new(name: str, table: Dict[str, Any]) -> None:
    if name in table or name in _ALIASES:
        raise ConfigError(f"{name!r} is registered twice")


def register_kind(name: str, *, family: str, role: str, model: type, config: type,
                  trunk: Optional[str] = None, aliases: Tuple[str, ...] = ()) -> Kind:
    if role not in ROLES:
        raise ConfigError(f"role must be one of {ROLES}, got {role!r}")
    _check_new(name, _KINDS)
    kind = Kind(name, family, role, model, config, trunk)
    _KINDS[name] = kind
    for a in aliases:
        _ALIASES[a] = name
    return kind


def register_model(name: str, kind: str, config: Callable[[], Any], *, trunk: Optional[str] = None,
                   aliases: Tuple[str, ...] = (), description: str = "") -> Architecture:
    """Register architecture ``name`` of ``kind``: ``config()`` gives its config."""
    _check_new(name, _ARCHS)
    if kind not in _KINDS:
        raise ConfigError(f"register kind {kind!r} before its architectures")
    arch = Architecture(name, kind, config, trunk, tuple(aliases), description)
    _ARCHS[name] = arch
    for a in aliases:
        _check_new(a, _ARCHS)
        _ALIASES[a] = name
    return arch


def register_weights(weights: Weights) -> Weights:
    """Register published weights; their architecture must be registered first."""
    _check_new(weights.name, _WEIGHTS)
    arch, _, tag = weights.name.partition(".")
    if not tag or weights.architecture not in _ARCHS:
        raise ConfigError(f"weights {weights.name!r}: expected <architecture>.<tag> of a registered "
                          f"architecture, got architecture {weights.architecture!r}")
    _WEIGHTS[weights.name] = weights
    for a in weights.aliases:
        _check_new(a, _WEIGHTS)
        _ALIASES[a] = weights.name
    return weights


# ---------------------------------------------------------------------------------------------
# Lookups


def canonical(name: str) -> str:
    """The current name of ``name`` (an alias resolves; anything else is returned as it is)."""
    return _ALIASES.get(name, name)


def _lookup(table: Dict[str, Any], name: str, what: str) -> Any:
    name = canonical(name)
    if name not in table:
        raise ConfigError(f"unknown {what} {name!r}; known: {', '.join(table)}")
    return table[name]


def kind(name: str) -> Kind:
    return _lookup(_KINDS, name, "model kind")


def kinds() -> List[Kind]:
    return list(_KINDS.values())


def kind_of_model(model: Any) -> Optional[Kind]:
    """The kind whose model class ``model`` is an instance of (exactly), or ``None``."""
    return next((k for k in _KINDS.values() if type(model) is k.model), None)


def kind_of_config(config: Any) -> Optional[Kind]:
    """The kind whose config class ``config`` is an instance of (exactly), or ``None``."""
    return next((k for k in _KINDS.values() if type(config) is k.config), None)


def is_architecture(name: str) -> bool:
    return canonical(name) in _ARCHS


def architecture(name: str) -> Architecture:
    """The architecture ``name`` (or an alias of it); ``ConfigError`` naming the known ones."""
    return _lookup(_ARCHS, name, "model")


def is_weights(name: str) -> bool:
    return canonical(name) in _WEIGHTS


def weights(name: str) -> Weights:
    return _lookup(_WEIGHTS, name, "pretrained weights")


def find_weights(source: str) -> Optional[Weights]:
    """The registered weights ``source`` names or points at: a weights or architecture name, an
    ``hf-hub:`` name of their repository, or a URL or path whose file name is a registered
    weights file (``...sat493m-eadcf0ff.pth``; any case)."""
    if is_weights(source):
        return weights(source)
    if is_architecture(source):
        own = weights_of(source)
        return own[0] if own else None
    if source.startswith("hf-hub:"):
        repo = source[len("hf-hub:"):].partition("@")[0].lower()
        return next((w for w in _WEIGHTS.values() if w.hf_repo and w.hf_repo.lower() == repo), None)
    base = source.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].lower()
    return next((w for w in _WEIGHTS.values() if base == w.file_name.lower()), None)


def weights_of(arch: str) -> List[Weights]:
    """The weights an architecture can load, its default first: its own, or for an adapter its
    trunk's."""
    a = architecture(arch)
    own = [w for w in _WEIGHTS.values() if w.architecture == a.name]
    if own or a.trunk is None:
        return own
    return weights_of(a.trunk)


def _match(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)


def list_models(pattern: str = "*", *, family: Optional[str] = None, role: Optional[str] = None,
                pretrained: bool = False) -> List[str]:
    """Architecture names matching the glob ``pattern`` (registration order), optionally of one
    family (``"dinov2"``), role (``"trunk"`` / ``"adapter"``) or only those with weights."""
    out = []
    for a in _ARCHS.values():
        k = _KINDS[a.kind]
        if not _match(a.name, pattern) or (family and k.family != family) or (role and k.role != role):
            continue
        if pretrained and not weights_of(a.name):
            continue
        out.append(a.name)
    return out


def list_pretrained(pattern: str = "*", *, include_gated: bool = True) -> List[str]:
    """Weights names (``architecture.tag``) matching the glob ``pattern``."""
    return [w.name for w in _WEIGHTS.values()
            if _match(w.name, pattern) and (include_gated or w.url is not None)]


def in_role(name: str, role: str) -> str:
    """The architecture of ``role`` that ``name`` means: ``name`` itself, a trunk's adapter
    (``"dinov2_vitb14"`` as an adapter is ``"dinov2_vitb14_adapter"``) or an adapter's trunk;
    ``ConfigError`` when there is none."""
    arch = architecture(name)
    k = _KINDS[arch.kind]
    if k.role == role:
        return arch.name
    other = arch.name + "_adapter" if role == "adapter" else arch.trunk
    if other is None or not is_architecture(other):
        example = list_models(role=role)
        raise ConfigError(f"{name!r} is a {k.role} with no {role}: give a {role}"
                          + (f" (e.g. {example[0]})" if example else ""))
    return architecture(other).name


def config_of(name: str, config_class: Optional[type] = None) -> Any:
    """The config of architecture ``name``, which must be a ``config_class`` when given.

    A trunk name asked for as an adapter config gives that trunk's adapter (``"dinov2_vitb14"``
    -> ``"dinov2_vitb14_adapter"``), and an adapter name asked for as a trunk config gives the
    adapter's trunk, as the families' ``Config.preset`` always accepted; anything else of
    another family or role is a ``ConfigError``.
    """
    arch = architecture(name)
    cfg = arch.config()
    if config_class is None or isinstance(cfg, config_class):
        return cfg
    k = _KINDS[arch.kind]
    if k.role == "trunk" and is_architecture(arch.name + "_adapter"):
        adapter = architecture(arch.name + "_adapter")
        if _KINDS[adapter.kind].config is config_class:
            return adapter.config()
    if k.role == "adapter" and arch.trunk is not None:
        trunk = architecture(arch.trunk)
        if _KINDS[trunk.kind].config is config_class:
            return trunk.config()
    raise ConfigError(f"preset {name!r} is a {type(cfg).__name__} ({k.family} {k.role}), not a "
                      f"{config_class.__name__}")
