"""Scaled dot-product attention for the trunks: ``[B, N, H, Dh]`` queries, keys and values.

One function, four implementations, chosen statically from the platform, dtype and head size:

- ``"cudnn"``: cuDNN's fused flash attention (``jax.nn.dot_product_attention(...,
  implementation="cudnn")``), on CUDA GPUs for bfloat16/float16 with a head size cuDNN takes.
  It keeps the softmax statistics in float32 inside the kernel and never writes the
  ``[B, H, N, N]`` logits: at 900x1600 (7,475 tokens), batch 6, ViT-B those are 16 GB a layer.
- ``"chunked"``: the CPU path. A loop over (batch x head) and query chunks with a recomputing
  ``custom_vjp`` (the FlashAttention-2 algorithm written with XLA ops): the logits of one chunk
  stay in cache instead of going through memory, and the backward rebuilds them from the saved
  log-sum-exp rather than storing them. The softmax scale goes on the queries, never on a logit
  block. Measured on 2 cores at ``[2, 970, 6, 64]``, float32, against PyTorch's
  ``scaled_dot_product_attention``: forward+backward in 0.74x-0.97x its time on a Zen 4 EPYC
  (AVX-512) and 1.05x-1.35x on a Zen 3 EPYC (AVX2), where ``jax.nn.dot_product_attention`` took
  2x (``benchmarks/cpu/train_step.py``, section ``parts``).
- ``"blocked"``: the GPU path where cuDNN cannot run (float32, head sizes cuDNN refuses, a
  refusal at trace time). FlashAttention-2's algorithm written with XLA ops, all heads of the
  batch at once: queries go in blocks whose ``[B, H, block, N]`` float32 logits stay under
  ``BLOCK_BYTES`` (one block, no loop, when the whole logits fit), and a recomputing
  ``custom_vjp`` saves only q, k, v, the output and the log-sum-exp, so the backward rebuilds
  the probabilities block by block instead of keeping ``[B, H, N, N]`` logits and
  probabilities of every layer alive until the backward (ViT-B, batch 6 at 256x704 in
  float32: 2 x 271 MB a layer, 6.5 GB for the 12 layers of the H100 train step).
- ``"xla"``: the textbook formulation with float32 logits, differentiated by JAX (the backward
  keeps the logits and probabilities). ``choose_implementation`` names this family for
  accelerators without a cuDNN path; ``choose_formulation`` then takes ``"blocked"`` on GPUs
  and keeps ``"xla"`` elsewhere (TPU). Asked for explicitly it is always the textbook form.

Logits, the softmax and its statistics are float32 in every implementation, whatever the input
dtype; outputs and gradients come back in the input dtype.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from jax_adapter import compilation
from jax_adapter.errors import ConfigError, InputError

IMPLEMENTATIONS = ("auto", "cudnn", "blocked", "chunked", "xla")
# Platform names on which the "xla" family runs as "blocked".
GPU_PLATFORMS = ("gpu", "cuda", "rocm")
# "blocked": the most bytes of one float32 logit block [B, H, block, N] (128 MiB). Whole-sequence
# logits up to this size are one block (no loop); longer sequences go in equal query blocks.
BLOCK_BYTES = 1 << 27
# Queries per chunk of the "chunked" path. One [chunk, N] float32 logit block per step: up to
# 1024 tokens a head is one block (4 MB, cache-sized); longer sequences go 512 queries at a time.
WHOLE_HEAD_MAX = 1024
QUERY_CHUNK = 512

F32 = jnp.float32


class AttentionFallbackWarning(UserWarning):
    """cuDNN attention was chosen or asked for but cannot run here; the XLA path runs instead."""


def cudnn_head_dim_ok(head_dim: int, compute_capability: Optional[str]) -> bool:
    """cuDNN flash attention's head-size rule: a multiple of 8, at most 128 (256 from sm_90).
    An unknown compute capability is taken as sm_80's rule."""
    limit = 256 if _at_least(compute_capability, (9, 0)) else 128
    return head_dim % 8 == 0 and head_dim <= limit


