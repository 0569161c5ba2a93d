"""Opening a source checkpoint: one file or a Hugging Face model folder -> the backbone's tensors.

A file is recognised by its content (safetensors header, ``torch.save`` zip or legacy pickle),
not its name. Training checkpoints nest the model (``{"state_dict": {...}, "optimizer": ...}``)
and put it under a prefix (``img_backbone.``, a segmentor's ``segmentation_model.0.``); the
backbone is found by the registered formats' anchor keys (:func:`.formats.anchors`), so the
prefix is detected when exactly one backbone is present.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from . import safetensors_io, torch_io
from . import formats
from jax_adapter.errors import ConversionError, JaxAdapterError

# Weight files of a Hugging Face model folder, in order of preference.
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")

Entry = Tuple[Tuple[str, ...], str, object]  # (nested-dict path, key, tensor)


@dataclasses.dataclass
class Source:
    """The backbone tensors of a source checkpoint, keys stripped of their prefix."""

    path: str
    files: List[str]
    format: str
    container: Tuple[str, ...]  # nested-dict path of the state dict inside the file
    prefix: str
    tensors: Dict[str, object]  # key -> Tensor handle (data not read yet)
    hf_config: Optional[dict]
    other_tensors: int  # tensors outside the backbone (detector heads, optimizer state)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return d


def read_tensor_file(path: str) -> List[Entry]:
    """All tensors of one file, as lazy handles with their nested-dict paths."""
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file")
    if safetensors_io.is_safetensors(path):
        return [((), k, t) for k, t in safetensors_io.read_safetensors(path).items()]
    if torch_io.is_torch_file(path):
        return [(c, k, torch_io.TorchTensor(t)) for c, k, t in torch_io.flatten(torch_io.read_pth(path))]
    raise ConversionError(f"{path}: unknown file format (not a PyTorch .pth/.bin or a .safetensors file)")


def _hf_folder_files(folder: str) -> List[str]:
    for name in HF_WEIGHTS:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".index.json"):
            weight_map = _read_json(path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{path}: no weight_map")
            return [os.path.join(folder, f) for f in sorted(set(weight_map.values()))]
        return [path]
    raise ConversionError(f"{folder}: no weights found (expected one of {', '.join(HF_WEIGHTS)})")


def _hf_config(folder: str) -> Optional[dict]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    cfg = _read_json(path)
    # A config.json beside a weights file counts only if it describes a model we convert.
    return cfg if cfg.get("model_type") in formats.hf_model_types() else None


def _candidates(entries: Sequence[Entry]) -> List[Tuple[Tuple[str, ...], str]]:
    """``(container, prefix)`` of every backbone (by the formats' anchor keys), preferring
    those whose anchor's companion key exists; a candidate inside another one (the DINOv3
    adapter's ``backbone.``) is part of it, not a second backbone."""
    keys = {(c, k) for c, k, _ in entries}
    found, complete = set(), set()
    anchors = formats.anchors()
    for c, k in keys:
        for marker, companion in anchors:
            if k == marker or k.endswith("." + marker):
                prefix = k[: len(k) - len(marker)]
                found.add((c, prefix))
                if (c, prefix + companion) in keys:
                    complete.add((c, prefix))
    cands = complete or found
    return sorted((c, p) for c, p in cands
                  if not any(c2 == c and p != p2 and p.startswith(p2) for c2, p2 in cands))


def _display(container: Tuple[str, ...], prefix: str) -> str:
    return "".join(c + "." for c in container) + prefix


def _relative(container: Tuple[str, ...], prefix: str) -> str:
    """``prefix`` without the nesting: ``state_dict.img_backbone.`` in ``("state_dict",)`` ->
    ``img_backbone.``."""
    outer = _display(container, "")
    return prefix[len(outer):] if outer and prefix.startswith(outer) else prefix


def select_backbone(entries: Sequence[Entry], prefix: Optional[str]) -> Tuple[Tuple[str, ...], str]:
    """The ``(container, prefix)`` of the backbone: the only one found, or the one ``prefix``
    names (either its own prefix, ``img_backbone.``, or with the nesting, ``state_dict.img_backbone.``)."""
    cands = _candidates(entries)
    if prefix is not None:
        if prefix and not prefix.endswith("."):
            prefix += "."
        chosen = [(c, p) for c, p in cands if p == prefix or _display(c, p) == prefix]
        if not chosen:
            # No position embedding under it: take the keys anyway (missing keys get reported).
            chosen = sorted({(c, _relative(c, prefix)) for c, k, _ in entries
                             if k.startswith(_relative(c, prefix))})
        if not chosen:
            raise ConversionError(f"no keys start with prefix {prefix!r}")
        if len(chosen) > 1:
            raise ConversionError(f"prefix {prefix!r} matches several backbones "
                             f"{[_display(c, p) for c, p in chosen]}; give the full prefix")
        return chosen[0]
    if len(cands) == 1:
        return cands[0]
    if not cands:
        names = sorted(_display(c, k) for c, k, _ in entries)
        sample = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ConversionError(
            "unknown checkpoint format: no DINOv2 or DINOv3 backbone found (no pos_embed, "
            f"cls_token or embeddings.* key among {len(names)} tensors: {sample})"
        )
    raise ConversionError(f"several backbones found under prefixes {[_display(c, p) for c, p in cands]}; "
                     f"choose one with --prefix")


def open_source(path: str, prefix: Optional[str] = None) -> Source:
    """Read the metadata of a source checkpoint (no tensor data) and find its backbone.

    ``path``: a ``.pth``/``.bin``/``.safetensors`` file or a Hugging Face model folder.
    Errors are ``ValueError`` messages that start with ``path``.
    """
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "jax_adapter.json")):
            raise ConversionError(f"{path}: already a jax-adapter checkpoint directory "
                             f"(jax-adapter export writes it as PyTorch weights)")
        files = _hf_folder_files(path)
        hf_config = _hf_config(path)
    elif os.path.isfile(path):
        files = [path]
        hf_config = _hf_config(os.path.dirname(os.path.abspath(path)))
    else:
        raise ConversionError(f"{path}: no such file or directory")
    entries: List[Entry] = []
    for f in files:
        entries += read_tensor_file(f)
    try:
        container, prefix = select_backbone(entries, prefix)
        tensors = {k[len(prefix):]: t for c, k, t in entries if c == container and k.startswith(prefix)}
        fmt = formats.detect_format(tensors)
    except JaxAdapterError as e:
        raise ConversionError(f"{path}: {e}") from None
    # The folder's config is authoritative (a registers model may have 0 registers); one that
    # does not describe these weights is ignored.
    fmt, hf_config = formats.hf_format(hf_config, fmt)
    return Source(path=path, files=files, format=fmt, container=container, prefix=prefix,
                  tensors=tensors, hf_config=hf_config, other_tensors=len(entries) - len(tensors))
