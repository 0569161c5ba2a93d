"""jax-adapter checkpoint directories: orbax arrays plus a JSON record beside them.

Layout of ``DST/``::

    jax_adapter.json   {"format_version", "kind": "adapter" | "dinov2", "config", "provenance"}
    arrays/            orbax StandardCheckpointer tree: {dotted module path: array}

Writing goes to a temporary sibling directory that is renamed into place only when complete, so
an interrupted or failed conversion leaves nothing at ``DST``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Dict, Optional

import numpy as np
from flax import nnx

RECORD = "jax_adapter.json"
ARRAYS = "arrays"
FORMAT_VERSION = 1


def module_arrays(model: nnx.Module) -> Dict[str, np.ndarray]:
    """``{dotted path: array}`` of the model's parameters and batch statistics."""
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def assign_arrays(model: nnx.Module, arrays: Dict[str, np.ndarray], source: str) -> None:
    """Inverse of :func:`module_arrays`; a key or shape mismatch is a ``ValueError``."""
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
    missing = sorted(set(flat) - set(arrays))
    unknown = sorted(set(arrays) - set(flat))
    shapes = sorted(k for k in set(flat) & set(arrays) if tuple(flat[k].shape) != tuple(arrays[k].shape))
    if missing or unknown or shapes:
        raise ValueError(
            f"{source}: arrays do not fit the model (missing {missing[:5]}, unexpected "
            f"{unknown[:5]}, mis-shaped {shapes[:5]})"
        )
    for k, var in flat.items():
        var[...] = np.asarray(arrays[k]).astype(var[...].dtype)


def _check_destination(dst: str, overwrite: bool) -> None:
    if os.path.exists(dst) and not overwrite:
        raise ValueError(f"{dst}: destination exists (pass --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise ValueError(f"{dst}: parent directory {parent} does not exist")


def save(
    dst: str, model: nnx.Module, kind: str, config: Dict[str, Any],
    provenance: Optional[Dict[str, Any]] = None, *, overwrite: bool = False,
    dtype: Optional[str] = None,
) -> None:
    """Write ``model`` to the checkpoint directory ``dst`` atomically."""
    import orbax.checkpoint as ocp

    _check_destination(dst, overwrite)
    arrays = module_arrays(model)
    if dtype is not None:
        arrays = {k: (v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v) for k, v in arrays.items()}
    parent = os.path.dirname(os.path.abspath(dst))
    tmp = tempfile.mkdtemp(prefix=".jax_adapter-", dir=parent)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, ARRAYS), arrays)
            ckptr.wait_until_finished()
        record = {"format_version": FORMAT_VERSION, "kind": kind, "config": config,
                  "provenance": provenance or {}}
        with open(os.path.join(tmp, RECORD), "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_record(path: str) -> Dict[str, Any]:
    record_path = os.path.join(path, RECORD)
    if not os.path.isfile(record_path):
        raise ValueError(f"{path}: not a jax-adapter checkpoint directory (no {RECORD})")
    with open(record_path) as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{record_path}: corrupt record ({e})") from e
    if record.get("format_version") != FORMAT_VERSION or record.get("kind") not in ("adapter", "dinov2"):
        raise ValueError(f"{record_path}: unsupported record (version {record.get('format_version')}, kind {record.get('kind')})")
    return record


def read_arrays(path: str) -> Dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(os.path.abspath(os.path.join(path, ARRAYS)))
    return {k: np.asarray(v) for k, v in tree.items()}
