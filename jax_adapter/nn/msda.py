"""Multi-scale deformable attention sampling core: the public entry points and their dispatch.

``ms_deform_attn`` bilinearly samples every level of ``value`` at the given locations (zero
padding, pixel-centre convention: ``grid_sample(align_corners=False, padding_mode='zeros')``),
weights the samples by ``attention_weights`` and sums over levels and points.

``ms_deform_attn_fused`` takes what ``MSDeformAttn`` has before those two tensors exist
(reference points, raw offsets, raw logits), so that a kernel can form the locations and the
softmax on the fly.

Implementations: ``"xla"`` (:mod:`jax_adapter.nn.msda_xla`, everywhere) and ``"pallas"``
(:mod:`pallas_kernels`, GPU; interpret mode on CPU). ``"auto"`` reads the environment variable
``JAX_ADAPTER_MSDA_IMPL`` and otherwise picks Pallas on GPU, XLA elsewhere.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jax_adapter.nn.msda_xla import ms_deform_attn_xla

IMPLS = ("auto", "xla", "pallas")
IMPL_ENV = "JAX_ADAPTER_MSDA_IMPL"

Shapes = Tuple[Tuple[int, int], ...]


def _static_shapes(spatial_shapes) -> Shapes:
    try:
        shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"spatial_shapes must be a static sequence of (H, W) ints, got {spatial_shapes!r}"
        ) from e
    if not shapes or any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"spatial_shapes must be non-empty positive (H, W) pairs, got {shapes}")
    return shapes


def _check_value(value, shapes: Shapes, b_q: Tuple[int, ...], what: str):
    if value.ndim != 4:
        raise ValueError(f"value must be [B, S, M, Dh], got shape {value.shape}")
    total = sum(h * w for h, w in shapes)
    if value.shape[1] != total:
        raise ValueError(f"spatial_shapes {shapes} hold {total} positions but value has S={value.shape[1]}")
    b, _, m, _ = value.shape
    if b_q[0] != b or b_q[2] != m or b_q[3] != len(shapes):
        raise ValueError(
            f"{what} {b_q} does not match value {value.shape} (B, M) and {len(shapes)} levels"
        )


def resolve_impl(impl: str) -> str:
    """``"auto"`` -> the environment override if set, else Pallas on GPU and XLA elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get(IMPL_ENV, "auto") or "auto"
        if impl not in IMPLS:
            raise ValueError(f"environment variable {IMPL_ENV} must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    return impl


def _batch_split(fn: Callable, mesh: Any, batch_axis: Optional[Any]) -> Callable:
    """``fn`` run per device on its share of the batch (every argument is batch-major).

    The sampling core gathers data-dependent rows; left to the SPMD partitioner, a batch-sharded
    call would gather the whole batch onto every device.
    """
    if batch_axis is None:
        return fn
    spec = PartitionSpec(batch_axis)
    return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)


def ms_deform_attn(
    value: jax.Array,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
    *,
    impl: str = "auto",
    mesh: Any = None,
    batch_axis: Optional[Any] = None,
) -> jax.Array:
    """Multi-scale deformable attention sampling core.

    Args:
      value: ``[B, S, M, Dh]``, the levels flattened row-major and concatenated (S = sum H*W).
      spatial_shapes: static tuple of ``(H, W)`` per level.
      sampling_locations: ``[B, Q, M, L, P, 2]``, (x, y) normalised to [0, 1] (may lie outside;
        non-finite locations contribute zero).
      attention_weights: ``[B, Q, M, L, P]``.
      impl: ``"auto"``, ``"xla"`` or ``"pallas"``.
      mesh, batch_axis: under a device mesh, the mesh axis (or axes) that split the batch; the
        core then runs per device under ``jax.shard_map`` (``mesh=None``: the mesh in context).
        The Pallas path keeps its ``custom_vjp`` outside the ``shard_map``.

    Returns:
      ``[B, Q, M*Dh]`` in ``value.dtype`` (accumulated in at least float32).
    """
    shapes = _static_shapes(spatial_shapes)
    if sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be [B, Q, M, L, P, 2], got shape {sampling_locations.shape}"
        )
    _check_value(value, shapes, sampling_locations.shape, "sampling_locations")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights must be {sampling_locations.shape[:-1]}, got {attention_weights.shape}"
        )
    if resolve_impl(impl) == "pallas":
        from jax_adapter import pallas_kernels

        return pallas_kernels.ms_deform_attn(value, shapes, sampling_locations, attention_weights,
                                             mesh=mesh, batch_axis=batch_axis)
    core = _batch_split(lambda *a: ms_deform_attn_xla(a[0], shapes, *a[1:]), mesh, batch_axis)
    return core(value, sampling_locations, attention_weights)


