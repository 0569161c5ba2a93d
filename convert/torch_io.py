"""Reading PyTorch checkpoint files (torch is an optional dependency, imported lazily)."""

from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np

# Keys that hold the model inside training checkpoints (detectors, mmengine, DINOv2 trainers).
_NESTED = ("state_dict", "model", "teacher", "module")


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ValueError("reading .pth checkpoints needs torch: pip install 'jax-adapter[torch]'") from e
    return torch


def read_pth(path: str) -> Dict[str, object]:
    """``torch.load(path, weights_only=True)`` (never a plain unpickle), as a dict."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    torch = _import_torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({first})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def find_state_dict(obj: Dict[str, object], source: str = "checkpoint") -> Dict[str, object]:
    """The tensor dict itself, or the one nested under ``state_dict`` / ``model`` / ..."""
    for _ in range(4):
        if any(_is_tensor(v) for v in obj.values()):
            return obj
        for key in _NESTED:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            break
    if not any(_is_tensor(v) for v in obj.values()):
        raise ValueError(f"{source}: no tensors found (looked under {', '.join(_NESTED)})")
    return obj


def _is_tensor(v) -> bool:
    return hasattr(v, "detach") and hasattr(v, "shape")


def to_numpy(state_dict: Dict[str, object], prefix: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Tensors as float32/int numpy arrays, optionally keeping only ``prefix`` and stripping it."""
    out = {}
    for key, v in state_dict.items():
        if not _is_tensor(v):
            continue
        if prefix:
            if not key.startswith(prefix):
                continue
            key = key[len(prefix):]
        t = v.detach().cpu()
        if t.is_floating_point() and t.dtype != _import_torch().float32:
            t = t.float()
        out[key] = t.numpy()
    return out
