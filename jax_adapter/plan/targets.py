"""The devices ``jax-adapter plan`` compiles for without having them: named GPUs and TPUs, their
memory, and compile-only JAX devices of a topology of them.

GPUs are described to XLA by a ``GpuTargetConfigProto``, written here from each card's published
properties (:class:`Gpu`); TPUs by libtpu's own topology names. The memory a plan is compared
with is the device's whole memory as its driver reports it (GPUs: the usable size ``nvidia-smi``
shows; TPUs: what libtpu reports when a program exceeds it). A JAX process on a GPU takes 75% of
it up front by default (``XLA_PYTHON_CLIENT_MEM_FRACTION``): a plan reports both.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

from jax_adapter.errors import ConfigError, DependencyError

# JAX's default share of a GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION).
GPU_DEFAULT_POOL = 0.75


@dataclasses.dataclass(frozen=True)
class Gpu:
    """A CUDA GPU's properties (per SM limits and the whole card)."""

    name: str
    capability: Tuple[int, int]
    sms: int
    clock_ghz: float
    bandwidth: int  # bytes/s
    l2: int  # bytes
    memory: int  # bytes the driver reports as usable
    smem_per_sm: int
    smem_per_block: int  # the opt-in maximum
    threads_per_sm: int
    fp32_per_sm: int
    accelerated: bool = False  # sm_90a / sm_100a features

    def target_config(self) -> str:
        """The ``GpuTargetConfigProto`` (text) XLA compiles for."""
        major, minor = self.capability
        ext = "\n    feature_extension: ACCELERATED_FEATURES" if self.accelerated else ""
        return f'''gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.smem_per_sm}
  threads_per_core_limit: {self.threads_per_sm}
  core_count: {self.sms}
  fpus_per_core: {self.fp32_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {self.bandwidth}
  l2_cache_size: {self.l2}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory}
  shared_memory_per_block_optin: {self.smem_per_block}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}{ext}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation"
  name: "{self.name}"
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 8
  patch: 0
}}
device_description_str: "{self.name}"
'''


@dataclasses.dataclass(frozen=True)
class Tpu:
    """A TPU generation: libtpu's topology prefix, one chip's shape, its HBM per device."""

    name: str
    topology: str  # e.g. "v5e" (topologies "v5e:1x1", "v5e:2x2", ...)
    chip: str  # one chip's topology suffix: "1x1" or "1x1x1"
    memory: int  # bytes per device, as libtpu reports them
    accelerator: str  # one host's accelerator type, what a TPU VM tells libtpu
    chip_config: str = "default"  # "megacore" for the two-core chips


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    name: str
    platform: str
    device: Any  # Gpu or Tpu
    note: str

    @property
    def memory(self) -> int:
        return self.device.memory


GIB = 1 << 30
# Published properties (NVIDIA's data sheets and CUDA's per-capability limits). Usable memory is
# what the driver reports, a little under the marketing size.
_GPUS = {
    "h100": (Gpu("NVIDIA H100 80GB HBM3", (9, 0), 132, 1.98, 3352320000000, 52428800, 84942979072,
                 233472, 232448, 2048, 128, accelerated=True), "H100 SXM, 80 GB"),
    "h100-pcie": (Gpu("NVIDIA H100 PCIe", (9, 0), 114, 1.755, 2039040000000, 52428800, 84942979072,
                      233472, 232448, 2048, 128, accelerated=True), "H100 PCIe, 80 GB"),
    "h200": (Gpu("NVIDIA H200", (9, 0), 132, 1.98, 4800000000000, 52428800, 151397597184,
                 233472, 232448, 2048, 128, accelerated=True), "H200 SXM, 141 GB"),
    "b200": (Gpu("NVIDIA B200", (10, 0), 148, 1.965, 7672320000000, 132644864, 191514411008,
                 233472, 232448, 2048, 128, accelerated=True), "B200, 180 GB"),
    "a100": (Gpu("NVIDIA A100-SXM4-80GB", (8, 0), 108, 1.41, 2039040000000, 41943040, 85100068864,
                 167936, 166912, 2048, 64), "A100 SXM, 80 GB"),
    "a100-40": (Gpu("NVIDIA A100-SXM4-40GB", (8, 0), 108, 1.41, 1555200000000, 41943040, 42331013120,
                    167936, 166912, 2048, 64), "A100 SXM, 40 GB"),
    "a6000": (Gpu("NVIDIA RTX A6000", (8, 6), 84, 1.8, 768096000000, 6291456, 51041271808,
                  102400, 101376, 1536, 128), "RTX A6000, 48 GB"),
    "l4": (Gpu("NVIDIA L4", (8, 9), 58, 2.04, 300000000000, 50331648, 24152899584,
               102400, 101376, 1536, 128), "L4, 24 GB"),
    "rtx4090": (Gpu("NVIDIA GeForce RTX 4090", (8, 9), 128, 2.52, 1008000000000, 75497472, 25757220864,
                    102400, 101376, 1536, 128), "consumer 24 GB card (RTX 4090)"),
}
# HBM per device as libtpu 0.0.42 reports it (its out-of-memory message: 15.75G for a v5e, ...).
_TPUS = {
    "v5e": (Tpu("TPU v5 lite", "v5e", "1x1", int(15.75 * GIB), "v5litepod-1"), "TPU v5e, 16 GB a chip"),
    "v6e": (Tpu("TPU v6 lite", "v6e", "1x1", int(31.25 * GIB), "v6e-1"), "TPU v6e (Trillium), 32 GB a chip"),
    "v5p": (Tpu("TPU v5", "v5", "1x1x1", int(95.74 * GIB), "v5p-8", "megacore"), "TPU v5p, 95 GB a chip"),
    "v4": (Tpu("TPU v4", "v4", "1x1x1", int(30.75 * GIB), "v4-8", "megacore"), "TPU v4, 32 GB a chip"),
}
TARGETS: Dict[str, TargetSpec] = {
    **{k: TargetSpec(k, "gpu", d, note) for k, (d, note) in _GPUS.items()},
    **{k: TargetSpec(k, "tpu", d, note) for k, (d, note) in _TPUS.items()},
}


