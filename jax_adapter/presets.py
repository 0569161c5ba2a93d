"""Earlier names of the registry's lookups, kept for existing code.

New code uses :mod:`jax_adapter.registry` (``registry.config_of(name)``), the config classes'
``preset`` methods and :func:`jax_adapter.list_models`. Here, as before, a DINOv2 trunk name
(``dinov2_vitb14``) gives its adapter's config, ``tiny`` the small DINOv2 adapter, and
:func:`trunk_config` an architecture's trunk.
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping

from jax_adapter import registry
from jax_adapter.files import read_json  # noqa: F401 - earlier home
from jax_adapter.models import config_from_dict, load_config_file  # noqa: F401 - earlier home


def names() -> List[str]:
    return registry.list_models() + ["tiny"]


def get(name: str) -> Any:
    """The config of preset ``name``: a DINOv2 trunk name gives its adapter (the earlier meaning);
    every other name its own architecture's config."""
    arch = registry.architecture(name)
    k = registry.kind(arch.kind)
    if k.family == "dinov2" and k.role == "trunk" and registry.is_architecture(arch.name + "_adapter"):
        arch = registry.architecture(arch.name + "_adapter")
    return arch.config()


def trunk_config(name: str) -> Any:
    """The trunk config of preset ``name`` (an adapter's trunk, or the trunk itself)."""
    arch = registry.architecture(name)
    return registry.config_of(arch.trunk) if arch.trunk else arch.config()


class _Presets(Mapping):
    """``{name: config factory}`` of every preset, in registration order."""

    def __getitem__(self, name: str) -> Callable[[], Any]:
        registry.architecture(name)
        return lambda: get(name)

    def __iter__(self):
        return iter(names())

    def __len__(self) -> int:
        return len(names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and registry.is_architecture(name)


PRESETS = _Presets()
