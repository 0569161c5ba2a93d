"""``.safetensors`` files through the ``safetensors`` package's numpy API (no torch).

Reading is lazy: :func:`read_safetensors` reads the header (the package checks the JSON, the
dtypes, the offsets and that the data covers the file) and returns one handle per tensor; each
handle's :meth:`~SafetensorsTensor.load` reads that tensor alone into a fresh array, so a
checkpoint streams tensor by tensor. bfloat16 comes back as ``ml_dtypes.bfloat16``, bit for
bit. Every failure is a
:class:`~jax_adapter.errors.ConversionError` (a ``ValueError``) that starts with the file's path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
from typing import Dict, Iterator, Mapping, Optional, Tuple

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from jax_adapter.errors import ConversionError

from .tensors import DTYPES

_MAX_HEADER = 100 << 20  # the package's own limit on the JSON header


def is_safetensors(path: str) -> bool:
    """Whether ``path`` starts like a safetensors file (a sane header length, then ``{``).

    Recognising the format by content decides which reader gets the file; a file that starts
    like safetensors but is damaged is then refused by the package, with its reason.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= _MAX_HEADER and head[8:9] == b"{"


def _reason(path: str, e: Exception) -> str:
    """The package's message as a short reason (one line, without its boilerplate)."""
    text = " ".join(str(e).split()).removeprefix("Error while deserializing header: ")
    if "file not fully covered" in text:
        # The header's offsets and the file's size disagree: almost always an interrupted copy.
        return f"truncated: tensor data does not match the file size of {os.path.getsize(path)} bytes"
    return text.split(", expected one of")[0]


@contextlib.contextmanager
def _errors(path: str) -> Iterator[None]:
    """The package's (and the OS's) errors on ``path`` as one :class:`ConversionError`."""
    try:
        yield
    except SafetensorError as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({_reason(path, e)})") from None
    except OSError as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e.strerror or e})") from None


class _File:
    """One open file shared by its tensors' handles, opened on the first load.

    ``pread`` reads each tensor straight into a fresh array: no file mapping whose touched pages
    would count in the process's memory while it lives (and opening the file once per tensor
    costs more than reading it, at ViT-g sizes).
    """

    def __init__(self, path: str):
        self.path = path
        self._handle = None

    def get(self, name: str) -> np.ndarray:
        with _errors(self.path):
            if self._handle is None:
                self._handle = safe_open(self.path, framework="numpy", backend="pread")
            return self._handle.get_tensor(name)


@dataclasses.dataclass(frozen=True)
class SafetensorsTensor:
    """One tensor of a safetensors file; its data is read on :meth:`load`."""

    path: str
    name: str
    shape: Tuple[int, ...]
    dtype: np.dtype
    file: _File = dataclasses.field(repr=False, compare=False)

    def load(self) -> np.ndarray:
        """The tensor, ``shape`` and ``dtype``, in freshly allocated memory (not a file mapping)."""
        a = self.file.get(self.name)
        if a.shape != self.shape or a.dtype != self.dtype:
            raise ConversionError(f"{self.path}: tensor {self.name!r} changed since the file was opened")
        return a


def read_safetensors(path: str) -> Dict[str, SafetensorsTensor]:
    """``{name: handle}`` of a safetensors file, in file order; reads the header only."""
    out, file = {}, _File(path)
    with _errors(path), safe_open(path, framework="numpy", backend="pread") as f:
        for name in f.offset_keys():
            view = f.get_slice(name)
            code = view.get_dtype()
            if code not in DTYPES:
                raise ConversionError(f"{path}: tensor {name!r} has dtype {code}, which cannot be "
                                      f"converted (supported: {', '.join(DTYPES)})")
            shape = tuple(int(s) for s in view.get_shape())
            out[name] = SafetensorsTensor(path, name, shape, DTYPES[code], file)
    return out


def write_safetensors(
    path: str, arrays: Mapping[str, np.ndarray], metadata: Optional[Dict[str, str]] = None,
) -> None:
    """Write ``{name: array}`` to ``path`` (the package streams the arrays, no second copy).

    A failure part-way leaves a partial file: write to a temporary path and move it into place
    on success (:func:`jax_adapter.checkpoint.write_file` does).
    """
    # The package writes each array's buffer as it lies in memory: a strided view (a transposed
    # weight) would be written in the wrong element order, silently. Contiguous arrays pass as is.
    contiguous = {k: np.asarray(a, order="C") for k, a in arrays.items()}
    for k, a in contiguous.items():
        if a.dtype.newbyteorder("<") not in DTYPES.values():  # the package swaps big-endian bytes
            raise ConversionError(f"{k}: dtype {a.dtype} cannot be stored in a .safetensors file here")
    safetensors.numpy.save_file(contiguous, path, metadata=dict(metadata or {}))
