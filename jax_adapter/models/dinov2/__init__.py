"""The DINOv2 family: the trunk (patch 14, optional registers) and the seed's ViT-Adapter.

Files: ``config`` (both configs), ``trunk`` (:class:`DinoV2`), ``adapter``
(:class:`DinoV2Adapter`), ``presets`` (the registry entries: kinds, architectures, weights).
"""

from jax_adapter.models.dinov2.adapter import DinoAdapter, DinoV2Adapter
from jax_adapter.models.dinov2.config import DinoV2AdapterConfig, DinoV2Config
from jax_adapter.models.dinov2.trunk import DinoV2, DinoV2Output
from jax_adapter.models.dinov2 import presets  # noqa: F401 - registers the family

# The seed's and this library's earlier names.
AdapterConfig = DinoV2AdapterConfig

__all__ = ["AdapterConfig", "DinoAdapter", "DinoV2", "DinoV2Adapter", "DinoV2AdapterConfig",
           "DinoV2Config", "DinoV2Output"]