def _at_least(cc: Optional[str], want: Tuple[int, int]) -> bool:
    if not cc:
        return False
    try:
        major, minor = (int(p) for p in str(cc).split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= want


def choose_implementation(platform: str, dtype, head_dim: int,
                          compute_capability: Optional[str] = None) -> str:
    """The dispatch rule behind ``implementation="auto"``.

    ``platform``: the compilation target's (``"cpu"``, ``"gpu"``, ``"tpu"``). cuDNN for
    bfloat16/float16 on a CUDA GPU from sm_80 (cuDNN's flash attention needs Ampere or newer;
    an unknown capability counts as new enough) when the head size fits; otherwise ``"xla"`` on
    accelerators and ``"chunked"`` on CPU.
    """
    if platform == "cpu":
        return "chunked"
    if (platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and (compute_capability is None or _at_least(compute_capability, (8, 0)))
            and cudnn_head_dim_ok(head_dim, compute_capability)):
        return "cudnn"
    return "xla"


def choose_formulation(platform: str, dtype, head_dim: int,
                       compute_capability: Optional[str] = None) -> str:
    """The whole rule behind ``implementation="auto"``: :func:`choose_implementation`, whose
    ``"xla"`` family runs as ``"blocked"`` on GPUs (same values, a backward that does not keep
    the ``[B, H, N, N]`` probabilities) and as ``"xla"`` elsewhere."""
    impl = choose_implementation(platform, dtype, head_dim, compute_capability)
    if impl == "xla" and platform in GPU_PLATFORMS:
        return "blocked"
    return impl


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          scale: Optional[float] = None, implementation: str = "auto") -> jax.Array:
    """``softmax(q k^T * scale) v`` over all keys: ``[B, N, H, Dh] x3 -> [B, N, H, Dh]``.

    ``scale`` defaults to ``Dh ** -0.5``. ``implementation``: one of ``IMPLEMENTATIONS``
    (``"auto"``: :func:`choose_formulation` for the compilation target, see
    :func:`jax_adapter.target`; the choice is recorded under ``"attention"``). A ``"cudnn"``
    that cuDNN refuses (wrong platform, dtype or shape, or no cuDNN installed) warns with
    ``AttentionFallbackWarning`` and runs ``"blocked"`` on a GPU, ``"xla"`` elsewhere; it never
    fails.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise InputError(f"q, k and v must share one [B, N, H, Dh] shape, got {q.shape}, {k.shape}, {v.shape}")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    t = compilation.current()
    if implementation == "auto":
        implementation = choose_formulation(t.platform, q.dtype, q.shape[-1], t.compute_capability)
    if implementation == "cudnn":
        out = _cudnn_or_none(q, k, v, scale, t.platform)
        if out is not None:
            compilation.record("attention", "cudnn")
            return out
        implementation = "blocked" if t.platform in GPU_PLATFORMS else "xla"
    compilation.record("attention", implementation)
    if implementation == "chunked":
        return chunked_attention(q, k, v, scale=scale)
    if implementation == "blocked":
        return blocked_attention(q, k, v, scale=scale)
    return xla_attention(q, k, v, scale=scale)


def _cudnn_or_none(q, k, v, scale, platform: str) -> Optional[jax.Array]:
    if platform not in ("gpu", "cuda"):
        warnings.warn(f"cuDNN attention needs a CUDA GPU (compiling for: {platform}); "
                      "using the XLA attention", AttentionFallbackWarning, stacklevel=3)
        return None
    try:
        # jax checks cuDNN's version, the dtype and the shape while tracing and raises then.
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    except (NotImplementedError, ValueError, RuntimeError, TypeError) as e:
        warnings.warn(f"cuDNN attention refused {q.dtype} {q.shape}: {e}; using the blocked XLA attention",
                      AttentionFallbackWarning, stacklevel=3)
        return None


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: Optional[float] = None) -> jax.Array:
    """The materialised formulation, float32 logits: ``[B, N, H, Dh] x3 -> [B, N, H, Dh]``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=F32) * scale
    p = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(F32))
    return out.astype(q.dtype)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: Optional[float] = None,
                      chunk: Optional[int] = None) -> jax.Array:
    """The CPU path (see the module docstring): ``[B, N, H, Dh] x3 -> [B, N, H, Dh]``.

    ``chunk``: queries per step; by default the whole head up to ``WHOLE_HEAD_MAX`` tokens,
    else ``QUERY_CHUNK``.
    """
    b, n, h, d = q.shape
    scale = float(d ** -0.5 if scale is None else scale)
    if chunk is None:
        chunk = n if n <= WHOLE_HEAD_MAX else QUERY_CHUNK
    chunk = max(1, min(int(chunk), n))

    def heads_first(x):  # [B, N, H, Dh] -> [B*H, N, Dh]
        return x.transpose(0, 2, 1, 3).reshape(b * h, n, d)

    out = _chunked(heads_first(q), heads_first(k), heads_first(v), scale, chunk)
    return out.reshape(b, h, n, d).transpose(0, 2, 1, 3)


