"""jax-adapter: ViT-Adapter backbones around DINO vision transformers in JAX / Flax NNX.

Layout is NHWC throughout. ``create_model("dinov2_vitb14_adapter")(images [B, H, W, 3])``
returns ``AdapterOutput(features=(f1, f2, f3, f4), vit=map)``; all shapes come from the static
:class:`AdapterGeometry` of the input size. ``list_models()`` and ``list_pretrained()`` say what
there is (:mod:`jax_adapter.registry`).

Packages: ``nn`` (shared building blocks), ``models`` (one package per family: config, trunk,
adapter, presets), ``training``, ``cli``; ``convert`` (PyTorch / Hugging Face weights in and out)
and ``pallas_kernels`` (the sampling core's kernels) sit beside them. ``hub`` resolves names to
cached downloads, ``pretrained`` (behind :func:`create_model` and :func:`load_pretrained`)
converts and caches them, ``checkpoint`` is the on-disk format, ``preprocessing`` (behind
:func:`preprocess`) turns images into model input, and ``viz`` draws the PCA of feature maps.
``compilation`` holds the target every dispatch decision reads (:func:`target`), and ``plan``
compiles for GPUs and TPUs this machine does not have.
"""

from jax_adapter import memory

memory.apply_default()  # before JAX starts its threads (see jax_adapter.memory)

from jax_adapter import registry  # noqa: E402
from jax_adapter.compilation import Target, target  # noqa: E402
from jax_adapter.errors import JaxAdapterError  # noqa: E402
from jax_adapter.models.base import AdapterOutput, TrunkOutput  # noqa: E402
from jax_adapter.models.dinov2 import (  # noqa: E402
    AdapterConfig, DinoAdapter, DinoV2, DinoV2Adapter, DinoV2AdapterConfig, DinoV2Config, DinoV2Output)
from jax_adapter.models.dinov3 import DinoV3, DinoV3Adapter, DinoV3AdapterConfig, DinoV3Config  # noqa: E402
from jax_adapter.nn import msda  # noqa: E402
from jax_adapter.nn.geometry import AdapterGeometry, compute_geometry  # noqa: E402
from jax_adapter.presets import PRESETS  # noqa: E402
from jax_adapter.pretrained import (  # noqa: E402
    create_model, list_models, list_pretrained, load_checkpoint, load_pretrained, save_pretrained)
from jax_adapter.preprocessing import preprocess  # noqa: E402

ops = msda  # the sampling core's earlier public name

__all__ = [
    "AdapterConfig", "AdapterGeometry", "AdapterOutput", "DinoAdapter", "DinoV2", "DinoV2Adapter",
    "DinoV2AdapterConfig", "DinoV2Config", "DinoV2Output", "DinoV3", "DinoV3Adapter", "DinoV3AdapterConfig",
    "DinoV3Config", "JaxAdapterError", "PRESETS", "Target", "TrunkOutput", "compute_geometry", "create_model",
    "list_models", "list_pretrained", "load_checkpoint", "load_pretrained", "msda", "ops", "preprocess",
    "registry", "save_pretrained", "target",
]
