"""Lazy tensor handles: shape and dtype known up front, data read one tensor at a time.

Readers (:mod:`.torch_io`, :mod:`.safetensors_io`) return handles so that a
checkpoint can be checked against the model from its metadata alone, and converted tensor by
tensor without holding a second full copy of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence, Tuple, runtime_checkable

import ml_dtypes
import numpy as np

# Element types by the names safetensors uses (torch names map onto the same numpy dtypes).
DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


@runtime_checkable
class Tensor(Protocol):
    """A tensor whose data is read on demand."""

    shape: Tuple[int, ...]
    dtype: np.dtype

    def load(self) -> np.ndarray:
        """The data as a numpy array (may share memory with the source: copy before mutating)."""


@dataclasses.dataclass(frozen=True)
class ArrayTensor:
    """An in-memory numpy array behind the :class:`Tensor` interface."""

    array: np.ndarray

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def load(self) -> np.ndarray:
        return self.array


@dataclasses.dataclass(frozen=True)
class Concat:
    """Tensors concatenated along ``axis`` when loaded (Hugging Face q/k/v -> fused ``qkv``)."""

    parts: Tuple[Tensor, ...]
    axis: int = 0

    @property
    def shape(self) -> Tuple[int, ...]:
        first = list(self.parts[0].shape)
        first[self.axis] = sum(p.shape[self.axis] for p in self.parts)
        return tuple(first)

    @property
    def dtype(self) -> np.dtype:
        return np.result_type(*[p.dtype for p in self.parts])

    def load(self) -> np.ndarray:
        return np.concatenate([p.load() for p in self.parts], axis=self.axis)


def as_tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else ArrayTensor(np.asarray(x))


def concat(parts: Sequence[Any], axis: int = 0):
    """Row-concatenation of ``parts``: eager for numpy arrays, lazy for handles."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts, axis=axis)
    return Concat(tuple(as_tensor(p) for p in parts), axis)


def shape_of(x: Any) -> Tuple[int, ...]:
    return tuple(x.shape)


def nbytes(x: Any) -> int:
    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def load(x: Any) -> np.ndarray:
    return x.load() if isinstance(x, Tensor) else np.asarray(x)
