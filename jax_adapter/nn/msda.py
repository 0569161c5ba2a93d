"""Multi-scale deformable attention sampling core: the public entry points and their dispatch.

``ms_deform_attn`` bilinearly samples every level of ``value`` at the given locations (zero
padding, pixel-centre convention: ``grid_sample(align_corners=False, padding_mode='zeros')``),
weights the samples by ``attention_weights`` and sums over levels and points.

``ms_deform_attn_fused`` takes what ``MSDeformAttn`` has before those two tensors exist
(reference points, raw offsets, raw logits), so that a kernel can form the locations and the
softmax on the fly.

Implementations (``impl``):

- ``"xla"`` (:mod:`jax_adapter.nn.msda_xla`): gathers and a scatter-add, everywhere; its GPU or
  CPU formulation follows the compilation target.
- ``"dense"`` (:mod:`jax_adapter.nn.msda_dense`): gather-free, the bilinear sampling as one-hot
  matrix products (for accelerators where gathers are slow and no kernel runs).
- ``"pallas"``: the target's Pallas kernels (:mod:`jax_adapter.pallas_kernels`): on a GPU the Triton
  kernels, on a TPU the Mosaic kernels of :mod:`jax_adapter.pallas_kernels.tpu`, on a CPU the Triton
  kernels in the Pallas interpreter (slow: for tests).
- ``"auto"``: the environment variable ``JAX_ADAPTER_MSDA_IMPL`` if set, else Pallas on GPUs and
  TPUs and XLA on CPUs.

Every choice reads the compilation target (:func:`jax_adapter.target`), not the backend JAX
happens to run on, so a program compiled ahead of time for a TPU takes the TPU's kernels. What
each call chose is recorded in the target's ``decisions`` under ``"msda"``.

Safe dispatch: ``"auto"`` must never turn a working model into a crash, yet Pallas kernels are
compiled (by XLA's Triton pipeline, or Mosaic) only when the enclosing program is, long after
this dispatch ran. So before ``"auto"`` picks Pallas for a call signature (entry point, spatial
shapes, per-batch-item shapes, dtypes, target), it compiles the kernels of that signature
(forward and backward, batch of one) on the target's device once; if that fails it warns once
(:class:`PallasFallbackWarning`) and uses XLA. When compiling ahead of time for devices this
process does not have, nothing can be checked: the kernels are used, and their compilation is
part of the program's. ``"pallas"`` asked for explicitly (argument or environment) skips the
check, so its errors surface.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
from jax.sharding import PartitionSpec, SingleDeviceSharding

from jax_adapter import compilation
from jax_adapter.errors import ConfigError, InputError
from jax_adapter.nn.msda_dense import ms_deform_attn_dense, ms_deform_attn_dense_fused
from jax_adapter.nn.msda_xla import ms_deform_attn_xla, sampling_inputs

IMPLS = ("auto", "xla", "dense", "pallas")
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


def _resolve(impl: str, platform: str) -> Tuple[str, bool]:
    """``(choice, explicit)``: the implementation for ``platform`` and whether it was asked for
    by name (argument or environment) rather than picked by ``"auto"``."""
    if impl not in IMPLS:
        raise ConfigError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get(IMPL_ENV, "auto") or "auto"
        if impl not in IMPLS:
            raise ConfigError(f"environment variable {IMPL_ENV} must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return ("pallas" if platform in ("gpu", "tpu") else "xla"), False
    return impl, True


def resolve_impl(impl: str, platform: Optional[str] = None) -> str:
    """``"auto"`` -> the environment override if set, else Pallas on GPUs and TPUs and XLA on
    CPUs (before the compile check of :func:`pallas_compiles`). ``platform``: the current
    compilation target's by default."""
    return _resolve(impl, platform or compilation.current().platform)[0]


def _pallas_name(t: compilation.Target) -> str:
    """What ``"pallas"`` runs for target ``t``."""
    return {"gpu": "pallas_triton", "tpu": "pallas_mosaic"}.get(t.platform, "pallas_interpret")


def _pallas_entry(entry: str, t: compilation.Target) -> Callable:
    """The Pallas function for ``entry`` (``"ms_deform_attn"`` or ``"ms_deform_attn_fused"``)
    on target ``t``, with the interpret flag the target implies."""
    if t.platform == "tpu":
        from jax_adapter.pallas_kernels import tpu

        fn = tpu.ms_deform_attn_fused_tpu if entry.endswith("fused") else tpu.ms_deform_attn_tpu
        return lambda *a, mesh=None, batch_axis=None: _batch_split(
            lambda *xs: fn(xs[0], a[1], *xs[1:]), mesh, batch_axis)(a[0], *a[2:])
    from jax_adapter import pallas_kernels

    fn = getattr(pallas_kernels, entry)
    return lambda *a, **k: fn(*a, interpret=t.platform != "gpu", **k)


class PallasFallbackWarning(RuntimeWarning):
    """``impl="auto"`` fell back to XLA because the Pallas kernels failed to compile."""


