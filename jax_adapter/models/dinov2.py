"""The DINOv2 ViT trunk (patch 14, cls token, optional register tokens, LayerScale, MLP/SwiGLU).

Module paths mirror the hub ``state_dict`` (``blocks.N.attn.qkv``, ``blocks.N.ls1.gamma``, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_adapter.errors import ConfigError, InputError
from jax_adapter.models.common import (
    COMPUTE_DTYPES, PARAM_DTYPES, TrunkOutput, check_choice, config_from_dict, named_preset,
)
from jax_adapter.nn.resize import POS_RESIZE_MODES
from jax_adapter.nn.images import check_images
from jax_adapter.nn.layers import drop_path, layer_norm
from jax_adapter.nn.vit import Attention, LayerScale, Mlp, PatchEmbed, SwiGLU
from jax_adapter.nn.resize import resize_pos_embed


FFN_LAYERS = ("mlp", "swiglu")
# embed_dim, depth, num_heads, ffn_layer of the four DINOv2 variants.
VARIANTS: Dict[str, Tuple[int, int, int, str]] = {
    "s": (384, 12, 6, "mlp"),
    "b": (768, 12, 12, "mlp"),
    "l": (1024, 24, 16, "mlp"),
    "g": (1536, 40, 24, "swiglu"),
}



@dataclasses.dataclass(frozen=True)
class DinoV2Config:
    """The DINOv2 ViT trunk (patch 14, cls token, optional register tokens)."""

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    patch_size: int = 14
    pretrain_size: int = 518
    num_register_tokens: int = 0
    ffn_layer: str = "mlp"
    layer_scale_init: float = 1.0
    pos_embed_resize: str = "bicubic_scale_offset"
    drop_path_rate: float = 0.0
    # Compute dtype of matmuls and convolutions, and storage dtype of the parameters.
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        check_choice("ffn_layer", self.ffn_layer, FFN_LAYERS)
        check_choice("pos_embed_resize", self.pos_embed_resize, POS_RESIZE_MODES)
        check_choice("dtype", self.dtype, COMPUTE_DTYPES)
        check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pretrain_size % self.patch_size:
            raise ConfigError(f"pretrain_size {self.pretrain_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def pretrain_grid(self) -> int:
        return self.pretrain_size // self.patch_size

    @property
    def ffn_hidden(self) -> int:
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.ffn_layer == "swiglu":
            # DINOv2's SwiGLUFFNFused: 2/3 of the MLP width, rounded up to a multiple of 8.
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DinoV2Config":
        return config_from_dict(cls, d)

    @classmethod
    def preset(cls, name: str) -> "DinoV2Config":
        """The trunk of a named preset (``dinov2_vitb14``, ``dinov2_vitg14_reg``, ...)."""
        return named_preset(cls, name, trunk=True)


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``."""

    def __init__(self, cfg: DinoV2Config, drop_path_rate: float, *, rngs: nnx.Rngs):
        d = cfg.embed_dim
        dt = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.norm1 = layer_norm(d, rngs=rngs, **dt)
        self.attn = Attention(d, cfg.num_heads, rngs=rngs, **dt)
        self.ls1 = LayerScale(d, cfg.layer_scale_init, cfg.param_dtype)
        self.norm2 = layer_norm(d, rngs=rngs, **dt)
        ffn = SwiGLU if cfg.ffn_layer == "swiglu" else Mlp
        self.mlp = ffn(d, cfg.ffn_hidden, rngs=rngs, **dt)
        self.ls2 = LayerScale(d, cfg.layer_scale_init, cfg.param_dtype)
        self.drop_path = drop_path(drop_path_rate, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


def add_trunk_parameters(module: nnx.Module, cfg: DinoV2Config, *, rngs: nnx.Rngs) -> None:
    """Give ``module`` the trunk's parameters under the hub's top-level names.

    Both :class:`DinoV2` and the DinoAdapter hold the trunk at their top level (``cls_token``,
    ``pos_embed``, ``register_tokens``, ``patch_embed.proj``, ``blocks.N``), as in PyTorch.
    """
    d, m = cfg.embed_dim, cfg.pretrain_grid
    pd = jnp.dtype(cfg.param_dtype)
    module.patch_embed = PatchEmbed(cfg.patch_size, d, dtype=cfg.dtype, param_dtype=pd, rngs=rngs)
    module.cls_token = nnx.Param((1e-6 * jax.random.normal(rngs.params(), (1, 1, d))).astype(pd))
    module.pos_embed = nnx.Param(
        (0.02 * jax.random.truncated_normal(rngs.params(), -2, 2, (1, 1 + m * m, d))).astype(pd)
    )
    if cfg.num_register_tokens:
        module.register_tokens = nnx.Param(
            (1e-6 * jax.random.normal(rngs.params(), (1, cfg.num_register_tokens, d))).astype(pd)
        )
    rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
    module.blocks = nnx.List([Block(cfg, r, rngs=rngs) for r in rates])


def embed_tokens(module: nnx.Module, cfg: DinoV2Config, images: jax.Array):
    """Patch tokens with resized position embeddings, and the prefix tokens.

    ``images [B, H, W, 3]`` (sides multiples of the patch) -> ``(prefix [B, 1+R, D],
    patches [B, Hg*Wg, D], (Hg, Wg))``; the prefix is cls (with its position) then registers
    (which get no position embedding).
    """
    b = images.shape[0]
    d = cfg.embed_dim
    x = module.patch_embed(images)
    grid = (x.shape[1], x.shape[2])
    # The position grid is resized in float32 at least, then cast to the compute dtype.
    pos = module.pos_embed[...]
    pos = pos.astype(jnp.promote_types(pos.dtype, jnp.float32))
    x = x.reshape(b, -1, d) + resize_pos_embed(pos[:, 1:], grid, cfg.pos_embed_resize).astype(x.dtype)
    prefix = [jnp.broadcast_to(module.cls_token[...] + pos[:, :1], (b, 1, d))]
    if cfg.num_register_tokens:
        regs = module.register_tokens[...].astype(pos.dtype)
        prefix.append(jnp.broadcast_to(regs, (b, cfg.num_register_tokens, d)))
    return jnp.concatenate(prefix, axis=1).astype(x.dtype), x, grid


# The DINOv2 trunk's output (the same type for every trunk family).
DinoV2Output = TrunkOutput


class DinoV2(nnx.Module):
    """The DINOv2 forward: NHWC images (sides multiples of the patch) -> normalised tokens."""

    def __init__(self, cfg: DinoV2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        add_trunk_parameters(self, cfg, rngs=rngs)
        self.norm = layer_norm(cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, images: jax.Array) -> DinoV2Output:
        """``images [B, H, W, 3]``, ``H`` and ``W`` multiples of the patch size."""
        check_images(images)
        h, w = images.shape[1:3]
        p = self.cfg.patch_size
        if h % p or w % p:
            # As upstream's trunk: no implicit padding (the DinoAdapter pads, the trunk does not).
            ph, pw = -(-h // p) * p, -(-w // p) * p
            raise InputError(
                f"image size {h}x{w} is not a multiple of the patch size {p}: pad it to {ph}x{pw} "
                f"(jax_adapter.nn.images.pad_bottom_right(images, ({ph}, {pw})), as DinoAdapter does) "
                f"or resize it")
        images = images.astype(self.cfg.dtype)
        prefix, x, _ = embed_tokens(self, self.cfg, images)
        x = jnp.concatenate([prefix, x], axis=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        r = self.cfg.num_register_tokens
        return TrunkOutput(cls=x[:, 0], registers=x[:, 1:1 + r], patches=x[:, 1 + r:])
