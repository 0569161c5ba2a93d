"""jax-adapter: ViT-Adapter backbones around DINO vision transformers in JAX / Flax NNX.

Layout is NHWC throughout. ``DinoAdapter(cfg, rngs=nnx.Rngs(0))(images [B, H, W, 3])`` returns
``AdapterOutput(features=(f1, f2, f3, f4), vit=map)``; all shapes come from the static
:class:`AdapterGeometry` of the input size.

Package layout: ``nn`` (shared building blocks), ``models`` (one file per trunk family and per
adapter variant), ``presets``, ``checkpoint`` (this library's checkpoint directories),
``training``, ``cli``; ``convert`` (PyTorch / Hugging Face weights in and out) and
``pallas_kernels`` (GPU kernels of the sampling core) sit beside them. ``hub`` resolves
pretrained names, URLs and ``hf-hub:`` names to cached downloads, ``pretrained`` (behind
:func:`load_pretrained`) converts and caches them, ``preprocessing`` (behind :func:`preprocess`)
turns images into model input, and ``viz`` draws the PCA of feature maps.
"""

from jax_adapter.checkpoint import save_pretrained
from jax_adapter.errors import JaxAdapterError
from jax_adapter.models.common import AdapterOutput, TrunkOutput
from jax_adapter.models.dinov2 import DinoV2, DinoV2Config, DinoV2Output
from jax_adapter.models.dinov2_adapter import AdapterConfig, DinoAdapter
from jax_adapter.models.dinov3 import DinoV3, DinoV3Config
from jax_adapter.models.dinov3_adapter import DinoV3Adapter, DinoV3AdapterConfig
from jax_adapter.nn import msda
from jax_adapter.nn.geometry import AdapterGeometry, compute_geometry
from jax_adapter.presets import PRESETS
from jax_adapter.pretrained import load_pretrained
from jax_adapter.preprocessing import preprocess

ops = msda  # the sampling core's earlier public name

__all__ = [
    "AdapterConfig", "AdapterGeometry", "AdapterOutput", "DinoAdapter", "DinoV2", "DinoV2Config",
    "DinoV2Output", "DinoV3", "DinoV3Adapter", "DinoV3AdapterConfig", "DinoV3Config", "JaxAdapterError", "PRESETS", "TrunkOutput", "compute_geometry",
    "load_pretrained", "msda", "ops", "preprocess", "save_pretrained",
]
