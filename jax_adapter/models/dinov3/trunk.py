"""The DINOv3 ViT trunk (patch 16, cls + storage tokens, RoPE on the patch tokens).

NHWC images ``[B, H, W, 3]`` of any size with ``H, W >= patch``: the patch grid is
``(H // 16, W // 16)`` and trailing pixels are dropped, as upstream.

Variables (module paths follow Meta's ``state_dict``, so conversion is a table; ``nnx.Linear``
kernels are ``[in, out]``, the conv kernel HWIO, LayerNorm ``weight`` is ``scale``):

=====================================  ============  ==========================================
path                                   type          note
=====================================  ============  ==========================================
``cls_token``                          Param         ``[1, 1, D]``
``storage_tokens``                     Param         ``[1, R, D]``, only when ``R > 0``
``mask_token``                         Param         ``[1, D]``; used only with ``masks``
``patch_embed.proj.{kernel,bias}``     Param         ``[16, 16, 3, D]``, ``[D]``
``blocks.N.norm1.{scale,bias}``        Param
``blocks.N.attn.qkv.{kernel,bias}``    Param         bias ``[3D]`` only with ``qkv_bias``; with
                                                     ``mask_k_bias`` its key third is stored as
                                                     given but never added (a constant mask)
``blocks.N.attn.proj.{kernel,bias}``   Param
``blocks.N.ls{1,2}.gamma``             Param         only when ``layerscale_init`` is set
``blocks.N.norm2.{scale,bias}``        Param
``blocks.N.mlp.fc{1,2}.*``             Param         ``ffn_layer="mlp"``
``blocks.N.mlp.w{1,2,3}.*``            Param         ``ffn_layer="swiglu*"``
``norm.{scale,bias}``                  Param
``cls_norm.{scale,bias}``              Param         only with ``untie_cls_and_patch_norms``
``local_cls_norm.{scale,bias}``        Param         only with ``untie_global_and_local_cls_norm``;
                                                     loaded and kept, never used (as upstream in eval)
``rope_embed.rngs``                    RngState      only with ``rope_augment``; not stored
=====================================  ============  ==========================================

Not stored: upstream's buffers ``rope_embed.periods`` (recomputed from the config by
:func:`jax_adapter.nn.rope.rope_periods`; a converter should compare the stored ones with
``DinoV3Config.rope_periods()`` and refuse a mismatch) and ``blocks.N.attn.qkv.bias_mask``
(always ``[1, 0, 1]`` thirds; a converter should check that pattern and drop it).

Precision: with ``dtype="bfloat16"`` the matmuls and convolution run in bfloat16, while the
residual stream, LayerNorm statistics, the softmax and RoPE stay float32 (as upstream under
``torch.autocast``); outputs are in the compute dtype.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_adapter.errors import InputError
from jax_adapter.models.base import TrunkOutput, check_indices, drop_path_rates
from jax_adapter.models.dinov3.config import DinoV3Config
from jax_adapter.nn.images import check_images
from jax_adapter.nn.layers import drop_path, layer_norm
from jax_adapter.nn.rope import augment_coords, rope_coords, rope_tables
from jax_adapter.nn.vit import Attention, LayerScale, Mlp, PatchEmbed, SwiGLUFFN


class RopeEmbedding(nnx.Module):
    """``(Hg, Wg) -> (sin, cos)`` ``[Hg * Wg, head_dim]`` float32 tables, computed once per forward.

    Deterministic unless ``cfg.rope_augment`` and the module is in train mode
    (``deterministic=False``, which ``model.train()`` sets).
    """

    def __init__(self, cfg: DinoV3Config, *, rngs: nnx.Rngs):
        self.periods = tuple(float(p) for p in cfg.rope_periods())
        self.normalize = cfg.pos_embed_rope_normalize_coords
        self.shift = cfg.pos_embed_rope_shift_coords
        self.jitter = cfg.pos_embed_rope_jitter_coords
        self.rescale = cfg.pos_embed_rope_rescale_coords
        self.deterministic = True
        noisy = any(v is not None for v in (self.shift, self.jitter, self.rescale))
        self.rngs = rngs["rope"].fork() if cfg.rope_augment and noisy else nnx.data(None)

    def __call__(self, grid: Tuple[int, int]) -> Tuple[jax.Array, jax.Array]:
        coords = rope_coords(grid, self.normalize)
        if not self.deterministic and self.rngs is not None:
            coords = augment_coords(coords, self.rngs(), shift=self.shift, jitter=self.jitter,
                                    rescale=self.rescale)
        return rope_tables(coords, np.asarray(self.periods, np.float32))


class Block(nnx.Module):
    """``x + ls1(attn(norm1(x), rope))``, ``x + ls2(mlp(norm2(x)))``; ``[B, N, D]``."""

    def __init__(self, cfg: DinoV3Config, drop_path_rate: float, *, rngs: nnx.Rngs):
        d = cfg.embed_dim
        dt = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.norm1 = layer_norm(d, eps=cfg.norm_eps, rngs=rngs, **dt)
        self.attn = Attention(d, cfg.num_heads, rngs=rngs, qkv_bias=cfg.qkv_bias, proj_bias=cfg.proj_bias,
                              mask_k_bias=cfg.mask_k_bias, **dt)
        self.norm2 = layer_norm(d, eps=cfg.norm_eps, rngs=rngs, **dt)
        ffn = Mlp if cfg.ffn_layer == "mlp" else SwiGLUFFN
        self.mlp = ffn(d, cfg.ffn_hidden, rngs=rngs, bias=cfg.ffn_bias, **dt)
        if cfg.layerscale_init:
            self.ls1 = LayerScale(d, cfg.layerscale_init, cfg.param_dtype)
            self.ls2 = LayerScale(d, cfg.layerscale_init, cfg.param_dtype)
        else:
            self.ls1 = self.ls2 = nnx.data(None)
        # Upstream drops a random subset of the batch; this drops per sample (same expectation).
        self.drop_path = drop_path(drop_path_rate, rngs=rngs)

    def __call__(self, x: jax.Array, rope: Tuple[jax.Array, jax.Array]) -> jax.Array:
        y = self.attn(self.norm1(x), rope)
        x = x + self.drop_path(self.ls1(y) if self.ls1 is not None else y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(self.ls2(y) if self.ls2 is not None else y)


class DinoV3(nnx.Module):
    """The DINOv3 forward: NHWC images (any size >= one patch) -> final-normed tokens.

    ``model(images)`` gives ``TrunkOutput(cls [B, D], registers [B, R, D], patches [B, N, D])``
    (``registers`` are the storage tokens; ``N = Hg * Wg`` row-major). :meth:`intermediates`
    gives normed block outputs as grids, for adapters.
    """

    EMBEDDINGS = ("patch_embed", "cls_token", "storage_tokens", "mask_token", "rope_embed")
    BLOCKS = "blocks"
    FINAL_NORMS = ("norm", "cls_norm", "local_cls_norm")

    def __init__(self, cfg: DinoV3Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, r = cfg.embed_dim, cfg.n_storage_tokens
        pd = jnp.dtype(cfg.param_dtype)
        dt = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.cls_token = nnx.Param((0.02 * jax.random.normal(rngs.params(), (1, 1, d))).astype(pd))
        if r:
            self.storage_tokens = nnx.Param((0.02 * jax.random.normal(rngs.params(), (1, r, d))).astype(pd))
        self.mask_token = nnx.Param(jnp.zeros((1, d), pd))
        self.patch_embed = PatchEmbed(cfg.patch_size, d, rngs=rngs, **dt)
        self.rope_embed = RopeEmbedding(cfg, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, r, rngs=rngs) for r in drop_path_rates(cfg.drop_path_rate, cfg.depth)])
        self.norm = layer_norm(d, eps=cfg.norm_eps, rngs=rngs, **dt)
        if cfg.untie_cls_and_patch_norms:
            self.cls_norm = layer_norm(d, eps=cfg.norm_eps, rngs=rngs, **dt)
        if cfg.untie_global_and_local_cls_norm:
            self.local_cls_norm = layer_norm(d, eps=cfg.norm_eps, rngs=rngs, **dt)

    def grid(self, h: int, w: int) -> Tuple[int, int]:
        """Patch grid of an ``h x w`` image: ``(h // 16, w // 16)``."""
        return self.cfg.grid(h, w)

    def _embed(self, images: jax.Array, masks: Optional[jax.Array]) -> Tuple[jax.Array, Tuple[int, int]]:
        """``images [B, H, W, 3]`` -> tokens ``[B, 1 + R + Hg*Wg, D]`` (float32 residual stream
        at least) and the grid."""
        check_images(images)
        b, h, w, _ = images.shape
        p = self.cfg.patch_size
        if h < p or w < p:
            raise InputError(f"image size {h}x{w} is smaller than one {p}x{p} patch")
        grid = self.grid(h, w)
        # The VALID stride-p convolution drops the trailing pixels (floor grid).
        x = self.patch_embed(images.astype(self.cfg.dtype))
        stream = jnp.promote_types(jnp.dtype(self.cfg.param_dtype), jnp.float32)
        x = x.reshape(b, grid[0] * grid[1], self.cfg.embed_dim).astype(stream)
        if masks is not None:
            if tuple(masks.shape) != (b, grid[0] * grid[1]):
                raise InputError(f"masks must be [B, Hg*Wg] = {(b, grid[0] * grid[1])}, got {tuple(masks.shape)}")
            x = jnp.where(masks[..., None], self.mask_token[...].astype(stream)[None], x)
        prefix = [self.cls_token[...]]
        if self.cfg.n_storage_tokens:
            prefix.append(self.storage_tokens[...])
        prefix = jnp.broadcast_to(jnp.concatenate(prefix, axis=1).astype(stream),
                                  (b, self.cfg.num_prefix_tokens, self.cfg.embed_dim))
        return jnp.concatenate([prefix, x], axis=1), grid

    def _blocks(self, x: jax.Array, grid: Tuple[int, int], keep: Sequence[int] = ()) -> Tuple[jax.Array, List[jax.Array]]:
        rope = self.rope_embed(grid)  # once per forward, shared by every block
        kept = []
        # With ``keep``, blocks after the last kept one do not change the result: skip them.
        stop = max(keep) + 1 if keep else len(self.blocks)
        for i in range(stop):
            x = self.blocks[i](x, rope)
            if i in keep:
                kept.append(x)
        return x, kept

    def _final_norm(self, x: jax.Array) -> jax.Array:
        if not self.cfg.untie_cls_and_patch_norms:
            return self.norm(x)
        n = self.cfg.num_prefix_tokens
        return jnp.concatenate([self.cls_norm(x[:, :n]), self.norm(x[:, n:])], axis=1)

    def _split(self, x: jax.Array) -> TrunkOutput:
        n = self.cfg.num_prefix_tokens
        return TrunkOutput(cls=x[:, 0], registers=x[:, 1:n], patches=x[:, n:])

    def forward_features(self, images: jax.Array, masks: Optional[jax.Array] = None
                         ) -> Tuple[TrunkOutput, jax.Array]:
        """``(normed tokens, prenorm [B, 1 + R + N, D])``; ``masks [B, N]`` (bool) replaces the
        masked patch tokens by ``mask_token`` before the blocks."""
        x, grid = self._embed(images, masks)
        x, _ = self._blocks(x, grid)
        return self._split(self._final_norm(x)), x

    def __call__(self, images: jax.Array) -> TrunkOutput:
        """``images [B, H, W, 3]`` -> ``TrunkOutput(cls [B, D], registers [B, R, D],
        patches [B, Hg*Wg, D])``, final norm applied."""
        return self.forward_features(images)[0]

    def check_indices(self, indices: Sequence[int]) -> Tuple[int, ...]:
        """``indices`` as a tuple if sorted, unique and in ``[0, depth)``; ``ConfigError`` otherwise."""
        return check_indices(indices, self.cfg.depth)

    def intermediates(self, images: jax.Array, indices: Sequence[int], *, norm: bool = True
                      ) -> List[Tuple[jax.Array, jax.Array]]:
        """Outputs of blocks ``indices`` (0-based, sorted, unique) in one trunk pass.

        Returns, per index, ``(patches [B, Hg, Wg, D], cls [B, D])``; with ``norm`` the final
        norm is applied to each (upstream's ``get_intermediate_layers(..., norm=True)``).
        """
        idx = self.check_indices(indices)
        x, grid = self._embed(images, None)
        _, kept = self._blocks(x, grid, idx)
        n = self.cfg.num_prefix_tokens
        out = []
        for y in kept:
            if norm:
                y = self._final_norm(y)
            b = y.shape[0]
            out.append((y[:, n:].reshape(b, grid[0], grid[1], -1), y[:, 0]))
        return out
