"""What the validation steps share: paths, the seed and toy shapes, errors, the CUDA tools."""

from __future__ import annotations

import os
import shutil
from typing import Dict, Optional, Tuple

from benchmarks.common import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
FTZ_FLAG = "--xla_backend_extra_options=-nvptx-allow-ftz-atomics"

Levels = Tuple[Tuple[int, int], ...]
# Seed shapes: ViT-S adapter at 256x704 with six cameras (as benchmarks/cpu/msda.py).
SEED: Dict[str, Tuple[int, Levels]] = {
    "injector": (969, ((34, 90), (17, 45), (9, 23))),
    "extractor": (4032, ((19, 51),)),
}
SEED_DIMS = dict(b=6, m=6, dh=64, p=4)
# Dry mode: the same code paths at toy sizes.
TOY: Dict[str, Tuple[int, Levels]] = {"injector": (37, ((6, 8), (3, 4))), "extractor": (48, ((5, 6),))}
TOY_DIMS = dict(b=1, m=2, dh=8, p=2)
PARITY_TOL = 1e-4  # float32, relative to each array's largest magnitude


def _rel(a, b) -> float:
    return rel_err(a, b)


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def _cuda_bin(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", name)):
            return os.path.join(home, "bin", name)
    return None


def _nvcc() -> Optional[str]:
    return _cuda_bin("nvcc")


def _sanitizer() -> Optional[str]:
    return _cuda_bin("compute-sanitizer")


def _on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"
