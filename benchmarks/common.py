"""What the benchmarks share: the machine record (CPU model and flags, load average, versions),
interleaved timing, relative errors and the JSON results file.

Run the benchmarks as modules from the repository root (``python -m benchmarks.cpu.train_step``),
so that they import this module, the PyTorch peer and the project without path edits.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# On 2 cores a load above this means another process competes: ratios then lie (PyTorch's
# threads suffer more than XLA's).
QUIET_LOAD = 1.2


def _cpuinfo(path: str = "/proc/cpuinfo") -> Dict[str, str]:
    """The first processor's ``key: value`` block of ``/proc/cpuinfo`` (empty where the file is
    missing: not Linux)."""
    fields: Dict[str, str] = {}
    try:
        with open(path) as f:
            for ln in f:
                if not ln.strip():
                    break  # the first processor's block is enough
                key, _, val = ln.partition(":")
                fields[key.strip()] = val.strip()
    except OSError:
        return {}
    return fields


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


# (vendor, family, model) -> core generation, for CPUs whose model name a hypervisor hides
# ("AMD EPYC"); from the vendors' published family/model numbers.
_CORES = {
    ("AuthenticAMD", 23, 49): "Zen 2 (Rome)",
    ("AuthenticAMD", 25, 1): "Zen 3 (Milan)",
    ("AuthenticAMD", 25, 17): "Zen 4 (Genoa)",
    ("AuthenticAMD", 25, 160): "Zen 4c (Bergamo)",
    ("AuthenticAMD", 26, 2): "Zen 5 (Turin)",
    ("GenuineIntel", 6, 85): "Skylake-SP / Cascade Lake",
    ("GenuineIntel", 6, 106): "Ice Lake-SP",
    ("GenuineIntel", 6, 143): "Sapphire Rapids",
    ("GenuineIntel", 6, 207): "Emerald Rapids",
    ("GenuineIntel", 6, 173): "Granite Rapids",
}


def cpu_id(path: str = "/proc/cpuinfo") -> Dict[str, Any]:
    """Vendor, family, model and stepping from ``/proc/cpuinfo``, and the core generation where
    known: the model name alone does not tell a Zen 3 EPYC from a Zen 4 one under a hypervisor.
    Empty where the file is missing."""
    info = _cpuinfo(path)
    fields: Dict[str, Any] = {"vendor": info["vendor_id"]} if "vendor_id" in info else {}
    for key in ("cpu family", "model", "stepping"):
        if info.get(key, "").isdigit():
            fields[key.replace("cpu ", "")] = int(info[key])
    core = _CORES.get((fields.get("vendor"), fields.get("family"), fields.get("model")))
    if core:
        fields["core"] = core
    return fields


def cpu_flags() -> List[str]:
    """The vector and matrix extensions the CPU reports (AVX2, AVX-512 families, AMX, VNNI)."""
    flags = _cpuinfo().get("flags", "").split()
    keep = ("avx2", "fma", "avx512", "amx", "vnni", "bf16")
    return sorted(f for f in flags if f.startswith(keep) or any(k in f for k in ("amx", "vnni")))


def load_average() -> float:
    """The 1-minute load average (``nan`` where the platform has none)."""
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return float("nan")


def check_quiet(what: str = "this comparison") -> float:
    """The load average now; warns when it is above :data:`QUIET_LOAD` (the ratio is then no
    result)."""
    load = load_average()
    if load > QUIET_LOAD:
        warnings.warn(f"load average {load:.2f} > {QUIET_LOAD}: other processes compete for the cores; "
                      f"{what} is not a result", RuntimeWarning, stacklevel=2)
    return load


def machine_info(**extra: Any) -> Dict[str, Any]:
    """The machine and library versions, for a results record (``extra``: more entries)."""
    import jax
    import jaxlib

    info: Dict[str, Any] = {
        "cpu_model": cpu_model(), "cpu_id": cpu_id(), "cpu_flags": cpu_flags(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "jax_backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "numpy": np.__version__, "load_average": round(load_average(), 2),
    }
    try:
        import flax

        info["flax"] = flax.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    info.update(extra)
    return info


def rel_err(actual, expected, floor: float = 0.0) -> float:
    """Largest absolute error relative to the largest magnitude of ``expected`` (at least
    ``floor``)."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    return float(np.abs(a - e).max() / max(np.abs(e).max(), floor, 1e-30))


def summary(seconds: Sequence[float]) -> Dict[str, float]:
    """Median, quartiles and minimum of a list of timings (seconds)."""
    q1, med, q3 = np.percentile(seconds, [25, 50, 75])
    return {"median_s": float(med), "q1_s": float(q1), "q3_s": float(q3), "min_s": float(min(seconds)),
            "n": len(seconds)}


def race(fns: Dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> Dict[str, Dict[str, Any]]:
    """Each function's timing summary, the functions interleaved call by call (so that load from
    other processes hits all alike), with the median page faults a call took and the load
    average over the run."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    faults: Dict[str, List[int]] = {k: [] for k in fns}
    loads = [load_average()]
    for _ in range(reps):
        for k, f in fns.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
            faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        loads.append(load_average())
    return {k: {**summary(ts), "page_faults_median": int(np.median(faults[k])),
                "load_average_max": round(max(loads), 2)} for k, ts in times.items()}


def ratio(results: Dict[str, Dict[str, Any]], ours: str, peer: str) -> float:
    return results[ours]["median_s"] / results[peer]["median_s"]


def restart_with(env: Dict[str, str], drop: Sequence[str] = ()) -> None:
    """Re-execute this program with ``env`` added to its environment and ``drop`` removed from it
    (settings that must be in place before the process starts, such as the allocator's). Does
    not return."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    environ = {k: v for k, v in os.environ.items() if k not in drop}
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**environ, **env})


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_record(record: Any, path: Optional[str], default_name: str) -> str:
    """Write ``record`` as JSON to ``path`` (default ``results/<default_name>``); returns the path."""
    path = path or os.path.join(RESULTS, default_name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    return path


def append_record(record: Dict[str, Any], path: Optional[str], default_name: str) -> str:
    """Append ``record`` to the JSON list in ``path`` (default ``results/<default_name>``)."""
    path = path or os.path.join(RESULTS, default_name)
    records = []
    if os.path.exists(path):
        with open(path) as f:
            records = json.load(f)
    return write_record(records + [record], path, default_name)


def measured(fn: Callable[[], Optional[Dict[str, Any]]]) -> Dict[str, Any]:
    """``fn()``'s result with its wall time and this process's peak RSS (a child process runs
    one such step, so that the peak is the step's own)."""
    t0 = time.perf_counter()
    extra = fn() or {}
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"seconds": round(seconds, 2), "peak_rss_gb": round(peak / 1e9, 2), **extra}


def cli(*argv: str) -> None:
    """``jax-adapter argv`` in this process; a failure ends the step."""
    from jax_adapter.cli import main

    if main(list(argv)) != 0:
        raise SystemExit(f"failed: jax-adapter {' '.join(argv)}")


def child_step(module: str, *argv: str) -> Dict[str, Any]:
    """``python -m module *argv`` from the repository root, whose last stdout line is a JSON
    record; the record with the load average before and after."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    before = load_average()
    out = subprocess.run([sys.executable, "-m", module, *argv], check=True, stdout=subprocess.PIPE,
                         text=True, cwd=root).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["load_1min"] = [round(before, 2), round(load_average(), 2)]
    return result
