"""Reading and writing ``.safetensors`` files with numpy alone (no torch, bfloat16 included).

The format: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
raw little-endian tensor bytes, offsets counted from the end of the header. The ``safetensors``
package's numpy API cannot represent bfloat16, hence this small reader.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from .tensors import DTYPE_NAMES, DTYPES

_MAX_HEADER = 100 << 20  # the reference implementation's limit


def is_safetensors(path: str) -> bool:
    """Whether ``path`` starts like a safetensors file (a sane header length, then ``{``)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= _MAX_HEADER and head[8:9] == b"{"


@dataclasses.dataclass(frozen=True)
class SafetensorsTensor:
    """One tensor of a safetensors file, read on :meth:`load`."""

    path: str
    dtype: np.dtype
    shape: Tuple[int, ...]
    offset: int  # absolute byte offset in the file

    def load(self) -> np.ndarray:
        count = int(np.prod(self.shape, dtype=np.int64))
        # Hosts are little-endian (x86, ARM), as is the format.
        a = np.fromfile(self.path, dtype=self.dtype, count=count, offset=self.offset)
        if a.size != count:
            raise ValueError(f"{self.path}: truncated tensor data")
        return a.reshape(self.shape)


def read_safetensors(path: str) -> Dict[str, SafetensorsTensor]:
    """``{name: handle}`` of a safetensors file; the header is fully validated first."""
    size = os.path.getsize(path)

    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: not a readable safetensors file ({why})")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise bad(f"header length {n} does not fit a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"corrupt header: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + n
    out = {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"unsupported or malformed entry for {name!r}: {info!r}") from None
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or begin > end:
            raise bad(f"entry {name!r} has {end - begin} bytes for shape {shape} {dtype}")
        if start + end > size:
            raise bad(f"truncated: tensor {name!r} ends at byte {start + end}, file has {size}")
        out[name] = SafetensorsTensor(path, dtype, shape, start + begin)
    return out


def write_safetensors(
    path: str, arrays: Iterable[Tuple[str, np.ndarray]], metadata: Optional[Dict[str, str]] = None,
    shapes: Optional[Dict[str, Tuple[Tuple[int, ...], np.dtype]]] = None,
) -> None:
    """Write ``(name, array)`` pairs to ``path`` one at a time.

    ``shapes`` (``{name: (shape, dtype)}``, in writing order) lets the header be written before
    the arrays are produced, so that ``arrays`` may be a generator that converts lazily;
    without it ``arrays`` is materialised first.
    """
    if shapes is None:
        arrays = list(arrays)
        shapes = {k: (a.shape, a.dtype) for k, a in arrays}
    header: Dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, (shape, dtype) in shapes.items():
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        written = []
        for name, a in arrays:
            shape, dtype = shapes[name]
            if tuple(a.shape) != tuple(shape) or a.dtype != np.dtype(dtype):
                raise ValueError(f"{name}: array {a.shape} {a.dtype} does not match its header entry")
            # Raw bytes through a uint8 view: bfloat16 arrays have no buffer-protocol format.
            f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
            written.append(name)
    if written != list(shapes):
        raise ValueError(f"{path}: arrays do not match the header ({len(written)} of {len(shapes)} written)")