# Signature -> None (the kernels compiled) or the error's text; one warning per process.
_PROBES: Dict[tuple, Optional[str]] = {}
_PROBE_LOCK = threading.Lock()
_WARNED = False


def _probe(entry: str, shapes: Shapes, args: Sequence[Any], t: compilation.Target) -> None:
    """Compile forward and backward of the Pallas ``entry`` point of target ``t`` for ``args``
    (arrays or shape structs; only shapes and dtypes are used, with the batch cut to one) on
    the target's device. Raises whatever the compilation raises."""
    fn = _pallas_entry(entry, t)
    device = t.device if t.device is not None else jax.devices()[0]
    sharding = SingleDeviceSharding(device)
    sds = [jax.ShapeDtypeStruct((1,) + tuple(a.shape[1:]), a.dtype, sharding=sharding) for a in args]
    q, width = sds[-1].shape[1], args[0].shape[2] * args[0].shape[3]
    ct = jax.ShapeDtypeStruct((1, q, width), args[0].dtype, sharding=sharding)

    def run(args, ct):
        out, vjp = jax.vjp(lambda *a: fn(a[0], shapes, *a[1:]), *args)
        return out, vjp(ct)

    jax.jit(run).lower(tuple(sds), ct).compile()


def pallas_compiles(entry: str, shapes: Shapes, args: Sequence[Any],
                    t: Optional[compilation.Target] = None) -> bool:
    """Whether the Pallas kernels of this call signature compile for target ``t`` (default: the
    current one), checked once per signature and process; the first failure warns with
    :class:`PallasFallbackWarning`."""
    global _WARNED
    t = compilation.current() if t is None else t
    key = (entry, shapes, t.platform, t.device_kind) + tuple((tuple(a.shape[1:]), str(a.dtype)) for a in args)
    with _PROBE_LOCK:
        if key not in _PROBES:
            try:
                _probe(entry, shapes, args, t)
                _PROBES[key] = None
            except Exception as e:  # noqa: BLE001 - any failure means: do not use Pallas
                text = str(e).strip()
                _PROBES[key] = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
        error = _PROBES[key]
        if error is not None and not _WARNED:
            _WARNED = True
            warnings.warn(
                f"the Pallas sampling-core kernels ({entry}) failed to compile for this "
                f"{t.platform} device ({error[:300]}); impl='auto' falls back to the XLA "
                f"implementation. Pass impl='pallas' (or set {IMPL_ENV}=pallas) to see the error, "
                f"or {IMPL_ENV}=xla to choose XLA without this check.",
                PallasFallbackWarning, stacklevel=4,
            )
    return error is None


def _choose(impl: str, entry: str, shapes: Shapes, args: Sequence[Any]) -> Tuple[str, compilation.Target]:
    """The implementation this call runs (``"xla"``, ``"dense"`` or ``"pallas"``), recorded in
    the target's decisions, and the target."""
    t = compilation.current()
    choice, explicit = _resolve(impl, t.platform)
    if choice == "pallas" and not explicit and not t.ahead_of_time and not pallas_compiles(entry, shapes, args, t):
        choice = "xla"
    name = {"pallas": _pallas_name(t), "xla": "xla_" + ("gpu" if t.platform == "gpu" else "cpu")}.get(choice, choice)
    compilation.record("msda", name)
    return choice, t


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
      impl: ``"auto"``, ``"xla"``, ``"dense"`` or ``"pallas"`` (see the module notes).
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
    choice, t = _choose(impl, "ms_deform_attn", shapes, (value, sampling_locations, attention_weights))
    if choice == "pallas":
        return _pallas_entry("ms_deform_attn", t)(value, shapes, sampling_locations, attention_weights,
                                                  mesh=mesh, batch_axis=batch_axis)
    formulation = "gpu" if t.platform == "gpu" else "cpu"
    if choice == "dense":
        fn = lambda *a: ms_deform_attn_dense(a[0], shapes, *a[1:])  # noqa: E731
    else:
        fn = lambda *a: ms_deform_attn_xla(a[0], shapes, *a[1:], formulation=formulation)  # noqa: E731
    core = _batch_split(fn, mesh, batch_axis)
    return core(value, sampling_locations, attention_weights)


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
    choice, t = _choose(impl, "ms_deform_attn_fused", shapes, (value, reference_points, offsets, logits))
    if choice == "pallas":
        return _pallas_entry("ms_deform_attn_fused", t)(value, shapes, reference_points, offsets, logits,
                                                        mesh=mesh, batch_axis=batch_axis)
    formulation = "gpu" if t.platform == "gpu" else "cpu"

    def core(value, reference_points, offsets, logits):
        if choice == "dense":
            return ms_deform_attn_dense_fused(value, shapes, reference_points, offsets, logits)
        loc, attn = sampling_inputs(shapes, reference_points, offsets, logits)
        return ms_deform_attn_xla(value, shapes, loc, attn, formulation=formulation)

    return _batch_split(core, mesh, batch_axis)(value, reference_points, offsets, logits)
