"""Interaction blocks: the injector (SPM -> ViT), the extractor (ViT -> SPM) and ConvFFN."""

from __future__ import annotations

from typing import Any, Protocol, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_adapter.nn.conv import depthwise_conv3x3, use_cpu_formulations
from jax_adapter.nn.deform_attn import MSDeformAttn
from jax_adapter.nn.geometry import AdapterGeometry
from jax_adapter.nn.layers import DType, conv, drop_path, gelu, layer_norm, linear


def run(module: nnx.Module, *args: jax.Array, remat: bool = False, **static: Any):
    """``module(*args, **static)``, under activation checkpointing (``nnx.remat``) if ``remat``.

    ``args`` are arrays; ``static`` (the geometry) is closed over. The module is an argument of
    the checkpointed function, so its parameter paths are those of the plain call.
    """
    if not remat:
        return module(*args, **static)
    return nnx.remat(lambda m, *a: m(*a, **static))(module, *args)


class InteractionConfig(Protocol):
    """The fields the interaction parts read; both adapter configs have them."""

    embed_dim: int
    deform_num_heads: int
    n_points: int
    deform_ratio: float
    init_values: float
    with_cffn: bool
    cffn_ratio: float
    drop_path_rate: float
    with_cp: bool
    msda_impl: str
    dtype: str
    param_dtype: str


def _dtypes(cfg: InteractionConfig) -> dict:
    return dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)


class DWConv(nnx.Module):
    """Depthwise 3x3 conv applied to each SPM level at its own shape (shared weights).

    ``[B, c2+c3+c4 tokens, C] -> same``. The PyTorch original splits the sequence by
    ``n // 21`` and assumes sizes ``h//8, h//16, h//32``; here the split comes from the geometry.
    """

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype: DType = None,
                 param_dtype: DType = "float32"):
        self.dwconv = conv(dim, dim, 3, padding=1, groups=dim, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, geom: AdapterGeometry) -> jax.Array:
        b, _, c = x.shape
        outs = []
        for (h, w), start, n in zip(geom.level_shapes, geom.level_starts, geom.level_lengths):
            level = x[:, start:start + n].reshape(b, h, w, c)
            if use_cpu_formulations():
                y = depthwise_conv3x3(level, self.dwconv.kernel[...], self.dwconv.bias[...])
            else:
                y = self.dwconv(level)
            outs.append(y.reshape(b, n, c))
        return jnp.concatenate(outs, axis=1)


class ConvFFN(nnx.Module):
    """``fc1 -> per-level depthwise conv -> GELU -> fc2`` on SPM tokens ``[B, Nc, D]``."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: DType = None,
                 param_dtype: DType = "float32"):
        dt = dict(dtype=dtype, param_dtype=param_dtype)
        self.fc1 = linear(dim, hidden, rngs=rngs, **dt)
        self.dwconv = DWConv(hidden, rngs=rngs, **dt)
        self.fc2 = linear(hidden, dim, rngs=rngs, **dt)

    def __call__(self, x: jax.Array, geom: AdapterGeometry) -> jax.Array:
        return self.fc2(gelu(self.dwconv(self.fc1(x), geom)))


def _add_attention(module: nnx.Module, cfg: InteractionConfig, levels: int, rngs: nnx.Rngs) -> None:
    """``query_norm``, ``feat_norm`` and the deformable attention over ``levels`` levels."""
    d = cfg.embed_dim
    module.query_norm = layer_norm(d, rngs=rngs, **_dtypes(cfg))
    module.feat_norm = layer_norm(d, rngs=rngs, **_dtypes(cfg))
    module.attn = MSDeformAttn(d, levels, cfg.deform_num_heads, cfg.n_points, cfg.deform_ratio,
                               impl=cfg.msda_impl, rngs=rngs, **_dtypes(cfg))


class Injector(nnx.Module):
    """``x + gamma * MSDeformAttn(query_norm(x), feat_norm(c))`` over levels c2, c3, c4.

    ``x [B, Hv*Wv, D]`` (patch tokens), ``c [B, c2+c3+c4, D]`` -> ``[B, Hv*Wv, D]``.
    """

    def __init__(self, cfg: InteractionConfig, *, rngs: nnx.Rngs):
        d = cfg.embed_dim
        _add_attention(self, cfg, 3, rngs)
        self.gamma = nnx.Param(jnp.full((d,), cfg.init_values, cfg.param_dtype))

    def __call__(self, x: jax.Array, c: jax.Array, geom: AdapterGeometry) -> jax.Array:
        attn = self.attn(self.query_norm(x), geom.injector_reference_points, self.feat_norm(c),
                         geom.level_shapes)
        return x + self.gamma[...].astype(x.dtype) * attn


class Extractor(nnx.Module):
    """``c + MSDeformAttn(query_norm(c), feat_norm(x))`` over the ViT grid, then ConvFFN.

    ``c [B, c2+c3+c4, D]``, ``x [B, Hv*Wv, D]`` -> ``[B, c2+c3+c4, D]``.
    """

    def __init__(self, cfg: InteractionConfig, *, rngs: nnx.Rngs):
        d = cfg.embed_dim
        _add_attention(self, cfg, 1, rngs)
        self.with_cffn = cfg.with_cffn
        if cfg.with_cffn:
            self.ffn = ConvFFN(d, int(d * cfg.cffn_ratio), rngs=rngs, **_dtypes(cfg))
            self.ffn_norm = layer_norm(d, rngs=rngs, **_dtypes(cfg))
            self.drop_path = drop_path(cfg.drop_path_rate, rngs=rngs)

    def __call__(self, c: jax.Array, x: jax.Array, geom: AdapterGeometry) -> jax.Array:
        c = c + self.attn(self.query_norm(c), geom.extractor_reference_points, self.feat_norm(x),
                          (geom.vit_grid,))
        if self.with_cffn:
            c = c + self.drop_path(self.ffn(self.ffn_norm(c), geom))
        return c


class InteractionBlock(nnx.Module):
    """Injector, a run of ViT blocks over ``[prefix, x]``, extractor(s).

    ``prefix [B, 1+R, D]`` holds cls then register tokens; they join the patch tokens for the
    ViT blocks only. Returns the updated ``(x, c, prefix)``. With ``cfg.with_cp`` the injector,
    each ViT block and each extractor are checkpointed (recomputed in the backward pass).
    """

    def __init__(self, cfg: InteractionConfig, extra_extractors: bool, *, rngs: nnx.Rngs):
        self.with_cp = cfg.with_cp
        self.injector = Injector(cfg, rngs=rngs)
        self.extractor = Extractor(cfg, rngs=rngs)
        self.extra_extractors = (
            nnx.List([Extractor(cfg, rngs=rngs) for _ in range(2)]) if extra_extractors else None
        )

    def __call__(
        self, x: jax.Array, c: jax.Array, prefix: jax.Array, blocks: Sequence[nnx.Module],
        geom: AdapterGeometry,
    ) -> Tuple[jax.Array, jax.Array, jax.Array]:
        cp = self.with_cp
        x = run(self.injector, x, c, remat=cp, geom=geom)
        n_prefix = prefix.shape[1]
        t = jnp.concatenate([prefix, x], axis=1)
        for blk in blocks:
            t = run(blk, t, remat=cp)
        prefix, x = t[:, :n_prefix], t[:, n_prefix:]
        c = run(self.extractor, c, x, remat=cp, geom=geom)
        if self.extra_extractors is not None:
            for ext in self.extra_extractors:
                c = run(ext, c, x, remat=cp, geom=geom)
        return x, c, prefix
