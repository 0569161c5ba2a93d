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
from tqdm import tqdm

from jax_adapter import checkpoint
from jax_adapter.errors import ConversionError, JaxAdapterError
from jax_adapter.models.build import abstract_model, init_arrays
from jax_adapter.progress import progress_bar

from . import formats, resolve
from .keys import cast_floats, check_fit, check_stored, convert_tensors, slots, torch_arrays
from .reader import open_source
from .tensors import nbytes, shape_of

EXPORT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_BATCH_STATS = (".mean", ".var", ".num_batches_tracked", "running_mean", "running_var")


def sha256(path: str, bar: Optional[tqdm] = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return h.hexdigest()


def _file_records(paths, stream: Optional[TextIO]) -> list:
    total = sum(os.path.getsize(p) for p in paths)
    with progress_bar(total, "hashing", stream=stream) as bar:
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
    origin: Optional[str] = None,
) -> Dict[str, object]:
    """Convert ``src`` into the checkpoint directory ``dst``; returns the provenance record.

    ``origin``: where ``src`` came from (a pretrained name, URL or ``hf-hub:`` name), recorded
    in the provenance.

    ``src``: a DINOv2 hub or DinoAdapter ``.pth`` (possibly a detector checkpoint with the
    backbone under a prefix), a Hugging Face DINOv2 model folder or weights file; or a DINOv3
    Meta hub ``.pth`` (a ``-<sha256[:8]>.pth`` name is checked against the file), a Meta
    ``DINOv3_Adapter`` ``state_dict`` or segmentor checkpoint, or a Hugging Face
    ``DINOv3ViTModel`` (see :mod:`.formats`; the family decides the kinds below).
    ``config``: a JSON path, dict or config object, or ``preset``: completes or overrides what
    the tensors imply (a contradiction is an error). With ``trunk_only`` the result is a
    :class:`~jax_adapter.DinoV2` (DINOv3: ``DinoV3``) checkpoint; otherwise a DinoAdapter
    (DINOv3: ``DinoV3Adapter``), whose adapter is freshly
    initialised (``seed``) when the source holds only a trunk. ``dtype`` (``"float32"`` /
    ``"bfloat16"``) is the stored arrays' dtype (default: the config's ``param_dtype``).
    ``progress``: the stream for progress bars (default stderr, shown only on a terminal).
    """
    checkpoint.check_destination(dst, overwrite)
    source = open_source(src, prefix)
    fmt = formats.get(source.format)
    family = fmt.family
    kind = family.trunk_kind if trunk_only else family.adapter_kind
    # Messages name missing keys as the source does (a trunk source read into an adapter: the
    # trunk's part without the adapter's prefix).
    outer = family.trunk_prefix if (not fmt.holds_adapter and not trunk_only) else ""
    names = lambda k: fmt.source_names(k[len(outer):]) if k.startswith(outer) else [k]  # noqa: E731
    try:
        tensors = fmt.to_canonical(source.tensors)
        if fmt.holds_adapter and trunk_only:
            tensors = family.trunk_of(tensors)
        elif not fmt.holds_adapter and not trunk_only:
            tensors = family.in_adapter(tensors)
        shapes = {k: shape_of(t) for k, t in tensors.items()}
        source_shapes = {k: shape_of(t) for k, t in source.tensors.items()}
        configured = resolve.configure(family, shapes, source_shapes, source.format, source.hf_config,
                                       config, preset, kind)
        cfg = configured.config
        expected = slots(abstract_model(kind, cfg))
        # Tensors the model may lack (an unused mask token) are dropped, not refused.
        tensors = {k: t for k, t in tensors.items() if k in expected or not family.optional(k)}
        shapes = {k: shapes[k] for k in tensors}
        dropped = _unused(source.tensors, tensors)
        family.check(source.tensors, tensors, cfg, kind)
    except JaxAdapterError as e:
        raise ConversionError(f"{src}: {e}") from None

    fresh_adapter = kind == family.adapter_kind and not fmt.holds_adapter
    fresh = check_fit(expected, shapes, source=src, names=names,
                      allow_missing=(lambda k: not family.is_trunk_key(k)) if fresh_adapter else (lambda k: False))
    files = _file_records(source.files, progress)
    try:
        family.check_files(files)  # before anything is written
    except JaxAdapterError as e:
        raise ConversionError(f"{src}: {e}") from None
    stored_dtype = dtype or cfg.param_dtype
    total = sum(nbytes(t) for t in tensors.values())
    with progress_bar(total, "converting", stream=progress) as bar:
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
        **configured.provenance,
    }
    if origin is not None:
        provenance["origin"] = origin
    if len(files) == 1:
        provenance["sha256"] = files[0]["sha256"]
    # Unmap the source before writing: its pages read so far count in this process's memory.
    del source, tensors
    written = sum(a.nbytes for a in arrays.values())
    with progress_bar(written, "writing", stream=progress) as bar:
        checkpoint.save(dst, arrays, kind, cfg.to_dict(), provenance, overwrite=overwrite)
        bar.update(written)
    return provenance


