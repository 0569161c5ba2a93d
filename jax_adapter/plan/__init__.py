"""Plans: what a model's forward or train step needs on a GPU or TPU this machine does not have.

:func:`plan` compiles the programs for compile-only devices of a named target (XLA's own GPU and
TPU compilers run on the CPU: no hardware, no weights) and reports what the compiler decided:
per-device memory (arguments, outputs, temporaries, peak) against the device's, compile time,
code size, the implementation every dispatch site chose, the kernels in the program (Pallas
Triton or Mosaic, cuDNN attention, cuBLAS...) and XLA's FLOP count. ``jax-adapter plan`` prints
it.

The figures are the compiler's plan, not a measurement: kernels are untuned (no autotuning
without the device), cuDNN's workspace and the runtime's own buffers are not counted, and
nothing here says how fast a step runs. XLA's cost analysis counts a loop's body once.

Needs the ``plan-gpu`` extra (JAX's CUDA plugin, the CUDA compiler, cuDNN) for GPU targets and
``plan-tpu`` (libtpu) for TPU targets. GPU targets compile only in a process whose JAX runs on
the CPU (``JAX_PLATFORMS=cpu`` set before JAX starts; the command line does it).
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from jax_adapter.errors import ConfigError
from jax_adapter.plan.census import census
from jax_adapter.plan.programs import PROGRAMS
from jax_adapter.plan.targets import GPU_DEFAULT_POOL, TARGETS, TargetSpec, devices, spec

__all__ = ["GPU_DEFAULT_POOL", "PROGRAMS", "TARGETS", "TargetSpec", "census", "devices", "plan", "spec"]

_PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "nvidia-cuda-nvcc-cu12", "nvidia-cudnn-cu12", "libtpu")


def _adapter_config(model: Any) -> Tuple[str, Any]:
    from jax_adapter import registry

    if isinstance(model, str):
        name = registry.in_role(model, "adapter")
        return name, registry.config_of(name)
    kind = registry.kind_of_config(model)
    if kind is None or kind.role != "adapter":
        raise ConfigError(f"plan needs an adapter config or name, got a {type(model).__name__}")
    return type(model).__name__, model


def _versions() -> Dict[str, str]:
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def _fits(peak: int, t: TargetSpec) -> Dict[str, Any]:
    fits = {"device": peak <= t.memory, "headroom": t.memory - peak}
    if t.platform == "gpu":
        fits["default_pool"] = peak <= int(GPU_DEFAULT_POOL * t.memory)
    return fits


def plan(model: Union[str, Any], target: str, *, programs: Sequence[str] = ("train",), batch: int = 1,
         image_size: Tuple[int, int] = (256, 704), bf16: bool = False, remat: bool = False,
         freeze_trunk: bool = False, topology: Optional[str] = None) -> Dict[str, Any]:
    """Compile ``programs`` (``"forward"``, ``"train"``) of ``model`` for ``target`` and report.

    Args:
      model: a registered adapter (or a trunk, meaning its adapter) or an adapter config.
      target: a name of :data:`TARGETS` (``"h100"``, ``"a100"``, ``"l4"``, ``"v5e"``, ...).
      batch: the global batch, split over the devices of ``topology`` as ``jax-adapter train``
        splits it.
      image_size: ``(H, W)`` of the images.
      bf16, remat, freeze_trunk: ``jax-adapter train``'s switches (bfloat16 compute, activation
        checkpointing, a frozen DINOv2 trunk).
      topology: TPUs: the chips' shape (``"2x2"``; default one chip); GPUs: the number of GPUs.

    Returns:
      A JSON-able dict: ``target`` (name, device, memory in bytes, devices), the settings, the
      package versions, and under ``programs`` one record per program: ``memory`` (bytes per
      device: ``arguments``, ``outputs``, ``aliased``, ``temporaries``, ``peak``,
      ``generated_code``), ``fits`` (``device``, ``headroom``; GPUs also ``default_pool``: within
      the 75% JAX takes by default), ``lower_s``, ``compile_s``, ``cost``, ``dispatch`` (site ->
      {choice: calls}), ``kernels`` (:func:`census`), ``warnings``. A program libtpu refuses
      for want of memory has ``error`` and only ``memory.peak`` (libtpu's figure).
    """
    from jax_adapter.plan.programs import compile_program
    from jax_adapter.training import recipe_config

    t = spec(target)
    unknown = [p for p in programs if p not in PROGRAMS]
    if unknown or not programs:
        raise ConfigError(f"programs must be some of {PROGRAMS}, got {list(programs)}")
    h, w = (int(v) for v in image_size)
    if batch < 1 or h < 1 or w < 1:
        raise ConfigError(f"batch and image size must be positive, got batch {batch}, size {h}x{w}")
    name, cfg = _adapter_config(model)
    cfg = recipe_config(cfg, remat=remat, bf16=bf16)
    devs = devices(t, topology)
    if batch % len(devs):
        raise ConfigError(f"batch {batch} does not split over the {len(devs)} devices of {target} {topology}")
    report: Dict[str, Any] = {
        "target": {"name": t.name, "platform": t.platform, "device": t.device.name, "note": t.note,
                   "memory": t.memory, "devices": len(devs), "topology": topology},
        "model": name, "batch": batch, "per_device_batch": batch // len(devs), "image_size": [h, w],
        "bf16": bf16, "remat": remat, "freeze_trunk": freeze_trunk, "versions": _versions(),
        "programs": {},
    }
    for program in programs:
        record = compile_program(program, cfg, devs, batch=batch, image_size=(h, w),
                                 freeze_trunk=freeze_trunk)
        record["fits"] = _fits(record["memory"]["peak"], t)
        report["programs"][program] = record
    return report
