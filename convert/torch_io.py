"""Reading and writing PyTorch checkpoint files (torch is optional, imported lazily).

Files are read with ``torch.load(weights_only=True)``, never a plain unpickle, and memory-mapped
when they are in the zip format (every ``torch.save`` since 1.6), so that only the tensors
actually converted are paged in (a detector checkpoint's optimizer state never is).
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from .tensors import DTYPES
from jax_adapter.errors import ConversionError

# Keys that hold the model inside training checkpoints (detectors, mmengine, DINOv2 trainers).
_NESTED = ("state_dict", "model", "teacher", "module")
# A legacy (pre-zip) torch.save file starts with a pickled magic number (protocol 2).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ConversionError("reading .pth/.bin checkpoints needs torch: pip install 'jax-adapter[torch]'") from e
    return torch


def is_torch_file(path: str) -> bool:
    """Whether ``path`` starts like a ``torch.save`` file (zip or legacy pickle); a truncated
    zip still does, so that torch reports what is wrong with it."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    return head.startswith(b"PK\x03\x04") or head == _LEGACY_MAGIC


def _load_error(path: str, e: Exception) -> ConversionError:
    text = " ".join(str(e).split())
    if "weights only load failed" in text.lower():
        # Refused by the weights-only unpickler: the file holds Python objects besides tensors.
        m = re.search(r"unsupported GLOBAL:? (?:GLOBAL )?([\w.]+)", text, re.IGNORECASE)
        what = m.group(1) if m else "Python objects"
        return ConversionError(
            f"{path}: refusing to unpickle {what} (only tensors and plain containers are "
            f"read, with torch.load(weights_only=True)); re-save the weights alone, e.g. "
            f"torch.save(ckpt['state_dict'], 'weights.pth')"
        )
    first = text.split(". ")[0] if text else type(e).__name__
    return ConversionError(f"{path}: not a readable PyTorch checkpoint ({first})")


def read_pth(path: str) -> Dict[str, object]:
    """``torch.load(path, weights_only=True)`` (never a plain unpickle), as a dict.

    Zip-format files are memory-mapped; nothing is read until a tensor's data is used.
    """
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    torch = _import_torch()
    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise _load_error(path, e) from e
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def _is_tensor(v) -> bool:
    return hasattr(v, "detach") and hasattr(v, "shape")


def torch_dtype_to_numpy(t) -> np.dtype:
    torch = _import_torch()
    special = {torch.bfloat16: DTYPES["BF16"], torch.bool: np.dtype(np.bool_)}
    if t.dtype in special:
        return special[t.dtype]
    return np.dtype(torch.empty((), dtype=t.dtype).numpy().dtype)


class TorchTensor:
    """A torch tensor behind the :class:`convert.tensors.Tensor` interface (bit-exact)."""

    __slots__ = ("tensor", "shape", "dtype")

    def __init__(self, tensor):
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        self.dtype = torch_dtype_to_numpy(tensor)

    def load(self) -> np.ndarray:
        t = self.tensor.detach().cpu()
        if self.dtype == DTYPES["BF16"]:
            # numpy has no bfloat16: reinterpret the bits (exact, no upcast).
            torch = _import_torch()
            return t.contiguous().view(torch.int16).numpy().view(self.dtype)
        return t.numpy()


def flatten(obj: Dict, max_depth: int = 6) -> Iterable[Tuple[Tuple[str, ...], str, object]]:
    """``(container path, key, tensor)`` for every tensor in nested dicts.

    A detector checkpoint ``{"state_dict": {"img_backbone.pos_embed": t}, "optimizer": ...}``
    gives ``(("state_dict",), "img_backbone.pos_embed", t)``; lists (optimizer param groups)
    are not entered.
    """
    stack = [((), obj)]
    while stack:
        path, d = stack.pop()
        for k, v in d.items():
            if _is_tensor(v):
                yield path, str(k), v
            elif isinstance(v, dict) and len(path) < max_depth:
                stack.append((path + (str(k),), v))


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
        raise ConversionError(f"{source}: no tensors found (looked under {', '.join(_NESTED)})")
    return obj


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
        a = TorchTensor(v).load()
        out[key] = a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) or a.dtype == DTYPES["BF16"] else a
    return out


def to_torch(a: np.ndarray):
    """A numpy array as a torch tensor sharing its memory (bfloat16 through a bit view)."""
    torch = _import_torch()
    a = np.asarray(a, order="C")  # (ascontiguousarray would turn 0-d counters into 1-d)
    if a.dtype == DTYPES["BF16"]:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def write_pth(path: str, arrays: Iterable[Tuple[str, np.ndarray]]) -> None:
    """``torch.save`` of an ordered ``{key: tensor}`` dict, loadable with ``weights_only=True``."""
    torch = _import_torch()
    torch.save({k: to_torch(a) for k, a in arrays}, path)