def export_checkpoint(
    ckpt: str, out: str, *, trunk_only: bool = False, dinov2_only: bool = False,
    overwrite: bool = False, dtype: Optional[str] = None, progress: Optional[TextIO] = None,
) -> Dict[str, object]:
    """Write a checkpoint directory's weights as a PyTorch ``state_dict`` file.

    ``out`` ends in ``.pth``/``.pt``/``.bin`` (``torch.save``) or ``.safetensors``. Names are
    the seed DinoAdapter's; a trunk checkpoint, or ``dinov2_only``, gives the DINOv2 hub's
    (with a zero ``mask_token``, which the hub model expects and never uses at inference).
    Arrays keep their stored dtype unless ``dtype``; counters are int64, as in PyTorch.

    DINOv3 checkpoints are written in Meta's names: the adapter's ``state_dict`` (trunk under
    ``backbone.``), or with ``trunk_only`` (and for a trunk checkpoint) the hub trunk's, with
    the buffers Meta's ``load_state_dict(strict=True)`` expects (``rope_embed.periods``,
    ``qkv.bias_mask``, ``mask_token``). ``dinov2_only`` is ``trunk_only`` for DINOv2 checkpoints.
    """
    from .safetensors_io import write_safetensors
    from .torch_io import write_pth
    if not out.lower().endswith(EXPORT_SUFFIXES):
        raise ConversionError(f"{out}: unknown output format (expected {', '.join(EXPORT_SUFFIXES)})")
    checkpoint.check_destination(out, overwrite)
    record = checkpoint.read_record(ckpt)
    kind = record["kind"]
    family = formats.family_of_kind(kind)
    if dinov2_only and family.name != "dinov2":
        raise ConversionError(f"{ckpt}: --dinov2-only exports a DINOv2 trunk, this is a {kind} "
                              f"checkpoint (use --trunk-only)")
    try:
        model = abstract_model(kind, record["config"])
        expected, cfg = slots(model), model.cfg
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{ckpt}: invalid config in {checkpoint.RECORD} ({e})") from None
    check_stored(expected, {k: v[0] for k, v in checkpoint.array_shapes(ckpt).items()}, source=ckpt)
    hub_names = kind == family.trunk_kind or trunk_only or dinov2_only
    if hub_names and kind == family.adapter_kind:
        p = family.trunk_prefix
        expected = {k[len(p):]: s for k, s in expected.items() if family.is_trunk_key(k)}
    arrays = checkpoint.read_arrays(ckpt)
    total = sum(a.nbytes for a in arrays.values())
    sd = {}
    with progress_bar(total, "exporting", stream=progress) as bar:
        # Each stored array is dropped once converted: about one copy of the weights at a time.
        for key, a in torch_arrays(expected, arrays, pop=True, dtype=dtype):
            sd[key] = a
            bar.update(a.nbytes)
    del arrays  # what is left: the adapter's arrays of a --dinov2-only export
    sd = family.export_trunk(sd, cfg) if hub_names else family.export_adapter(sd, cfg)
    if out.lower().endswith(".safetensors"):
        write = lambda tmp: write_safetensors(tmp, sd, {"format": "pt"})  # noqa: E731
    else:
        write = lambda tmp: write_pth(tmp, sd.items())  # noqa: E731
    written = sum(a.nbytes for a in sd.values())
    with progress_bar(written, "writing", stream=progress) as bar:
        checkpoint.write_file(out, write, overwrite=overwrite)
        bar.update(written)
    return {"written": out, "kind": kind, "names": family.trunk_names if hub_names else family.adapter_names,
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
            "path": path, "format": "jax-adapter", "kind": record["kind"],
            "variant": formats.family_of_kind(record["kind"]).variant(cfg) or "custom",
            "parameters": _parameter_count({k: v[0] for k, v in stored.items()}),
            "tensors": len(stored), "dtypes": _dtype_names(v[1] for v in stored.values()),
            "config": cfg, "provenance": record.get("provenance", {}),
            "source_pos_embed_resize": record.get("provenance", {}).get("source_pos_embed_resize"),
        }
    source = open_source(path, prefix)
    fmt = formats.get(source.format)
    kind = fmt.family.adapter_kind if fmt.holds_adapter else fmt.family.trunk_kind
    try:
        tensors = fmt.to_canonical(source.tensors)
        shapes = {k: shape_of(t) for k, t in tensors.items()}
        source_shapes = {k: shape_of(t) for k, t in source.tensors.items()}
        described = resolve.describe(fmt.family, shapes, source_shapes, source.format, source.hf_config, kind)
    except JaxAdapterError as e:
        raise ConversionError(f"{path}: {e}") from None
    info: Dict[str, Any] = {
        "path": path, "format": source.format, "kind": kind,
        "container": ".".join(source.container), "prefix": source.prefix,
        "parameters": _parameter_count({k: shape_of(t) for k, t in source.tensors.items()}),
        "tensors": len(source.tensors), "other_tensors": source.other_tensors,
        "dtypes": _dtype_names(t.dtype for t in source.tensors.values()),
    }
    info.update(described)
    info["variant"] = info.get("variant") or "custom"
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
    if info.get("source_pos_embed_resize"):
        mode = info["source_pos_embed_resize"]
        note = (" (a --trunk-only conversion keeps it; a DinoAdapter uses bicubic_size)"
                if info["format"] != "jax-adapter" and info["kind"] == "dinov2" else "")
        lines.append(("pos resize", f"{mode} in the source{note}"))
    if info.get("provenance"):
        lines.append(("provenance", json.dumps(info["provenance"], sort_keys=True)))
    return "\n".join(f"{k + ':':<14}{v}" for k, v in lines)
