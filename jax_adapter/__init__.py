"""jax-adapter: the DinoAdapter (ViT-Adapter around DINOv2) in JAX / Flax NNX.

Layout is NHWC throughout. ``DinoAdapter(cfg, rngs=nnx.Rngs(0))(images [B, H, W, 3])`` returns
``AdapterOutput(features=(f1, f2, f3, f4), vit=map)``; all shapes come from the static
:class:`AdapterGeometry` of the input size.
"""

from jax_adapter.adapter import AdapterOutput, DinoAdapter
from jax_adapter.config import PRESETS, AdapterConfig, DinoV2Config
from jax_adapter.dinov2 import DinoV2, DinoV2Output
from jax_adapter.geometry import AdapterGeometry, compute_geometry
from jax_adapter.pretrained import load_pretrained
from jax_adapter import ops

__all__ = [
    "AdapterConfig", "AdapterGeometry", "AdapterOutput", "DinoAdapter", "DinoV2", "DinoV2Config",
    "DinoV2Output", "PRESETS", "compute_geometry", "load_pretrained", "ops",
]
