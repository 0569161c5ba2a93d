"""The DINOv2 ViT trunk (patch 14, cls token, optional register tokens, LayerScale, MLP/SwiGLU).

Module paths mirror the hub ``state_dict`` (``blocks.N.attn.qkv``, ``blocks.N.ls1.gamma``, ...).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_adapter.errors import InputError
from jax_adapter.models.base import TrunkOutput, check_indices, drop_path_rates
from jax_adapter.models.dinov2.config import DinoV2Config
from jax_adapter.nn.images import check_images
from jax_adapter.nn.layers import drop_path, layer_norm
from jax_adapter.nn.resize import resize_pos_embed
from jax_adapter.nn.vit import Attention, LayerScale, Mlp, PatchEmbed, SwiGLU


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
    module.blocks = nnx.List([Block(cfg, r, rngs=rngs) for r in drop_path_rates(cfg.drop_path_rate, cfg.depth)])


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
    """The DINOv2 forward: NHWC images (sides multiples of the patch) -> normalised tokens.

    ``model(images)`` gives ``TrunkOutput(cls [B, D], registers [B, R, D], patches [B, N, D])``;
    :meth:`intermediates` gives normed block outputs as grids (the :class:`Trunk` protocol).
    """

    EMBEDDINGS = ("patch_embed", "cls_token", "pos_embed", "register_tokens", "mask_token")
    BLOCKS = "blocks"
    FINAL_NORMS = ("norm",)

    def __init__(self, cfg: DinoV2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        add_trunk_parameters(self, cfg, rngs=rngs)
        self.norm = layer_norm(cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    def _tokens(self, images: jax.Array) -> Tuple[jax.Array, Tuple[int, int]]:
        """``images [B, H, W, 3]`` -> ``[B, 1 + R + Hg*Wg, D]`` and the grid."""
        check_images(images)
        h, w = images.shape[1:3]
        p = self.cfg.patch_size
        if h % p or w % p:
            # As upstream's trunk: no implicit padding (the adapter pads, the trunk does not).
            ph, pw = -(-h // p) * p, -(-w // p) * p
            raise InputError(
                f"image size {h}x{w} is not a multiple of the patch size {p}: pad it to {ph}x{pw} "
                f"(jax_adapter.nn.images.pad_bottom_right(images, ({ph}, {pw})), as the adapter does) "
                f"or resize it")
        prefix, x, grid = embed_tokens(self, self.cfg, images.astype(self.cfg.dtype))
        return jnp.concatenate([prefix, x], axis=1), grid

    def __call__(self, images: jax.Array) -> TrunkOutput:
        """``images [B, H, W, 3]``, ``H`` and ``W`` multiples of the patch size."""
        x, _ = self._tokens(images)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        r = self.cfg.num_register_tokens
        return TrunkOutput(cls=x[:, 0], registers=x[:, 1:1 + r], patches=x[:, 1 + r:])

    def intermediates(self, images: jax.Array, indices: Sequence[int], *, norm: bool = True
                      ) -> List[Tuple[jax.Array, jax.Array]]:
        """Outputs of blocks ``indices`` (0-based, sorted, unique) in one pass: per index
        ``(patches [B, Hg, Wg, D], cls [B, D])``, the final norm applied when ``norm``."""
        idx = check_indices(indices, self.cfg.depth)
        x, grid = self._tokens(images)
        n = self.cfg.num_prefix_tokens
        out = []
        for i in range(idx[-1] + 1):  # blocks after the last kept one change nothing kept
            x = self.blocks[i](x)
            if i in idx:
                y = self.norm(x) if norm else x
                out.append((y[:, n:].reshape(y.shape[0], grid[0], grid[1], -1), y[:, 0]))
        return out
