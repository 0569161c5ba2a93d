"""Multi-scale deformable attention sampling core: the public entry points and their dispatch.

``ms_deform_attn`` bilinearly samples every level of ``value`` at the given locations (zero
padding, pixel-centre convention: ``grid_sample(align_corners=False, padding_mode='zeros')``),
weights the samples by ``attention_weights`` and sums over levels and points.

``ms_deform_attn_fused`` takes what ``MSDeformAttn`` has before those two tensors exist
(reference points, raw offsets, raw logits), so that a kernel can form the locations and the
softmax on the fly.

Implementations: ``"xla"`` (:mod:`jax_adapter.nn.msda_xla`, everywhere; a GPU formulation is
picked by backend) and ``"pallas"`` (:mod:`jax_adapter.pallas_kernels`, GPU; interpret mode on
CPU). ``"auto"`` reads the environment variable ``JAX_ADAPTER_MSDA_IMPL`` and otherwise picks
Pallas on GPU, XLA elsewhere.

Safe dispatch: ``"auto"`` must never turn a working model into a crash, yet the Pallas kernels
are compiled by XLA's Triton pipeline only when the enclosing program is compiled, long after
this dispatch ran. So before ``"auto"`` picks Pallas for a call signature (entry point, spatial
shapes, per-batch-item shapes, dtypes), it compiles the kernels of that signature (forward and
backward, batch of one) on the device once; if that fails it warns once
(:class:`PallasFallbackWarning`) and uses XLA. ``"pallas"`` asked for explicitly (argument or
environment) skips the check, so its errors surface.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jax_adapter.nn.msda_xla import ms_deform_attn_xla
from jax_adapter.errors import ConfigError, InputError

IMPLS = ("auto", "xla", "pallas")
IMPL_ENV = "JAX_ADAPTER_MSDA_IMPL"

Shapes = Tuple[Tuple[int, int], ...]


def _static_shapes(spatial_shapes) -> Shapes:
    try:
        shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    except (TypeError, ValueError) as e:
        raise InputError(
            f"spatial_shapes must be a static sequence of (H, W) ints, got {spatial_shapes!r}"
        ) from e
    if not shapes or any(h <= 0 or w <= 0 for h, w in shapes):
        raise InputError(f"spatial_shapes must be non-empty positive (H, W) pairs, got {shapes}")
    return shapes


def _check_value(value, shapes: Shapes, b_q: Tuple[int, ...], what: str):
    if value.ndim != 4:
        raise InputError(f"value must be [B, S, M, Dh], got shape {value.shape}")
    total = sum(h * w for h, w in shapes)
    if value.shape[1] != total:
        raise InputError(f"spatial_shapes {shapes} hold {total} positions but value has S={value.shape[1]}")
    b, _, m, _ = value.shape
    if b_q[0] != b or b_q[2] != m or b_q[3] != len(shapes):
        raise InputError(
            f"{what} {b_q} does not match value {value.shape} (B, M) and {len(shapes)} levels"
        )


def _backend() -> str:
    """The default backend (a seam for tests that simulate a GPU)."""
    return jax.default_backend()


def _resolve(impl: str) -> Tuple[str, bool]:
    """``(choice, explicit)``: the implementation to use and whether it was asked for by name
    (argument or environment) rather than picked by ``"auto"``."""
    if impl not in IMPLS:
        raise ConfigError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get(IMPL_ENV, "auto") or "auto"
        if impl not in IMPLS:
            raise ConfigError(f"environment variable {IMPL_ENV} must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return ("pallas" if _backend() == "gpu" else "xla"), False
    return impl, True


def resolve_impl(impl: str) -> str:
    """``"auto"`` -> the environment override if set, else Pallas on GPU and XLA elsewhere
    (before the compile check of :func:`pallas_compiles`)."""
    return _resolve(impl)[0]


class PallasFallbackWarning(RuntimeWarning):
    """``impl="auto"`` fell back to XLA because the Pallas kernels failed to compile."""


# Signature -> None (the kernels compiled) or the error's text; one warning per process.
_PROBES: Dict[tuple, Optional[str]] = {}
_PROBE_LOCK = threading.Lock()
_WARNED = False


def _probe(entry: str, shapes: Shapes, args: Sequence[Any]) -> None:
    """Compile forward and backward of the Pallas ``entry`` point for ``args`` (arrays or shape
    structs; only shapes and dtypes are used, with the batch cut to one) on the default
    device. Raises whatever the compilation raises."""
    from jax_adapter import pallas_kernels

    fn = getattr(pallas_kernels, entry)
    sds = [jax.ShapeDtypeStruct((1,) + tuple(a.shape[1:]), a.dtype) for a in args]
    q, width = sds[-1].shape[1], args[0].shape[2] * args[0].shape[3]
    ct = jax.ShapeDtypeStruct((1, q, width), args[0].dtype)

    def run(args, ct):
        out, vjp = jax.vjp(lambda *a: fn(a[0], shapes, *a[1:], interpret=False), *args)
        return out, vjp(ct)

    jax.jit(run).lower(tuple(sds), ct).compile()


def pallas_compiles(entry: str, shapes: Shapes, args: Sequence[Any]) -> bool:
    """Whether the Pallas kernels of this call signature compile here (checked once per
    signature and process; the first failure warns with :class:`PallasFallbackWarning`)."""
    global _WARNED
    key = (entry, shapes) + tuple((tuple(a.shape[1:]), str(a.dtype)) for a in args)
    with _PROBE_LOCK:
        if key not in _PROBES:
            try:
                _probe(entry, shapes, args)
                _PROBES[key] = None
            except Exception as e:  # noqa: BLE001 - any failure means: do not use Pallas
                _PROBES[key] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        error = _PROBES[key]
        if error is not None and not _WARNED:
            _WARNED = True
            warnings.warn(
                f"the Pallas sampling-core kernels ({entry}) failed to compile on this "
                f"{_backend()} device ({error[:300]}); impl='auto' falls back to the XLA "
                f"implementation. Pass impl='pallas' (or set {IMPL_ENV}=pallas) to see the error, "
                f"or {IMPL_ENV}=xla to choose XLA without this check.",
                PallasFallbackWarning, stacklevel=4,
            )
    return error is None


def _use_pallas(impl: str, entry: str, shapes: Shapes, args: Sequence[Any]) -> bool:
    choice, explicit = _resolve(impl)
    if choice != "pallas":
        return False
    return explicit or pallas_compiles(entry, shapes, args)


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
      impl: ``"auto"``, ``"xla"`` or ``"pallas"`` (see the module notes on the fallback).
      mesh, batch_axis: under a device mesh, the mesh axis (or axes) that split the batch; the
        core then runs per device under ``jax.shard_map`` (``mesh=None``: the mesh in context).
        The Pallas path keeps its ``custom_vjp`` outside the ``shard_map``.

    Returns:
      ``[B, Q, M*Dh]`` in ``value.dtype`` (accumulated in at least float32).
    """
    shapes = _static_shapes(spatial_shapes)
    if sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
        raise InputError(
            f"sampling_locations must be [B, Q, M, L, P, 2], got shape {sampling_locations.shape}"
        )
    _check_value(value, shapes, sampling_locations.shape, "sampling_locations")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise InputError(
            f"attention_weights must be {sampling_locations.shape[:-1]}, got {attention_weights.shape}"
        )
    if _use_pallas(impl, "ms_deform_attn", shapes, (value, sampling_locations, attention_weights)):
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
        raise InputError(f"offsets must be [B, Q, M, L, P, 2], got shape {offsets.shape}")
    _check_value(value, shapes, offsets.shape, "offsets")
    b, q, m, n_l, n_p, _ = offsets.shape
    if reference_points.shape != (b, q, 2):
        raise InputError(f"reference_points must be {(b, q, 2)}, got {reference_points.shape}")
    if logits.shape != (b, q, m, n_l * n_p):
        raise InputError(f"logits must be {(b, q, m, n_l * n_p)}, got {logits.shape}")
    if _use_pallas(impl, "ms_deform_attn_fused", shapes, (value, reference_points, offsets, logits)):
        from jax_adapter import pallas_kernels

        return pallas_kernels.ms_deform_attn_fused(value, shapes, reference_points, offsets, logits,
                                                   mesh=mesh, batch_axis=batch_axis)

    def core(value, reference_points, offsets, logits):
        loc, attn = sampling_inputs(shapes, reference_points, offsets, logits)
        return ms_deform_attn_xla(value, shapes, loc, attn)

    return _batch_split(core, mesh, batch_axis)(value, reference_points, offsets, logits)
