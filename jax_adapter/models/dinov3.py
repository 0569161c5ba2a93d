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

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_adapter.errors import ConfigError, InputError
from jax_adapter.models.common import (
    COMPUTE_DTYPES, PARAM_DTYPES, TrunkOutput, check_choice, config_from_dict, named_preset,
)
from jax_adapter.nn.images import check_images
from jax_adapter.nn.layers import drop_path, layer_norm
from jax_adapter.nn.rope import NORMALIZE_COORDS, augment_coords, rope_coords, rope_periods, rope_tables
from jax_adapter.nn.vit import Attention, LayerScale, Mlp, PatchEmbed, SwiGLUFFN

# ffn_layer -> SwiGLU hidden-width alignment (None: the GELU MLP).
FFN_LAYERS: Dict[str, Optional[int]] = {
    "mlp": None, "swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128,
}
# norm_layer -> LayerNorm epsilon ("layernormbf16" is a plain float LayerNorm despite its name).
NORM_LAYERS: Dict[str, float] = {"layernorm": 1e-6, "layernormbf16": 1e-5}
ROPE_DTYPES = ("fp32",)


@dataclasses.dataclass(frozen=True)
class DinoV3Config:
    """The DINOv3 trunk. Field names are Meta's ``DinoVisionTransformer`` keyword arguments.

    The defaults are the hub's ``dinov3_vits16`` (not the constructor's own defaults, which give
    no storage tokens, eps 1e-6 and bfloat16 RoPE): a dict of constructor arguments should list
    every argument that differs from the hub model. ``dtype``, ``param_dtype`` and
    ``rope_augment`` are this library's: the training-time RoPE coordinate noise
    (``pos_embed_rope_{shift,jitter,rescale}_coords``) is applied only when ``rope_augment`` is
    true *and* the module is in train mode; otherwise RoPE is deterministic.
    """

    img_size: int = 224  # unused: there is no position table to size
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    ffn_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    layerscale_init: Optional[float] = 1e-5
    norm_layer: str = "layernormbf16"
    ffn_layer: str = "mlp"
    ffn_bias: bool = True
    proj_bias: bool = True
    n_storage_tokens: int = 4
    mask_k_bias: bool = True
    untie_cls_and_patch_norms: bool = False
    untie_global_and_local_cls_norm: bool = False
    pos_embed_rope_base: Optional[float] = 100.0
    pos_embed_rope_min_period: Optional[float] = None
    pos_embed_rope_max_period: Optional[float] = None
    pos_embed_rope_normalize_coords: str = "separate"
    pos_embed_rope_shift_coords: Optional[float] = None
    pos_embed_rope_jitter_coords: Optional[float] = None
    pos_embed_rope_rescale_coords: Optional[float] = 2.0
    pos_embed_rope_dtype: str = "fp32"
    # This library's fields.
    rope_augment: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        check_choice("ffn_layer", self.ffn_layer, tuple(FFN_LAYERS))
        check_choice("norm_layer", self.norm_layer, tuple(NORM_LAYERS))
        check_choice("pos_embed_rope_normalize_coords", self.pos_embed_rope_normalize_coords, NORMALIZE_COORDS)
        check_choice("pos_embed_rope_dtype", self.pos_embed_rope_dtype, ROPE_DTYPES)
        check_choice("dtype", self.dtype, COMPUTE_DTYPES)
        check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)
        if self.in_chans != 3:
            raise ConfigError(f"in_chans must be 3 (RGB), got {self.in_chans}")
        for name in ("patch_size", "embed_dim", "depth", "num_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_storage_tokens < 0:
            raise ConfigError(f"n_storage_tokens must be >= 0, got {self.n_storage_tokens}")
        if self.embed_dim % (4 * self.num_heads):
            raise ConfigError(f"embed_dim {self.embed_dim} is not a multiple of 4 * num_heads "
                              f"({4 * self.num_heads}), which axial RoPE needs")
        if self.ffn_ratio <= 0:
            raise ConfigError(f"ffn_ratio must be positive, got {self.ffn_ratio}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        try:
            self.rope_periods()
        except ValueError as e:
            raise ConfigError(f"pos_embed_rope_base / pos_embed_rope_min_period / pos_embed_rope_max_period: {e}") from None
        for name in ("pos_embed_rope_jitter_coords", "pos_embed_rope_rescale_coords"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1 (a log-uniform factor range), got {v}")
        if self.pos_embed_rope_shift_coords is not None and self.pos_embed_rope_shift_coords < 0:
            raise ConfigError(f"pos_embed_rope_shift_coords must be >= 0, got {self.pos_embed_rope_shift_coords}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def norm_eps(self) -> float:
        return NORM_LAYERS[self.norm_layer]

    @property
    def num_prefix_tokens(self) -> int:
        """cls + storage tokens."""
        return 1 + self.n_storage_tokens

    @property
    def ffn_hidden(self) -> int:
        """The FFN's hidden width: ``int(D * ffn_ratio)``; for SwiGLU 2/3 of it rounded up to the
        alignment (8, 32, 64 or 128)."""
        hidden = int(self.embed_dim * self.ffn_ratio)
        align = FFN_LAYERS[self.ffn_layer]
        if align is not None:
            d = int(hidden * 2 / 3)
            hidden = d + (-d % align)
        return hidden

    def rope_periods(self) -> np.ndarray:
        """The ``[head_dim // 4]`` float32 periods (upstream's buffer ``rope_embed.periods``)."""
        return rope_periods(self.head_dim, base=self.pos_embed_rope_base,
                            min_period=self.pos_embed_rope_min_period,
                            max_period=self.pos_embed_rope_max_period)

    def grid(self, h: int, w: int) -> Tuple[int, int]:
        """Patch grid of an ``h x w`` image: ``(h // patch, w // patch)``."""
        return h // self.patch_size, w // self.patch_size

    def replace(self, **changes: Any) -> "DinoV3Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DinoV3Config":
        return config_from_dict(cls, d)

    @classmethod
    def preset(cls, name: str) -> "DinoV3Config":
        """The trunk of a named preset (``dinov3_vits16``, ``dinov3_vit7b16``, ...)."""
        return named_preset(cls, name, trunk=True)


# The hub models (dinov3/hub/backbones.py): embed_dim, depth, num_heads, ffn_ratio, ffn_layer,
# and the arguments that differ from the shared hub defaults.
HUB_VARIANTS: Dict[str, Tuple[int, int, int, float, str, Dict[str, Any]]] = {
    "vits16": (384, 12, 6, 4.0, "mlp", {}),
    "vits16plus": (384, 12, 6, 6.0, "swiglu", {}),
    "vitb16": (768, 12, 12, 4.0, "mlp", {}),
    "vitl16": (1024, 24, 16, 4.0, "mlp", {}),
    # The SAT-493M weights of ViT-L carry an (unused in eval) local_cls_norm.
    "vitl16_sat": (1024, 24, 16, 4.0, "mlp", {"untie_global_and_local_cls_norm": True}),
    "vitl16plus": (1024, 24, 16, 6.0, "swiglu", {}),
    "vith16plus": (1280, 32, 20, 6.0, "swiglu", {}),
    "vit7b16": (4096, 40, 32, 3.0, "swiglu64", {"qkv_bias": False, "untie_global_and_local_cls_norm": True}),
}


def hub_config(variant: str, **overrides: Any) -> DinoV3Config:
    """The config of hub model ``dinov3_<variant>`` (e.g. ``"vitb16"``), with ``overrides``."""
    if variant not in HUB_VARIANTS:
        raise ConfigError(f"unknown DINOv3 variant {variant!r}; known: {', '.join(HUB_VARIANTS)}")
    dim, depth, heads, ratio, ffn, extra = HUB_VARIANTS[variant]
    return DinoV3Config(embed_dim=dim, depth=depth, num_heads=heads, ffn_ratio=ratio, ffn_layer=ffn,
                        **{**extra, **overrides})


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
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nnx.List([Block(cfg, rate, rngs=rngs) for rate in rates])
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
        idx = tuple(indices)
        depth = self.cfg.depth
        if not idx:
            raise ConfigError("indices of intermediate layers are empty")
        if any(not isinstance(i, (int, np.integer)) or isinstance(i, bool) for i in idx):
            raise ConfigError(f"indices of intermediate layers must be integers, got {list(idx)}")
        if any(i < 0 or i >= depth for i in idx):
            raise ConfigError(f"indices of intermediate layers must be in [0, {depth}), got {list(idx)}")
        if any(a >= b for a, b in zip(idx, idx[1:])):
            raise ConfigError(f"indices of intermediate layers must be sorted and unique, got {list(idx)}")
        return tuple(int(i) for i in idx)

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