def _split_queries(x: jax.Array, chunk: int) -> jax.Array:
    """``[G, N, ...] -> [G, ceil(N/chunk), chunk, ...]``, zero-padded (padded queries are dropped
    from the output and carry a zero cotangent, so they add nothing to dk, dv)."""
    g, n = x.shape[:2]
    steps = -(-n // chunk)
    pad = [(0, 0), (0, steps * chunk - n)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad).reshape((g, steps, chunk) + x.shape[2:])


def _scaled(q, scale):
    """``q`` in float32 times the softmax scale: ``[C, Dh]`` rather than ``[C, N]`` multiplies."""
    return q.astype(F32) * scale


def _forward_block(q, k, v, scale):
    """One query block of one head: ``q [C, Dh]``, ``k, v [N, Dh]`` -> out ``[C, Dh]``, lse ``[C]``.

    The scale goes on the queries, not on the ``[C, N]`` logits: one pass fewer over the block.
    """
    s = jnp.dot(_scaled(q, scale), k.T.astype(F32), preferred_element_type=F32)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.dot(e, v.astype(F32)) / denom
    return out.astype(q.dtype), (m + jnp.log(denom))[:, 0]


def _forward(q, k, v, scale, chunk):
    g, n, d = q.shape

    def head(args):
        qh, kh, vh = args
        return lax.map(lambda qc: _forward_block(qc, kh, vh, scale), qh)

    out, lse = lax.map(head, (_split_queries(q, chunk), k, v))
    return out.reshape(g, -1, d)[:, :n], lse.reshape(g, -1)[:, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked(q, k, v, scale, chunk):
    """``[G, N, Dh] x3 -> [G, N, Dh]`` (G = batch x heads)."""
    return _forward(q, k, v, scale, chunk)[0]


def _chunked_fwd(q, k, v, scale, chunk):
    out, lse = _forward(q, k, v, scale, chunk)
    return out, (q, k, v, out, lse)


def _chunked_bwd(scale, chunk, res, g):
    q, k, v, out, lse = res
    n, d = q.shape[1:]
    # The softmax backward's row term sum_j p_ij dp_ij equals sum_d g_id out_id: one [G, N] array
    # instead of a pass over the logits.
    delta = jnp.sum(g.astype(F32) * out.astype(F32), axis=-1)

    def head(args):
        qh, kh, vh, gh, lh, dh = args
        k32 = kh.astype(F32)

        def step(carry, blk):
            dk, dv = carry
            qc, gc, lc, dc = blk
            # With q' = scale q: s = q' k^T, dk = dS'^T q' and dq = scale dS' k for
            # dS' = P (dP - delta); the scale never touches a [C, N] block.
            qs = _scaled(qc, scale)
            p = jnp.exp(jnp.dot(qs, k32.T, preferred_element_type=F32) - lc[:, None])
            dv = dv + jnp.dot(p.T, gc.astype(F32))
            dp = jnp.dot(gc, vh.T, preferred_element_type=F32)
            ds = p * (dp - dc[:, None])
            dk = dk + jnp.dot(ds.T, qs)
            return (dk, dv), (jnp.dot(ds, k32) * scale).astype(q.dtype)

        zeros = jnp.zeros(kh.shape, F32)
        (dk, dv), dq = lax.scan(step, (zeros, zeros), (qh, gh, lh, dh))
        return dq, dk.astype(k.dtype), dv.astype(v.dtype)

    dq, dk, dv = lax.map(head, (_split_queries(q, chunk), k, v, _split_queries(g, chunk),
                                _split_queries(lse, chunk), _split_queries(delta, chunk)))
    return dq.reshape(q.shape[0], -1, d)[:, :n], dk, dv


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# --------------------------------------------------------------------------- "blocked" (GPU)

def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: Optional[float] = None,
                      block: Optional[int] = None) -> jax.Array:
    """The GPU path without cuDNN (see the module docstring): ``[B, N, H, Dh] x3 -> [B, N, H, Dh]``.

    ``block``: queries per block; by default the fewest equal blocks whose ``[B, H, block, N]``
    float32 logits fit in ``BLOCK_BYTES`` (the last one zero-padded). Saves q, k, v, the output
    and the float32 log-sum-exp ``[B, H, N]`` for the backward, which recomputes each block's
    probabilities. Logits, softmax statistics and accumulations are float32; outputs and
    gradients come back in the input dtype.
    """
    b, n, h, d = q.shape
    scale = float(d ** -0.5 if scale is None else scale)
    if block is None:
        block = default_block(b, h, n)
    block = max(1, min(int(block), n))
    return _blocked(q, k, v, scale, block)


def default_block(b: int, h: int, n: int, block_bytes: Optional[int] = None) -> int:
    """Queries per block: all ``n`` if ``[b, h, n, n]`` float32 logits fit in ``block_bytes``
    (default ``BLOCK_BYTES``), else ``ceil(n / blocks)`` for the fewest blocks that fit."""
    limit = BLOCK_BYTES if block_bytes is None else block_bytes
    rows = max(1, limit // (4 * b * h * n))
    if rows >= n:
        return n
    blocks = -(-n // rows)
    return -(-n // blocks)


def _query_blocks(x: jax.Array, block: int, axis: int) -> jax.Array:
    """Split ``axis`` (length N) into ``ceil(N / block)`` blocks, zero-padded, as a new leading
    axis: ``[..., N, ...] -> [nb, ..., block, ...]``."""
    n = x.shape[axis]
    nb = -(-n // block)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, nb * block - n)
    x = jnp.pad(x, pad)
    x = x.reshape(x.shape[:axis] + (nb, block) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _merge_blocks(x: jax.Array, n: int, axis: int) -> jax.Array:
    """Inverse of :func:`_query_blocks` (``axis`` counted without the block axis)."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
    return lax.slice_in_dim(x, 0, n, axis=axis)


def _blocked_forward_block(q, k, v32, scale):
    """``q [B, C, H, Dh]``, ``k [B, N, H, Dh]``, ``v32`` float32 -> out ``[B, C, H, Dh]`` float32,
    lse ``[B, H, C]`` float32. The same operations as :func:`xla_attention` plus the lse."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=F32) * scale
    m = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jnp.exp(logits - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bkhd->bqhd", e / denom, v32)
    return out, (m + jnp.log(denom))[..., 0]


def _over_blocks(fn, xs, nb):
    """``[fn(x[i] for x in xs) for i in range(nb)]`` stacked on a leading axis, for a tuple of
    outputs. A ``fori_loop`` whose stacked buffers start as copies of block 0's results rather
    than zeros: XLA hoists and horizontally fuses constant-zero buffers of every layer into one
    early kernel, which would keep all of them alive from the forward on."""
    first = fn(*(x[0] for x in xs))
    acc = tuple(jnp.broadcast_to(r[None], (nb,) + r.shape) for r in first)

    def body(i, acc):
        res = fn(*(lax.dynamic_index_in_dim(x, i, 0, keepdims=False) for x in xs))
        return tuple(lax.dynamic_update_index_in_dim(a, r, i, 0) for a, r in zip(acc, res))

    return lax.fori_loop(1, nb, body, acc)


def _blocked_forward(q, k, v, scale, block):
    n = q.shape[1]
    v32 = v.astype(F32)
    if block >= n:
        out, lse = _blocked_forward_block(q, k, v32, scale)
    else:
        qb = _query_blocks(q, block, 1)
        out, lse = _over_blocks(lambda qi: _blocked_forward_block(qi, k, v32, scale), (qb,), qb.shape[0])
        out, lse = _merge_blocks(out, n, 1), _merge_blocks(lse, n, 2)
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blocked(q, k, v, scale, block):
    if block >= q.shape[1]:
        # Undifferentiated and one block: exactly the textbook formulation.
        return xla_attention(q, k, v, scale=scale)
    return _blocked_forward(q, k, v, scale, block)[0]


def _blocked_fwd(q, k, v, scale, block):
    out, lse = _blocked_forward(q, k, v, scale, block)
    return out, (q, k, v, out, lse)


def _blocked_bwd(scale, block, res, g):
    # The barrier ties the residuals to the cotangent: the recomputed logits are new values that
    # XLA can neither CSE with the forward's (which would keep those alive until here, as
    # jax.checkpoint's prevent_cse guards against) nor compute before this layer's backward.
    (q, k, v, out, lse), g = lax.optimization_barrier((res, g))
    n = q.shape[1]
    # sum_j p_ij dp_ij = sum_d g_id out_id: the softmax backward's row term, [B, H, N].
    delta = jnp.einsum("bqhd,bqhd->bhq", g.astype(F32), out.astype(F32))
    k32, v32 = k.astype(F32), v.astype(F32)

    def grads(qb, gb, lb, db):
        """One query block: dq of the block, its dk and dv contributions (float32)."""
        s = jnp.einsum("bqhd,bkhd->bhqk", qb, k, preferred_element_type=F32) * scale
        p = jnp.exp(s - lb[..., None])
        g32 = gb.astype(F32)
        dv = jnp.einsum("bhqk,bqhd->bkhd", p, g32)
        dp = jnp.einsum("bqhd,bkhd->bhqk", g32, v32)
        ds = p * (dp - db[..., None]) * scale
        dk = jnp.einsum("bhqk,bqhd->bkhd", ds, qb.astype(F32))
        dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k32)
        return dq, dk, dv

    if block >= n:
        dq, dk, dv = grads(q, g, lse, delta)
    else:
        xs = (_query_blocks(q, block, 1), _query_blocks(g, block, 1),
              _query_blocks(lse, block, 2), _query_blocks(delta, block, 2))
        nb = xs[0].shape[0]
        # dq of each block goes to its own slot; dk and dv sum over blocks. The sums start from
        # block 0's terms, not from zeros (see _over_blocks).
        dq0, dk, dv = grads(*(x[0] for x in xs))
        acc = (jnp.broadcast_to(dq0[None], (nb,) + dq0.shape), dk, dv)

        def body(i, acc):
            dq_all, dk, dv = acc
            dq_i, dk_i, dv_i = grads(*(lax.dynamic_index_in_dim(x, i, 0, keepdims=False) for x in xs))
            return lax.dynamic_update_index_in_dim(dq_all, dq_i, i, 0), dk + dk_i, dv + dv_i

        dq, dk, dv = lax.fori_loop(1, nb, body, acc)
        dq = _merge_blocks(dq, n, 1)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
