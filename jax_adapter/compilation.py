"""The compilation target: the platform (and chip) the program being traced will run on.

Every dispatch decision reads :func:`current` while the program is traced: the sampling core's
implementation and XLA formulation, the trunk attention core, the CPU formulations of the
depthwise conv and max-pool, Pallas interpret mode and the Pallas compile probe. Unless a target
is set, it is what JAX runs on (``jax.default_backend()`` and its first device, read at trace
time). ``with jax_adapter.target("tpu"):`` traces for another platform, e.g. to compile ahead of
time for devices this process does not have (``jax-adapter plan``)::

    with jax_adapter.target(devices=tpu_devices) as t:  # compile-only devices of a topology
        compiled = jax.jit(forward).lower(state, images).compile()
    t.decisions   # {"msda": {"pallas_tpu": 10}, "attention": {"xla": 12}, ...}

A traced program depends on the target it was traced for: jit a new function (or clear JAX's
caches) to trace the same one for another target.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
from typing import Any, Dict, Iterator, Optional, Sequence

import jax

from jax_adapter.errors import ConfigError

PLATFORMS = ("cpu", "gpu", "tpu")
# JAX's backend and device platform names -> ours.
_PLATFORM_NAMES = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


@dataclasses.dataclass
class Target:
    """What a program is traced for.

    ``platform``: ``"cpu"``, ``"gpu"`` or ``"tpu"``; ``device_kind``: the chip
    (``"NVIDIA H100 80GB HBM3"``, ``"TPU v5 lite"``); ``compute_capability``: a GPU's
    (``"9.0"``); ``ahead_of_time``: the devices are not this process's, so nothing may run on
    them while tracing (the Pallas compile probe is skipped); ``device``: one of its devices, where
known (the probe compiles for it). ``decisions`` counts what each
    dispatch site chose while this target was current: ``{site: {choice: count}}``.
    """

    platform: str
    device_kind: Optional[str] = None
    compute_capability: Optional[str] = None
    ahead_of_time: bool = False
    device: Any = dataclasses.field(default=None, repr=False)
    decisions: Dict[str, Dict[str, int]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        name = _PLATFORM_NAMES.get(str(self.platform).lower())
        if name is None:
            raise ConfigError(f"target platform must be one of {PLATFORMS}, got {self.platform!r}")
        self.platform = name

    def record(self, site: str, choice: str) -> None:
        counts = self.decisions.setdefault(site, collections.Counter())
        counts[choice] += 1


_CURRENT: contextvars.ContextVar[Optional[Target]] = contextvars.ContextVar("jax_adapter_target", default=None)


def of_device(device: Any, *, ahead_of_time: bool = False) -> Target:
    """The target of a (possibly compile-only) JAX device."""
    cc = getattr(device, "compute_capability", None)
    return Target(device.platform, device_kind=getattr(device, "device_kind", None),
                  compute_capability=str(cc) if cc else None, ahead_of_time=ahead_of_time, device=device)


def default() -> Target:
    """What JAX runs on now: the default backend and its first device."""
    return of_device(jax.devices()[0])


def current() -> Target:
    """The target set by the innermost :func:`target` block, else :func:`default`."""
    t = _CURRENT.get()
    return default() if t is None else t


def record(site: str, choice: str) -> str:
    """Note that dispatch site ``site`` chose ``choice`` for the current target; returns it."""
    t = _CURRENT.get()
    if t is not None:
        t.record(site, choice)
    return choice


@contextlib.contextmanager
def target(platform: Optional[str] = None, *, devices: Optional[Sequence[Any]] = None,
           device_kind: Optional[str] = None, compute_capability: Optional[str] = None,
           ahead_of_time: Optional[bool] = None) -> Iterator[Target]:
    """Trace for ``platform`` (or for the platform of ``devices``, e.g. compile-only devices of a
    topology) inside the block; yields the :class:`Target`, whose ``decisions`` fill as the
    program is traced. ``ahead_of_time`` defaults to whether the devices (or, for a bare
    platform, that platform) are not this process's."""
    if devices is not None:
        t = of_device(devices[0])
        local = set(jax.devices())
        aot = not all(d in local for d in devices)
    elif platform is not None:
        t = Target(platform, device_kind=device_kind, compute_capability=compute_capability)
        aot = t.platform != default().platform
    else:
        raise ConfigError("target() needs a platform or devices")
    if device_kind is not None:
        t.device_kind = device_kind
    if compute_capability is not None:
        t.compute_capability = str(compute_capability)
    t.ahead_of_time = aot if ahead_of_time is None else ahead_of_time
    token = _CURRENT.set(t)
    try:
        yield t
    finally:
        _CURRENT.reset(token)
