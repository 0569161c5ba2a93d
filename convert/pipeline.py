"""The three operations behind the command line.

- :func:`convert_file`: a PyTorch/Hugging Face checkpoint -> a checkpoint directory;
- :func:`export_checkpoint`: a checkpoint directory -> ``.pth`` / ``.safetensors`` in the
  seed DinoAdapter's (or, for the trunk, the DINOv2 hub's) names;
- :func:`inspect_path`: what a checkpoint of either side holds.

Everything that can fail is checked from metadata (key names, shapes, configs) before any
tensor data is read, and nothing is written unless the whole operation succeeded.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Optional, TextIO

import numpy as np

from jax_adapter import checkpoint
from .infer import ADAPTER_FIELDS, TRUNK_FIELDS, given_fields, infer, resolve, variant_name
from .keys import cast_floats, check_fit, check_stored, convert_tensors, slots, torch_arrays
from .progress import Progress
from .reader import open_source
from .sources import is_trunk_key, source_names, to_canonical, to_dinov2_hub
from .tensors import nbytes, shape_of

EXPORT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_BATCH_STATS = (".mean", ".var", ".num_batches_tracked", "running_mean", "running_var")


def sha256(path: str, bar: Optional[Progress] = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return h.hexdigest()


def _file_records(paths, stream: Optional[TextIO]) -> list:
    total = sum(os.path.getsize(p) for p in paths)
    with Progress(total, "hashing   ", stream=stream) as bar:
        return [{"name": os.path.basename(p), "bytes": os.path.getsize(p), "sha256": sha256(p, bar)}
                for p in paths]


def _dtype_names(dtypes) -> list:
    return sorted({np.dtype(d).name for d in dtypes})


def _unused(source: Dict[str, object], converted: Dict[str, object]) -> list:
    """Source keys whose tensors feed nothing in ``converted`` (``mask_token``, the adapter
    of a --trunk-only conversion), by object identity through concatenations."""
    used = set()
    for t in converted.values():
        used.update(id(p) for p in getattr(t, "parts", (t,)))
    return sorted(k for k, t in source.items() if id(t) not in used)


def convert_file(
    src: str, dst: str, config: Any = None, *, preset: Optional[str] = None,
    prefix: Optional[str] = None, trunk_only: bool = False, overwrite: bool = False,
    dtype: Optional[str] = None, seed: int = 0, progress: Optional[TextIO] = None,
) -> Dict[str, object]:
    """Convert ``src`` into the checkpoint directory ``dst``; returns the provenance record.

    ``src``: a DINOv2 hub or DinoAdapter ``.pth`` (possibly a detector checkpoint with the
    backbone under a prefix), or a Hugging Face DINOv2 model folder or weights file.
    ``config``: a JSON path, dict or config object, or ``preset``: completes or overrides what
    the tensors imply (a contradiction is an error). With ``trunk_only`` the result is a
    :class:`~jax_adapter.DinoV2` checkpoint; otherwise a DinoAdapter, whose adapter is freshly
    initialised (``seed``) when the source holds only a trunk. ``dtype`` (``"float32"`` /
    ``"bfloat16"``) is the stored arrays' dtype (default: the config's ``param_dtype``).
    ``progress``: the stream for progress bars (default stderr, shown only on a terminal).
    """
    from jax_adapter.checkpoint import abstract_model, init_arrays

    checkpoint.check_destination(dst, overwrite)
    kind = "dinov2" if trunk_only else "adapter"
    source = open_source(src, prefix)
    try:
        tensors = to_canonical(source.tensors, source.format)
        if trunk_only:
            tensors = {k: t for k, t in tensors.items() if is_trunk_key(k)}
        dropped = _unused(source.tensors, tensors)
        shapes = {k: shape_of(t) for k, t in tensors.items()}
        inferred = infer(shapes, source.format, source.hf_config)
        given, label = given_fields(config, preset, kind=kind)
        cfg = resolve(inferred, given, label, kind)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None

    expected = slots(abstract_model(kind, cfg))
    fresh_adapter = kind == "adapter" and source.format != "dinoadapter"
    fresh = check_fit(expected, shapes, source=src, names=source_names(source.format),
                      allow_missing=(lambda k: not is_trunk_key(k)) if fresh_adapter else (lambda k: False))
    files = _file_records(source.files, progress)
    stored_dtype = dtype or cfg.param_dtype
    total = sum(nbytes(t) for t in tensors.values())
    with Progress(total, "converting", stream=progress) as bar:
        arrays = convert_tensors(expected, tensors, dtype=stored_dtype, on_tensor=bar.update)
    if fresh:
        new = init_arrays(kind, cfg, [expected[k].path for k in fresh], seed)
        arrays.update({k: cast_floats(np.asarray(v), stored_dtype) for k, v in new.items()})
    provenance = {
        "source": os.path.basename(os.path.normpath(src)),
        "source_files": files,
        "format": source.format,
        "container": ".".join(source.container),
        "prefix": source.prefix,
        "source_keys": len(source.tensors),
        "other_tensors": source.other_tensors,
        "loaded": len(tensors),
        "kept": len(fresh),
        "dropped": len(dropped),
        "dropped_keys": dropped[:20],
        "source_dtypes": _dtype_names(t.dtype for t in tensors.values()),
        "dtype": stored_dtype,
        "source_pos_embed_resize": inferred.source_pos_resize,
    }
    if len(files) == 1:
        provenance["sha256"] = files[0]["sha256"]
    # Unmap the source before writing: its pages read so far count in this process's memory.
    del source, tensors
    written = sum(a.nbytes for a in arrays.values())
    with Progress(written, "writing   ", stream=progress) as bar:
        checkpoint.save(dst, arrays, kind, cfg.to_dict(), provenance, overwrite=overwrite)
        bar.update(written)
    return provenance


def export_checkpoint(
    ckpt: str, out: str, *, dinov2_only: bool = False, overwrite: bool = False,
    dtype: Optional[str] = None, progress: Optional[TextIO] = None,
) -> Dict[str, object]:
    """Write a checkpoint directory's weights as a PyTorch ``state_dict`` file.

    ``out`` ends in ``.pth``/``.pt``/``.bin`` (``torch.save``) or ``.safetensors``. Names are
    the seed DinoAdapter's; a trunk checkpoint, or ``dinov2_only``, gives the DINOv2 hub's
    (with a zero ``mask_token``, which the hub model expects and never uses at inference).
    Arrays keep their stored dtype unless ``dtype``; counters are int64, as in PyTorch.
    """
    from .safetensors_io import write_safetensors
    from .torch_io import write_pth
    from jax_adapter.checkpoint import abstract_model

    if not out.lower().endswith(EXPORT_SUFFIXES):
        raise ValueError(f"{out}: unknown output format (expected {', '.join(EXPORT_SUFFIXES)})")
    checkpoint.check_destination(out, overwrite)
    record = checkpoint.read_record(ckpt)
    kind = record["kind"]
    try:
        expected = slots(abstract_model(kind, record["config"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{ckpt}: invalid config in {checkpoint.RECORD} ({e})") from None
    check_stored(expected, {k: v[0] for k, v in checkpoint.array_shapes(ckpt).items()}, source=ckpt)
    hub_names = kind == "dinov2" or dinov2_only
    if hub_names:
        expected = {k: s for k, s in expected.items() if is_trunk_key(k)}
    arrays = checkpoint.read_arrays(ckpt)
    total = sum(a.nbytes for a in arrays.values())
    sd = {}
    with Progress(total, "exporting ", stream=progress) as bar:
        # Each stored array is dropped once converted: about one copy of the weights at a time.
        for key, a in torch_arrays(expected, arrays, pop=True, dtype=dtype):
            sd[key] = a
            bar.update(a.nbytes)
    del arrays  # what is left: the adapter's arrays of a --dinov2-only export
    if hub_names:
        sd = to_dinov2_hub(sd)
    if out.lower().endswith(".safetensors"):
        write = lambda tmp: write_safetensors(tmp, sd.items(), {"format": "pt"})  # noqa: E731
    else:
        write = lambda tmp: write_pth(tmp, sd.items())  # noqa: E731
    written = sum(a.nbytes for a in sd.values())
    with Progress(written, "writing   ", stream=progress) as bar:
        checkpoint.write_file(out, write, overwrite=overwrite)
        bar.update(written)
    return {"written": out, "kind": kind, "names": "dinov2_hub" if hub_names else "dinoadapter",
            "tensors": len(sd), "dtypes": _dtype_names(a.dtype for a in sd.values())}


def _parameter_count(shapes: Dict[str, tuple]) -> int:
    return int(sum(np.prod(s, dtype=np.int64) for k, s in shapes.items() if not k.endswith(_BATCH_STATS)))


def inspect_path(path: str, prefix: Optional[str] = None) -> Dict[str, object]:
    """Format, variant, parameter count and config of a checkpoint directory or source file."""
    if os.path.isdir(path) and checkpoint.is_checkpoint(path):
        record = checkpoint.read_record(path)
        stored = checkpoint.array_shapes(path)
        cfg = record["config"]
        return {
            "path": path, "format": "jax-adapter", "kind": record["kind"], "variant": variant_name(cfg),
            "parameters": _parameter_count({k: v[0] for k, v in stored.items()}),
            "tensors": len(stored), "dtypes": _dtype_names(v[1] for v in stored.values()),
            "config": cfg, "provenance": record.get("provenance", {}),
        }
    source = open_source(path, prefix)
    try:
        tensors = to_canonical(source.tensors, source.format)
        shapes = {k: shape_of(t) for k, t in tensors.items()}
        inferred = infer(shapes, source.format, source.hf_config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    kind = "adapter" if source.format == "dinoadapter" else "dinov2"
    info: Dict[str, Any] = {
        "path": path, "format": source.format, "kind": kind,
        "container": ".".join(source.container), "prefix": source.prefix,
        "parameters": _parameter_count({k: shape_of(t) for k, t in source.tensors.items()}),
        "tensors": len(source.tensors), "other_tensors": source.other_tensors,
        "dtypes": _dtype_names(t.dtype for t in source.tensors.values()),
    }
    try:
        info["config"] = resolve(inferred, {}, "no config", kind).to_dict()
    except ValueError as e:
        names = ADAPTER_FIELDS if kind == "adapter" else TRUNK_FIELDS
        known = {**inferred.defaults, **inferred.fixed, "pos_embed_resize": inferred.source_pos_resize}
        info["config"] = {k: v for k, v in known.items() if k in names}
        info["unresolved"] = str(e)
    info["variant"] = variant_name(info["config"])
    return info


def format_info(info: Dict[str, object]) -> str:
    """:func:`inspect_path`'s result as aligned ``name: value`` lines."""
    import json

    where = ""
    if info.get("prefix") or info.get("container"):
        where = f" (backbone under {info.get('container') + ':' if info.get('container') else ''}" \
                f"{info.get('prefix') or '<no prefix>'})"
    lines = [
        ("path", info["path"]),
        ("format", f"{info['format']}{where}"),
        ("kind", info["kind"]),
        ("variant", info.get("variant") or "custom"),
        ("parameters", f"{info['parameters']:,} in {info['tensors']} tensors ({', '.join(info['dtypes'])})"),
    ]
    if info.get("other_tensors"):
        lines.append(("other tensors", f"{info['other_tensors']} (not part of the backbone)"))
    if info.get("unresolved"):
        lines.append(("unresolved", info["unresolved"]))
    lines.append(("config", json.dumps(info["config"], sort_keys=True)))
    if info.get("provenance"):
        lines.append(("provenance", json.dumps(info["provenance"], sort_keys=True)))
    return "\n".join(f"{k + ':':<14}{v}" for k, v in lines)