def spec(name: str) -> TargetSpec:
    if name not in TARGETS:
        raise ConfigError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name]


def topology_name(t: TargetSpec, topology: Optional[str]) -> str:
    """The topology string the platform's compiler takes: TPUs ``"v5e:2x2"`` (``topology`` the
    chips' shape, default one chip), GPUs ``"1x1xN"`` (``topology`` the GPU count ``N``)."""
    if t.platform == "tpu":
        return f"{t.device.topology}:{topology or t.device.chip}"
    n = topology or "1"
    if "x" in n:
        return n
    if not n.isdigit() or int(n) < 1:
        raise ConfigError(f"a GPU topology is a device count, got {topology!r}")
    return f"1x1x{int(n)}"


def devices(t: TargetSpec, topology: Optional[str] = None) -> List[Any]:
    """Compile-only devices of ``topology`` of target ``t`` (no such hardware needed)."""
    from jax.experimental import topologies

    name = topology_name(t, topology)
    if t.platform == "tpu":
        try:
            import libtpu  # noqa: F401 - only to say what is missing
        except ImportError:
            raise DependencyError("planning for TPUs needs libtpu: pip install 'jax-adapter[plan-tpu]'") from None
        # libtpu asks the host what it is as it loads (a cloud metadata server, these variables) and
        # prints errors when nothing answers: tell it, as a TPU VM would.
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", t.device.accelerator)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu
        dims = [int(d) for d in name.partition(":")[2].split("x")]
        per_host = ([min(d, 2) for d in dims] + [1, 1, 1])[:3]
        per_host[2] = 1
        try:
            topo = topologies.get_topology_desc(
                platform="tpu", topology_name=name, chip_config_name=t.device.chip_config,
                chips_per_host_bounds=tuple(per_host), num_slices=1, wrap=(False, False, False))
        except Exception as e:  # libtpu's errors are plain RuntimeErrors with status codes
            raise ConfigError(f"TPU topology {name!r}: {' '.join(str(e).split())[:300]}") from None
        return list(topo.devices)
    try:
        import jax_plugins.xla_cuda12  # noqa: F401 - only to say what is missing
    except ImportError:
        raise DependencyError("planning for GPUs needs JAX's CUDA plugin and compiler: "
                              "pip install 'jax-adapter[plan-gpu]'") from None
    if importlib.util.find_spec("nvidia.cuda_nvcc") is None and shutil.which("ptxas") is None:
        raise DependencyError("planning for GPUs needs CUDA's compiler (ptxas): pip install 'jax-adapter[plan-gpu]'")
    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=t.device.target_config(),
                                            topology=name)
    except NotImplementedError:
        raise DependencyError("the CUDA plugin did not load: without a GPU, run with JAX_PLATFORMS=cpu "
                              "set before JAX starts (jax-adapter plan does)") from None
    return list(topo.devices)
