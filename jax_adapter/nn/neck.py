"""The part every ViT-Adapter shares around its interactions: the way in (the Spatial Prior
Module and the level embedding) and the way out (split into maps, ``up``, the ViT maps added,
four BatchNorms, the crop).

:class:`AdapterNeck` is a base class of the adapters rather than a submodule, so that its
parameters keep the adapters' PyTorch names (``level_embed``, ``spm.*``, ``up``, ``norm1..4``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jax_adapter.nn.geometry import AdapterGeometry
from jax_adapter.nn.images import pad_bottom_right
from jax_adapter.nn.layers import BatchNorm2d, ConvTranspose2x2, DType
from jax_adapter.nn.resize import resize_nhwc
from jax_adapter.nn.spm import SpatialPriorModule


class AdapterOutput(NamedTuple):
    """``features``: ``f1..f4`` at strides 4, 8, 16, 32, ``[B, h_i, w_i, D]``; ``vit``: a
    ``[B, h/p, w/p, D]`` map of the trunk's tokens (DINOv2 adapter: the final patch tokens with no
    final LayerNorm; DINOv3 adapter: the last tapped layer, final norm applied)."""

    features: Tuple[jax.Array, jax.Array, jax.Array, jax.Array]
    vit: jax.Array


def pad_input(images: jax.Array, geom: AdapterGeometry, dtype: DType) -> jax.Array:
    """``images [B, H, W, 3]`` in ``dtype``, zero-padded at the bottom and right to ``geom.padded``."""
    return pad_bottom_right(images.astype(dtype), geom.padded)


class AdapterNeck(nnx.Module):
    """SPM in, BatchNorms out, the interactions between. Subclasses call :meth:`init_neck`."""

    def init_neck(self, cfg: Any, interaction: Callable[..., nnx.Module], *, rngs: nnx.Rngs) -> None:
        """The SPM and level embedding, one ``interaction(cfg, extra_extractors=..., rngs=...)``
        per entry of ``cfg.interaction_indexes`` (the last one with the two extra extractors when
        ``cfg.use_extra_extractor``), then ``up`` and the BatchNorms: in this order, the order
        the random streams are drawn in."""
        d = cfg.embed_dim
        self.init_neck_in(d, cfg.conv_inplane, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        n = len(cfg.interaction_indexes)
        self.interactions = nnx.List([
            interaction(cfg, extra_extractors=cfg.use_extra_extractor and i == n - 1, rngs=rngs)
            for i in range(n)
        ])
        self.init_neck_out(d, param_dtype=cfg.param_dtype, rngs=rngs)

    def init_neck_in(self, embed_dim: int, conv_inplane: int, *, rngs: nnx.Rngs,
                     dtype: Optional[DType], param_dtype: DType) -> None:
        pd = jnp.dtype(param_dtype)
        self.level_embed = nnx.Param(jax.random.normal(rngs.params(), (3, embed_dim)).astype(pd))
        self.spm = SpatialPriorModule(conv_inplane, embed_dim, dtype=dtype, param_dtype=pd, rngs=rngs)

    def init_neck_out(self, embed_dim: int, *, rngs: nnx.Rngs, param_dtype: DType) -> None:
        pd = jnp.dtype(param_dtype)
        self.up = ConvTranspose2x2(embed_dim, embed_dim, param_dtype=pd, rngs=rngs)
        self.norm1 = BatchNorm2d(embed_dim, param_dtype=pd)
        self.norm2 = BatchNorm2d(embed_dim, param_dtype=pd)
        self.norm3 = BatchNorm2d(embed_dim, param_dtype=pd)
        self.norm4 = BatchNorm2d(embed_dim, param_dtype=pd)

    def neck_in(self, x: jax.Array, geom: AdapterGeometry) -> Tuple[jax.Array, jax.Array]:
        """Padded images ``x [B, Hp, Wp, 3]`` (:func:`pad_input`) -> the SPM's stride-4 stem map
        ``s1 [B, *c1, inplanes]`` (``fc1`` is applied in :meth:`neck_out`) and the level tokens
        ``c [B, c2+c3+c4, D]`` with their level embeddings."""
        s1, c2, c3, c4 = self.spm.prior(x, geom)
        level_embed = self.level_embed[...].astype(c2.dtype)
        c = jnp.concatenate([c2 + level_embed[0], c3 + level_embed[1], c4 + level_embed[2]], axis=1)
        return s1, c

    def neck_out(self, s1: jax.Array, c: jax.Array, vit_maps: Sequence[jax.Array],
                 geom: AdapterGeometry, *, add_vit_feature: bool) -> AdapterOutput:
        """The stem map ``s1`` from :meth:`neck_in`, the refined level tokens ``c`` and four ViT
        maps ``[B, Hv, Wv, D]`` -> f1..f4 and the last ViT map, cropped to the caller's image
        when it was padded."""
        # c1 = fc1(s1) is needed only here. The barrier keeps XLA from computing it early and
        # holding the D-channel map through the trunk (on a TPU its scheduler did, and that map
        # sat under every attention's logits at the forward's peak).
        s1, c = lax.optimization_barrier((s1, c))
        c1 = self.spm.fc1(s1)
        b, d = c.shape[0], c.shape[-1]
        c2, c3, c4 = (
            c[:, start:start + n].reshape(b, hh, ww, d)
            for (hh, ww), start, n in zip(geom.level_shapes, geom.level_starts, geom.level_lengths)
        )
        up = self.up(c2)
        if up.shape[1:3] != c1.shape[1:3]:
            # Odd c1 sides (only off the DINOv3 adapter's multiples of 32): the upsampled c2 is
            # one pixel larger; the reference resizes it.
            up = resize_nhwc(up, c1.shape[1:3], "bilinear")
        maps = [c1 + up, c2, c3, c4]
        if add_vit_feature:
            # Size-based bilinear (align_corners=False, no antialias) to each level's exact shape.
            maps = [m + resize_nhwc(o, m.shape[1:3], "bilinear") for m, o in zip(maps, vit_maps)]
        norms = (self.norm1, self.norm2, self.norm3, self.norm4)
        feats = [norm(m) for norm, m in zip(norms, maps)]
        vit = vit_maps[-1]
        if geom.needs_crop:
            feats = [f[:, :oh, :ow] for f, (oh, ow) in zip(feats, geom.output_sizes)]
            vit = vit[:, :geom.vit_output_size[0], :geom.vit_output_size[1]]
        return AdapterOutput(features=tuple(feats), vit=vit)
