"""``DinoAdapter``: the ViT-Adapter backbone around a DINOv2 trunk (SPEC section 5).

``model(images [B, H, W, 3])`` -> ``AdapterOutput(features=(f1, f2, f3, f4), vit=map)``, all
NHWC, for any input size that gives non-empty outputs. All shapes come from
:func:`jax_adapter.geometry.compute_geometry`.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_adapter.config import AdapterConfig
from jax_adapter.dinov2 import add_trunk_parameters, embed_tokens
from jax_adapter.geometry import AdapterGeometry, compute_geometry
from jax_adapter.images import check_images, pad_bottom_right
from jax_adapter.interaction import InteractionBlock
from jax_adapter.layers import BatchNorm2d, ConvTranspose2x2, layer_norm
from jax_adapter.resize import resize_nhwc
from jax_adapter.spm import SpatialPriorModule


class AdapterOutput(NamedTuple):
    """``features``: ``f1..f4`` at strides 4, 8, 16, 32, ``[B, h_i, w_i, D]``; ``vit``:
    the final patch tokens as a ``[B, h/p, w/p, D]`` map (no final LayerNorm)."""

    features: Tuple[jax.Array, jax.Array, jax.Array, jax.Array]
    vit: jax.Array


class DinoAdapter(nnx.Module):
    """ViT-Adapter with a DINOv2 trunk. Constructed in eval mode; call ``.train()`` to train."""

    def __init__(self, cfg: AdapterConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.embed_dim
        add_trunk_parameters(self, cfg.trunk_config(), rngs=rngs)
        # The trunk's final LayerNorm: unused by the adapter's outputs, kept so that the
        # parameters round-trip with PyTorch checkpoints.
        self.norm = layer_norm(d, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        pd = jnp.dtype(cfg.param_dtype)
        self.level_embed = nnx.Param(jax.random.normal(rngs.params(), (3, d)).astype(pd))
        self.spm = SpatialPriorModule(cfg.conv_inplane, d, dtype=cfg.dtype, param_dtype=pd, rngs=rngs)
        n = len(cfg.interaction_indexes)
        self.interactions = nnx.List([
            InteractionBlock(cfg, extra_extractors=cfg.use_extra_extractor and i == n - 1, rngs=rngs)
            for i in range(n)
        ])
        self.up = ConvTranspose2x2(d, d, param_dtype=pd, rngs=rngs)
        self.norm1 = BatchNorm2d(d, param_dtype=pd)
        self.norm2 = BatchNorm2d(d, param_dtype=pd)
        self.norm3 = BatchNorm2d(d, param_dtype=pd)
        self.norm4 = BatchNorm2d(d, param_dtype=pd)

    def geometry(self, height: int, width: int) -> AdapterGeometry:
        """The static geometry for ``height x width`` inputs (raises ``ValueError`` if too small)."""
        return compute_geometry(height, width, self.cfg.patch_size)

    def __call__(self, images: jax.Array) -> AdapterOutput:
        check_images(images)
        b, h, w, _ = images.shape
        geom = self.geometry(h, w)
        d = self.cfg.embed_dim
        # Everything downstream runs in the compute dtype (outputs included).
        x = pad_bottom_right(images.astype(self.cfg.dtype), geom.padded)

        c1, c2, c3, c4 = self.spm(x, geom)
        level_embed = self.level_embed[...].astype(c2.dtype)
        c = jnp.concatenate([c2 + level_embed[0], c3 + level_embed[1], c4 + level_embed[2]], axis=1)

        prefix, tokens, grid = embed_tokens(self, self.cfg.trunk_config(), x)
        assert grid == geom.vit_grid, (grid, geom.vit_grid)
        outs = []
        for layer, (first, last) in zip(self.interactions, self.cfg.interaction_indexes):
            blocks = [self.blocks[j] for j in range(first, last + 1)]
            tokens, c, prefix = layer(tokens, c, prefix, blocks, geom)
            outs.append(tokens.reshape(b, *geom.vit_grid, d))

        c2, c3, c4 = (
            c[:, start:start + n].reshape(b, hh, ww, d)
            for (hh, ww), start, n in zip(geom.level_shapes, geom.level_starts, geom.level_lengths)
        )
        up = self.up(c2)
        if up.shape[1:3] != c1.shape[1:3]:
            # Odd c1 sides: the upsampled c2 is one pixel larger; the reference resizes it.
            up = resize_nhwc(up, c1.shape[1:3], "bilinear")
        maps = [c1 + up, c2, c3, c4]
        if self.cfg.add_vit_feature:
            # Defined here for patch 14 (the reference crashes): each ViT map resized to the
            # exact SPM level shape.
            maps = [m + resize_nhwc(o, m.shape[1:3], "bilinear") for m, o in zip(maps, outs)]
        norms = (self.norm1, self.norm2, self.norm3, self.norm4)
        feats = [norm(m) for norm, m in zip(norms, maps)]
        vit = outs[-1]
        if geom.needs_crop:
            feats = [f[:, :oh, :ow] for f, (oh, ow) in zip(feats, geom.output_sizes)]
            vit = vit[:, :geom.vit_output_size[0], :geom.vit_output_size[1]]
        return AdapterOutput(features=tuple(feats), vit=vit)