def sampling_inputs(
    spatial_shapes: Shapes,
    reference_points: jax.Array,
    offsets: jax.Array,
    logits: jax.Array,
) -> Tuple[jax.Array, jax.Array]:
    """Locations and softmaxed weights from reference points, raw offsets and raw logits.

    ``reference_points [B, Q, 2]`` (x, y), ``offsets [B, Q, M, L, P, 2]`` in pixels of each
    level, ``logits [B, Q, M, L*P]`` -> ``([B, Q, M, L, P, 2], [B, Q, M, L, P])``. The softmax
    runs in float32 at least.
    """
    b, q, m, n_l, n_p, _ = offsets.shape
    normaliser = jnp.asarray([(w, h) for h, w in spatial_shapes], jnp.float32)
    loc = reference_points[:, :, None, None, None, :] + offsets / normaliser[None, None, None, :, None, :]
    wdtype = jnp.promote_types(logits.dtype, jnp.float32)
    attn = jax.nn.softmax(logits.astype(wdtype), axis=-1).reshape(b, q, m, n_l, n_p)
    return loc, attn


def ms_deform_attn_fused(
    value: jax.Array,
    spatial_shapes: Sequence[Tuple[int, int]],
    reference_points: jax.Array,
    offsets: jax.Array,
    logits: jax.Array,
    *,
    impl: str = "auto",
    mesh: Any = None,
    batch_axis: Optional[Any] = None,
) -> jax.Array:
    """Sampling core from raw projections: ``loc = ref + offsets / (W_l, H_l)``, softmax over L*P.

    Args:
      value: ``[B, S, M, Dh]``.
      spatial_shapes: static tuple of ``(H, W)`` per level.
      reference_points: ``[B, Q, 2]`` (x, y) in [0, 1], the same point for every level.
      offsets: ``[B, Q, M, L, P, 2]``, raw ``sampling_offsets`` output (pixels of each level).
      logits: ``[B, Q, M, L*P]``, raw ``attention_weights`` output (before the softmax).
      impl, mesh, batch_axis: as for :func:`ms_deform_attn`.

    Returns:
      ``[B, Q, M*Dh]`` in ``value.dtype``.
    """
    shapes = _static_shapes(spatial_shapes)
    if offsets.ndim != 6 or offsets.shape[-1] != 2:
        raise ValueError(f"offsets must be [B, Q, M, L, P, 2], got shape {offsets.shape}")
    _check_value(value, shapes, offsets.shape, "offsets")
    b, q, m, n_l, n_p, _ = offsets.shape
    if reference_points.shape != (b, q, 2):
        raise ValueError(f"reference_points must be {(b, q, 2)}, got {reference_points.shape}")
    if logits.shape != (b, q, m, n_l * n_p):
        raise ValueError(f"logits must be {(b, q, m, n_l * n_p)}, got {logits.shape}")
    if resolve_impl(impl) == "pallas":
        from jax_adapter import pallas_kernels

        return pallas_kernels.ms_deform_attn_fused(value, shapes, reference_points, offsets, logits,
                                                   mesh=mesh, batch_axis=batch_axis)

    def core(value, reference_points, offsets, logits):
        loc, attn = sampling_inputs(shapes, reference_points, offsets, logits)
        return ms_deform_attn_xla(value, shapes, loc, attn)

    return _batch_split(core, mesh, batch_axis)(value, reference_points, offsets, logits)
