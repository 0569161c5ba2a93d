"""jax-adapter checkpoint directories: orbax arrays plus a JSON record beside them.

Layout of ``DST/``::

    jax_adapter.json   {"format_version", "kind": "adapter" | "dinov2", "config", "provenance"}
    arrays/            orbax StandardCheckpointer tree: {dotted module path: array}

Writing goes to a temporary sibling that is renamed into place only when complete, so an
interrupted or failed conversion leaves nothing at ``DST`` (and an existing ``DST`` untouched).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import numpy as np

RECORD = "jax_adapter.json"
ARRAYS = "arrays"
FORMAT_VERSION = 1
KINDS = ("adapter", "dinov2")


def module_arrays(model) -> Dict[str, np.ndarray]:
    """``{dotted path: array}`` of a model's parameters and batch statistics."""
    from flax import nnx

    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def check_destination(dst: str, overwrite: bool) -> None:
    """Refuse an existing ``dst`` unless ``overwrite``, and a missing parent directory."""
    if os.path.lexists(dst) and not overwrite:
        raise ValueError(f"{dst}: destination exists (pass --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise ValueError(f"{dst}: parent directory {parent} does not exist")


_check_destination = check_destination  # the earlier private name


@contextlib.contextmanager
def atomic_path(dst: str, *, overwrite: bool, directory: bool) -> Iterator[str]:
    """Yield a temporary path beside ``dst``; on success it replaces ``dst``, on error it is
    removed and ``dst`` is left as it was."""
    check_destination(dst, overwrite)
    parent = os.path.dirname(os.path.abspath(dst))
    tmp = tempfile.mkdtemp(prefix=".jax_adapter-", dir=parent)
    target = tmp if directory else os.path.join(tmp, os.path.basename(dst))
    try:
        yield target
        if not os.path.lexists(dst):
            os.replace(target, dst)
        else:
            # os.replace cannot replace a non-empty directory: move the old one aside first,
            # and back if the final rename fails.
            old = tempfile.mkdtemp(prefix=".jax_adapter-old-", dir=parent)
            aside = os.path.join(old, "previous")
            os.replace(dst, aside)
            try:
                os.replace(target, dst)
            except BaseException:
                os.replace(aside, dst)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save(
    dst: str, arrays, kind: str, config: Dict[str, Any],
    provenance: Optional[Dict[str, Any]] = None, *, overwrite: bool = False,
    dtype: Optional[str] = None,
) -> None:
    """Write ``{dotted path: array}`` (or a model's parameters) to ``dst`` atomically.

    ``dtype`` casts floating arrays (``"float32"`` / ``"bfloat16"``) before writing.
    """
    import orbax.checkpoint as ocp

    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}")
    if not isinstance(arrays, Mapping):
        arrays = module_arrays(arrays)
    if dtype is not None:
        from convert.keys import cast_floats

        arrays = {k: cast_floats(v, dtype) for k, v in arrays.items()}
    record = {"format_version": FORMAT_VERSION, "kind": kind, "config": config,
              "provenance": provenance or {}}
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    # Numpy arrays written in place: orbax's default handler deep-copies every host array
    # first (a second copy of a 4.5 GB ViT-g), and zstd compression buffers a third while
    # saving a few percent on float weights. Readers need no options (StandardCheckpointer).
    import jax

    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),  # (unused; silences a warning)
    )
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
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
        raise ValueError(f"{path}: not a jax-adapter checkpoint directory (no {RECORD})")
    with open(record_path) as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{record_path}: corrupt record ({e})") from e
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION \
            or record.get("kind") not in KINDS:
        raise ValueError(f"{record_path}: unsupported record (version {record.get('format_version')}, "
                         f"kind {record.get('kind')})")
    return record


def _arrays_dir(path: str) -> str:
    d = os.path.abspath(os.path.join(path, ARRAYS))
    if not os.path.isdir(d):
        raise ValueError(f"{path}: checkpoint has no {ARRAYS}/ directory")
    return d


def read_arrays(path: str) -> Dict[str, np.ndarray]:
    """``{dotted path: numpy array}`` as stored."""
    import orbax.checkpoint as ocp

    arrays_dir = _arrays_dir(path)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(arrays_dir)
    except Exception as e:  # orbax/tensorstore raise many types for damaged directories
        raise ValueError(f"{path}: cannot read the stored arrays ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from e
    return {k: np.asarray(v) for k, v in tree.items()}


def array_shapes(path: str) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    """``{dotted path: (shape, dtype)}`` from the stored metadata, without reading arrays."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(_arrays_dir(path))
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    return {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in tree.items()}


def write_file(dst: str, writer: Callable[[str], None], *, overwrite: bool) -> None:
    """Run ``writer(tmp_path)`` and move the result to ``dst`` only if it succeeded."""
    with atomic_path(dst, overwrite=overwrite, directory=False) as tmp:
        writer(tmp)
