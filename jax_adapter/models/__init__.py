"""Model families, one package each with the same files (``config``, ``trunk``, ``adapter``,
``presets``), and what they share (``base``). Importing this package registers every family in
:mod:`jax_adapter.registry`.

A third family is one more package here (and its converter module in ``convert/formats``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

from jax_adapter import registry
from jax_adapter.errors import ConfigError
from jax_adapter.files import read_json
from jax_adapter.models import dinov2, dinov3
from jax_adapter.models.dinov2 import DinoV2AdapterConfig
from jax_adapter.models.dinov3 import DinoV3AdapterConfig, DinoV3Config

_DINOV3_ONLY = frozenset(f.name for f in dataclasses.fields(DinoV3Config)) - frozenset(
    f.name for f in dataclasses.fields(DinoV2AdapterConfig))


def config_from_dict(d: Dict[str, Any]) -> Any:
    """The config a dict of fields describes (PyTorch keyword arguments or our own fields):
    with ``"backbone"`` a DINOv3 adapter (``DINOv3_Adapter`` arguments + the trunk's); with
    ``DinoVisionTransformer`` arguments only (at least one DINOv3-specific one, such as
    ``n_storage_tokens`` or ``ffn_ratio``) a DINOv3 trunk; otherwise a DINOv2 adapter (the seed
    ``DinoAdapter``'s arguments)."""
    if "backbone" in d:
        return DinoV3AdapterConfig.from_dict(d)
    if "interaction_indexes" not in d and set(d) & _DINOV3_ONLY:
        return DinoV3Config.from_dict(d)
    return DinoV2AdapterConfig.from_dict(d)


def load_config_file(path: str) -> Any:
    """A model config from a JSON file of PyTorch keyword arguments (or our own fields)."""
    d = read_json(path, ConfigError)
    try:
        return config_from_dict(d)
    except (TypeError, ConfigError) as e:
        raise ConfigError(f"{path}: {e}") from None


def config_for(name: str) -> Any:
    """A registered architecture's config (``jax_adapter.list_models()``) or a JSON config file."""
    if registry.is_architecture(name):
        return registry.config_of(name)
    import os

    if os.path.isfile(name):
        return load_config_file(name)
    raise ConfigError(f"{name!r} is neither a registered model ({', '.join(registry.list_models())}) "
                      "nor a config file")


__all__ = ["config_for", "config_from_dict", "dinov2", "dinov3", "load_config_file"]
