"""The DINOv3 family: the trunk (patch 16, storage tokens, RoPE) and Meta's ``DINOv3_Adapter``.

Files: ``config`` (both configs), ``trunk`` (:class:`DinoV3`), ``adapter``
(:class:`DinoV3Adapter`), ``presets`` (the registry entries: kinds, architectures, weights).
"""

from jax_adapter.models.dinov3.adapter import DinoV3Adapter
from jax_adapter.models.dinov3.config import DinoV3AdapterConfig, DinoV3Config, default_interaction_indexes
from jax_adapter.models.dinov3.trunk import DinoV3
from jax_adapter.models.dinov3 import presets  # noqa: F401 - registers the family

__all__ = ["DinoV3", "DinoV3Adapter", "DinoV3AdapterConfig", "DinoV3Config", "default_interaction_indexes"]
