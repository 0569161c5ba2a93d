"""The DINOv2 ViT trunk (patch 14, cls token, optional register tokens, LayerScale, MLP/SwiGLU).

Module paths mirror the hub ``state_dict`` (``blocks.N.attn.qkv``, ``blocks.N.ls1.gamma``, ...).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_adapter.config import DinoV2Config
from jax_adapter.images import check_images
from jax_adapter.layers import DType, compute_dtype, drop_path, gelu, layer_norm, linear
from jax_adapter.resize import resize_pos_embed


class Attention(nnx.Module):
    """Multi-head self-attention with a fused ``qkv`` projection; ``[B, N, D] -> [B, N, D]``."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype: DType = None,
                 param_dtype: DType = jnp.float32):
        self.num_heads = num_heads
        self.qkv = linear(dim, 3 * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # Logits and softmax in float32 whatever the compute dtype.
        if x.dtype == jnp.float32:
            out = jax.nn.dot_product_attention(q, k, v, scale=(d // self.num_heads) ** -0.5)
        else:
            out = _attention_f32_softmax(q, k, v)
        return self.proj(out.reshape(b, n, d))


def _attention_f32_softmax(q, k, v):
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: DType = None,
                 param_dtype: DType = jnp.float32):
        self.fc1 = linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


class SwiGLU(nnx.Module):
    """DINOv2's fused SwiGLU FFN (ViT-g): ``w12`` -> (a, b), ``silu(a) * b``, ``w3``."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: DType = None,
                 param_dtype: DType = jnp.float32):
        self.w12 = linear(dim, 2 * hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.w3 = linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        a, b = jnp.split(self.w12(x), 2, axis=-1)
        return self.w3(jax.nn.silu(a) * b)


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init: float, param_dtype: DType = jnp.float32):
        self.gamma = nnx.Param(jnp.full((dim,), init, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


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


class PatchEmbed(nnx.Module):
    """Non-overlapping ``p x p`` patches: ``[B, H, W, 3] -> [B, H/p, W/p, D]``."""

    def __init__(self, patch: int, dim: int, *, rngs: nnx.Rngs, dtype: DType = None,
                 param_dtype: DType = jnp.float32):
        self.proj = nnx.Conv(
            3, dim, (patch, patch), strides=patch, padding="VALID",
            kernel_init=nnx.initializers.lecun_normal(), dtype=compute_dtype(dtype),
            param_dtype=jnp.dtype(param_dtype), rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


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


class DinoV2Output(NamedTuple):
    """Final-normalised tokens: ``cls [B, D]``, ``registers [B, R, D]``, ``patches [B, N, D]``."""

    cls: jax.Array
    registers: jax.Array
    patches: jax.Array


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
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        images = images.astype(self.cfg.dtype)
        prefix, x, _ = embed_tokens(self, self.cfg, images)
        x = jnp.concatenate([prefix, x], axis=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        r = self.cfg.num_register_tokens
        return DinoV2Output(cls=x[:, 0], registers=x[:, 1:1 + r], patches=x[:, 1 + r:])
