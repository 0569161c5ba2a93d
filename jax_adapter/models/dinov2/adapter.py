"""The seed's ViT-Adapter around a DINOv2 trunk (docs/SPEC.md section 5; ``DinoAdapter`` in
PyTorch).

``model(images [B, H, W, 3])`` -> ``AdapterOutput(features=(f1, f2, f3, f4), vit=map)``, all
NHWC, for any input size that gives non-empty outputs. All shapes come from
:func:`jax_adapter.nn.geometry.compute_geometry`.
"""

from __future__ import annotations

from typing import ClassVar, Tuple

import jax
from flax import nnx

from jax_adapter.models.base import AdapterOutput
from jax_adapter.models.dinov2.config import DinoV2AdapterConfig
from jax_adapter.models.dinov2.trunk import DinoV2, add_trunk_parameters, embed_tokens
from jax_adapter.nn.geometry import AdapterGeometry, compute_geometry
from jax_adapter.nn.images import check_images
from jax_adapter.nn.interaction import InteractionBlock
from jax_adapter.nn.layers import layer_norm
from jax_adapter.nn.neck import AdapterNeck, pad_input


class DinoV2Adapter(AdapterNeck):
    """ViT-Adapter with a DINOv2 trunk. Constructed in eval mode; call ``.train()`` to train.

    The trunk's parameters sit at the top level under the hub's names (``TRUNK_PATH`` is empty),
    as in the PyTorch ``DinoAdapter``; its blocks run inside the interactions, after each
    injector.
    """

    TRUNK_CLASS: ClassVar[type] = DinoV2
    TRUNK_PATH: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, cfg: DinoV2AdapterConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.embed_dim
        trunk = cfg.trunk_config()
        add_trunk_parameters(self, trunk, rngs=rngs)
        # The trunk's final LayerNorm: unused by the adapter's outputs, kept so that the
        # parameters round-trip with PyTorch checkpoints.
        self.norm = layer_norm(d, dtype=trunk.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.init_neck(cfg, InteractionBlock, rngs=rngs)

    @property
    def frozen_submodules(self) -> Tuple[str, ...]:
        """No submodule is always frozen (the trunk's parameters are top-level, frozen by the
        training filter when asked)."""
        return ()

    def geometry(self, height: int, width: int) -> AdapterGeometry:
        """The static geometry for ``height x width`` inputs (``InputError`` if too small)."""
        return compute_geometry(height, width, self.cfg.patch_size)

    def __call__(self, images: jax.Array) -> AdapterOutput:
        check_images(images)
        b, h, w, _ = images.shape
        geom = self.geometry(h, w)
        cfg = self.cfg
        # Everything downstream runs in the compute dtype (outputs included).
        x = pad_input(images, geom, cfg.dtype)
        s1, c = self.neck_in(x, geom)
        prefix, tokens, grid = embed_tokens(self, cfg.trunk_config(), x)
        assert grid == geom.vit_grid, (grid, geom.vit_grid)
        outs = []
        for layer, (first, last) in zip(self.interactions, cfg.interaction_indexes):
            blocks = [self.blocks[j] for j in range(first, last + 1)]
            tokens, c, prefix = layer(tokens, c, prefix, blocks, geom)
            outs.append(tokens.reshape(b, *geom.vit_grid, cfg.embed_dim))
        return self.neck_out(s1, c, outs, geom, add_vit_feature=cfg.add_vit_feature)


# The seed's and this library's earlier name.
DinoAdapter = DinoV2Adapter
