"""Transformer layers shared by the ViT trunks: attention with a fused ``qkv``, the MLP and
SwiGLU feed-forwards, LayerScale and the patch embedding. ``[B, N, D]`` token layout.

Module paths mirror the PyTorch hub ``state_dict`` (``attn.qkv``, ``mlp.fc1``, ``ls1.gamma``,
``patch_embed.proj``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_adapter.errors import ConfigError
from jax_adapter.nn.attention import IMPLEMENTATIONS, dot_product_attention
from jax_adapter.nn.layers import DType, compute_dtype, gelu, linear
from jax_adapter.nn.rope import apply_rope


class Attention(nnx.Module):
    """Multi-head self-attention with a fused ``qkv`` projection; ``[B, N, D] -> [B, N, D]``.

    The one attention of both trunks. DINOv3 adds: ``mask_k_bias`` (the key third of the stored
    ``qkv`` bias is kept, for round-tripping, but never added: upstream's ``bias_mask``) and an
    optional RoPE table ``rope = (sin, cos)`` ``[HW, Dh]`` that rotates q and k of the last ``HW``
    tokens (the leading prefix tokens get no position).
    ``implementation``: the attention core (``jax_adapter.nn.attention``); ``"auto"`` picks cuDNN
    on GPU for bfloat16/float16, the blocked recomputing core on GPU otherwise, the chunked core
    on CPU and the textbook form on TPU.
    """

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype: DType = None,
                 param_dtype: DType = jnp.float32, qkv_bias: bool = True, proj_bias: bool = True,
                 mask_k_bias: bool = False, implementation: str = "auto"):
        if implementation not in IMPLEMENTATIONS:
            raise ConfigError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        self.num_heads = num_heads
        self.implementation = implementation
        self.mask_k_bias = mask_k_bias and qkv_bias
        self.qkv = linear(dim, 3 * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs, bias=qkv_bias)
        self.proj = linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs, bias=proj_bias)

    def _qkv(self, x: jax.Array) -> jax.Array:
        lin = self.qkv
        if not self.mask_k_bias:
            return lin(x)
        bias = lin.bias[...]
        d = bias.shape[0] // 3
        # A constant mask, not the stored bias: whatever the checkpoint holds in the key third
        # (upstream multiplies it by zero), the keys get no bias.
        bias = jnp.where((jnp.arange(3 * d) // d) == 1, jnp.zeros((), bias.dtype), bias)
        x, kernel, bias = lin.promote_dtype((x, lin.kernel[...], bias), dtype=lin.dtype)
        y = lin.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=lin.precision)
        return y + bias

    def __call__(self, x: jax.Array, rope: Optional[Tuple[jax.Array, jax.Array]] = None) -> jax.Array:
        b, n, d = x.shape
        qkv = self._qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = dot_product_attention(q, k, v, implementation=self.implementation)
        return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
    """``fc2(gelu(fc1 x))``, exact GELU; ``[..., D] -> [..., D]``."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: DType = None,
                 param_dtype: DType = jnp.float32, bias: bool = True):
        self.fc1 = linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs, bias=bias)
        self.fc2 = linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs, bias=bias)

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


class SwiGLUFFN(nnx.Module):
    """DINOv3's SwiGLU FFN with separate projections: ``w3(silu(w1 x) * (w2 x))``.

    ``hidden`` is the already aligned width (see ``DinoV3Config.ffn_hidden``).
    """

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: DType = None,
                 param_dtype: DType = jnp.float32, bias: bool = True):
        self.w1 = linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs, bias=bias)
        self.w2 = linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs, bias=bias)
        self.w3 = linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs, bias=bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w3(jax.nn.silu(self.w1(x)) * self.w2(x))


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
        # The stride-p convolution written as what it is, a matrix product over flattened
        # patches ``[B, H/p, W/p, p*p*C] x [p*p*C, D]`` (the kernel's own [p, p, C, D] order):
        # compiled for a TPU, the convolution form let XLA relay the 3-channel image out with the
        # batch as its minor dimension, padded to 128 lanes (a 185 MB temporary for a 6x256x704
        # bfloat16 batch, the adapter forward's peak), where the patches are a dense relayout.
        # Rows and columns past the last whole patch are dropped, as the VALID convolution does.
        conv = self.proj
        b, h, w, c = x.shape
        p = conv.kernel_size[0]
        hp, wp = h // p, w // p
        x, kernel, bias = conv.promote_dtype((x, conv.kernel[...], conv.bias[...]), dtype=conv.dtype)
        x = x[:, :hp * p, :wp * p].reshape(b, hp, p, wp, p, c).transpose(0, 1, 3, 2, 4, 5)
        y = jnp.matmul(x.reshape(b, hp, wp, p * p * c), kernel.reshape(p * p * c, -1),
                       precision=conv.precision)
        return y + bias
