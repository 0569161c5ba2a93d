"""This library's checkpoint directories: the on-disk format, written atomically.

Layout of ``DST/``::

    jax_adapter.json   {"format_version", "kind", "config", "provenance"}
    arrays/            orbax StandardCheckpointer tree: {dotted module path: array}

``kind`` names the model class (a kind of :mod:`jax_adapter.registry`). Writing goes to a
temporary sibling that is renamed into place only when complete, so an interrupted or failed
write leaves nothing at ``DST`` (and an existing ``DST`` untouched). Building models from these
directories, and saving models into them, is :mod:`jax_adapter.pretrained`'s.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import ml_dtypes
import numpy as np

from jax_adapter import registry
from jax_adapter.errors import CheckpointError
from jax_adapter.files import atomic_path, check_destination, write_file  # noqa: F401 - re-exported

RECORD = "jax_adapter.json"
ARRAYS = "arrays"
FORMAT_VERSION = 1


def save(
    dst: str, arrays: Mapping[str, Any], kind: str, config: Dict[str, Any],
    provenance: Optional[Dict[str, Any]] = None, *, overwrite: bool = False,
    dtype: Optional[str] = None,
) -> None:
    """Write ``{dotted path: array}`` to ``dst`` atomically.

    ``dtype`` casts floating arrays (``"float32"`` / ``"bfloat16"``) before writing.
    """
    import orbax.checkpoint as ocp

    kind = registry.canonical(kind)
    if kind not in {k.name for k in registry.kinds()}:
        raise CheckpointError(f"unknown checkpoint kind {kind!r}")
    if dtype is not None:
        arrays = {k: cast_floats(v, dtype) for k, v in arrays.items()}
    record = {"format_version": FORMAT_VERSION, "kind": kind, "config": config,
              "provenance": provenance or {}}
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    # Numpy arrays written in place: orbax's default handler deep-copies every host array
    # first (a second copy of a 4.5 GB ViT-g), and zstd compression buffers a third while
    # saving a few percent on float weights. Readers need no options (StandardCheckpointer).
    import jax

    handlers = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),  # (unused; silences a warning)
    )
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=handlers)
    with atomic_path(dst, overwrite=overwrite, directory=True) as tmp:
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(os.path.join(tmp, ARRAYS), args=ocp.args.PyTreeSave(arrays))
        with open(os.path.join(tmp, RECORD), "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RECORD))


def read_record(path: str) -> Dict[str, Any]:
    record_path = os.path.join(path, RECORD)
    if not os.path.isfile(record_path):
        raise CheckpointError(f"{path}: not a jax-adapter checkpoint directory (no {RECORD})")
    with open(record_path) as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{record_path}: corrupt record ({e})") from e
    known = {k.name for k in registry.kinds()}
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION \
            or registry.canonical(str(record.get("kind"))) not in known:
        raise CheckpointError(f"{record_path}: unsupported record (version {record.get('format_version')}, "
                              f"kind {record.get('kind')})")
    # Earlier kind names (the DINOv2 adapter's "adapter") read as today's.
    return {**record, "kind": registry.canonical(record["kind"])}


def _arrays_dir(path: str) -> str:
    d = os.path.abspath(os.path.join(path, ARRAYS))
    if not os.path.isdir(d):
        raise CheckpointError(f"{path}: checkpoint has no {ARRAYS}/ directory")
    return d


def read_arrays(path: str) -> Dict[str, np.ndarray]:
    """``{dotted path: numpy array}`` as stored."""
    import orbax.checkpoint as ocp

    arrays_dir = _arrays_dir(path)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(arrays_dir)
    except Exception as e:  # orbax/tensorstore raise many types for damaged directories
        raise CheckpointError(f"{path}: cannot read the stored arrays ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from e
    return {k: np.asarray(v) for k, v in tree.items()}


def array_shapes(path: str) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    """``{dotted path: (shape, dtype)}`` from the stored metadata, without reading arrays."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(_arrays_dir(path))
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    return {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in tree.items()}


def is_float(dt: np.dtype) -> bool:
    return np.issubdtype(dt, np.floating) or dt == np.dtype(ml_dtypes.bfloat16)


def dtype_by_name(name: str) -> np.dtype:
    """``"float32"`` / ``"bfloat16"`` / ... as a numpy dtype (bfloat16 from ml_dtypes)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def cast_floats(a: np.ndarray, dtype: Optional[str]) -> np.ndarray:
    """``a`` in ``dtype`` if it is floating (integers such as counters are left alone)."""
    if dtype is None or not is_float(a.dtype) or a.dtype == dtype_by_name(dtype):
        return a
    return a.astype(dtype_by_name(dtype))
