"""Transformer layers shared by the ViT trunks: attention with a fused ``qkv``, the MLP and
SwiGLU feed-forwards, LayerScale and the patch embedding. ``[B, N, D]`` token layout.

Module paths mirror the PyTorch hub ``state_dict`` (``attn.qkv``, ``mlp.fc1``, ``ls1.gamma``,
``patch_embed.proj``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_adapter.nn.layers import DType, compute_dtype, gelu, linear


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
