"""``DinoAdapter``: the ViT-Adapter backbone around a DINOv2 trunk (docs/SPEC.md section 5).

``model(images [B, H, W, 3])`` -> ``AdapterOutput(features=(f1, f2, f3, f4), vit=map)``, all
NHWC, for any input size that gives non-empty outputs. All shapes come from
:func:`jax_adapter.nn.geometry.compute_geometry`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_adapter.errors import ConfigError
from jax_adapter.models.common import (
    AdapterOutput, COMPUTE_DTYPES, PARAM_DTYPES, check_choice, config_from_dict, named_preset,
)
from jax_adapter.models.dinov2 import FFN_LAYERS, DinoV2Config, add_trunk_parameters, embed_tokens
from jax_adapter.nn.geometry import AdapterGeometry, compute_geometry
from jax_adapter.nn.images import check_images, pad_bottom_right
from jax_adapter.nn.interaction import InteractionBlock
from jax_adapter.nn.layers import BatchNorm2d, ConvTranspose2x2, layer_norm
from jax_adapter.nn.resize import POS_RESIZE_MODES, resize_nhwc
from jax_adapter.nn.spm import SpatialPriorModule


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """DinoAdapter configuration; field names are the PyTorch constructor's keyword arguments."""

    num_heads: int = 6
    embed_dim: int = 384
    depth: int = 12
    pretrain_size: int = 518
    patch_size: int = 14
    mlp_ratio: float = 4.0
    conv_inplane: int = 64
    n_points: int = 4
    deform_num_heads: int = 6
    init_values: float = 0.0
    interaction_indexes: Tuple[Tuple[int, int], ...] = ((0, 2), (3, 5), (6, 8), (9, 11))
    with_cffn: bool = True
    cffn_ratio: float = 0.25
    deform_ratio: float = 1.0
    add_vit_feature: bool = False
    use_extra_extractor: bool = True
    with_cp: bool = False
    drop_path_rate: float = 0.0
    # Trunk details fixed by the DINOv2 checkpoint.
    num_register_tokens: int = 0
    ffn_layer: str = "mlp"
    layer_scale_init: float = 1.0
    pos_embed_resize: str = "bicubic_size"
    # JAX-side: which sampling-core implementation MSDeformAttn uses ("auto", "xla", "pallas").
    msda_impl: str = "auto"
    # JAX-side: compute dtype (e.g. "bfloat16": matmuls and convolutions in bfloat16, while
    # softmax, LayerNorm and BatchNorm statistics and the sampling core accumulate in float32)
    # and parameter storage dtype.
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        idx = tuple(tuple(int(i) for i in pair) for pair in self.interaction_indexes)
        object.__setattr__(self, "interaction_indexes", idx)
        if any(len(p) != 2 or p[0] > p[1] for p in idx):
            raise ConfigError(f"interaction_indexes must be (first, last) pairs, got {idx}")
        flat = [i for a, b in idx for i in range(a, b + 1)]
        if flat != list(range(len(flat))) or len(flat) > self.depth:
            raise ConfigError(
                f"interaction_indexes {idx} must cover ViT blocks 0..n-1 in order (depth {self.depth})"
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        dv = int(self.embed_dim * self.deform_ratio)
        if dv % self.deform_num_heads:
            raise ConfigError(
                f"embed_dim*deform_ratio = {dv} is not divisible by deform_num_heads {self.deform_num_heads}"
            )
        check_choice("ffn_layer", self.ffn_layer, FFN_LAYERS)
        check_choice("pos_embed_resize", self.pos_embed_resize, POS_RESIZE_MODES)
        check_choice("msda_impl", self.msda_impl, ("auto", "xla", "pallas"))
        check_choice("dtype", self.dtype, COMPUTE_DTYPES)
        check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)

    def trunk_config(self) -> DinoV2Config:
        return DinoV2Config(
            embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio, patch_size=self.patch_size, pretrain_size=self.pretrain_size,
            num_register_tokens=self.num_register_tokens, ffn_layer=self.ffn_layer,
            layer_scale_init=self.layer_scale_init, pos_embed_resize=self.pos_embed_resize,
            drop_path_rate=self.drop_path_rate, dtype=self.dtype, param_dtype=self.param_dtype,
        )

    def replace(self, **changes) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["interaction_indexes"] = [list(p) for p in self.interaction_indexes]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "AdapterConfig":
        return config_from_dict(cls, d)

    @classmethod
    def preset(cls, name: str) -> "AdapterConfig":
        """``dinov2_vit{s,b,l,g}14`` with an optional ``_reg`` suffix, or ``tiny`` (tests)."""
        return named_preset(cls, name, trunk=False)


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
