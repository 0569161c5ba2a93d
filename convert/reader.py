"""Opening a source checkpoint: one file or a Hugging Face model folder -> the backbone's tensors.

A file is recognised by its content (safetensors header, ``torch.save`` zip or legacy pickle),
not its name. Training checkpoints nest the model (``{"state_dict": {...}, "optimizer": ...}``)
and put it under a prefix (``img_backbone.``); the backbone is found by its position-embedding
key, so the prefix is detected when exactly one backbone is present.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from . import safetensors_io, torch_io
from .sources import detect_format

# (position embedding, patch embedding) key pairs that mark a backbone, by naming scheme.
_ANCHORS = (
    ("pos_embed", "patch_embed.proj.weight"),  # DINOv2 hub and DinoAdapter
    ("embeddings.position_embeddings", "embeddings.patch_embeddings.projection.weight"),  # HF
)
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
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


def read_tensor_file(path: str) -> List[Entry]:
    """All tensors of one file, as lazy handles with their nested-dict paths."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file")
    if safetensors_io.is_safetensors(path):
        return [((), k, t) for k, t in safetensors_io.read_safetensors(path).items()]
    if torch_io.is_torch_file(path):
        return [(c, k, torch_io.TorchTensor(t)) for c, k, t in torch_io.flatten(torch_io.read_pth(path))]
    raise ValueError(f"{path}: unknown file format (not a PyTorch .pth/.bin or a .safetensors file)")


def _hf_folder_files(folder: str) -> List[str]:
    for name in HF_WEIGHTS:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".index.json"):
            weight_map = _read_json(path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{path}: no weight_map")
            return [os.path.join(folder, f) for f in sorted(set(weight_map.values()))]
        return [path]
    raise ValueError(f"{folder}: no weights found (expected one of {', '.join(HF_WEIGHTS)})")


def _hf_config(folder: str) -> Optional[dict]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    cfg = _read_json(path)
    # A config.json beside a weights file counts only if it describes a DINOv2 model.
    return cfg if str(cfg.get("model_type", "")).startswith("dinov2") else None


def _candidates(entries: Sequence[Entry]) -> List[Tuple[Tuple[str, ...], str]]:
    """``(container, prefix)`` of every backbone, preferring those with a patch embedding."""
    keys = {(c, k) for c, k, _ in entries}
    found, complete = set(), set()
    for c, k in keys:
        for pos, patch in _ANCHORS:
            if k == pos or k.endswith("." + pos):
                prefix = k[: len(k) - len(pos)]
                found.add((c, prefix))
                if (c, prefix + patch) in keys:
                    complete.add((c, prefix))
    return sorted(complete or found)


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
            raise ValueError(f"no keys start with prefix {prefix!r}")
        if len(chosen) > 1:
            raise ValueError(f"prefix {prefix!r} matches several backbones "
                             f"{[_display(c, p) for c, p in chosen]}; give the full prefix")
        return chosen[0]
    if len(cands) == 1:
        return cands[0]
    if not cands:
        names = sorted(_display(c, k) for c, k, _ in entries)
        sample = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ValueError(
            "unknown checkpoint format: no DINOv2 backbone found (no pos_embed or "
            f"embeddings.position_embeddings key among {len(names)} tensors: {sample})"
        )
    raise ValueError(f"several backbones found under prefixes {[_display(c, p) for c, p in cands]}; "
                     f"choose one with --prefix")


def open_source(path: str, prefix: Optional[str] = None) -> Source:
    """Read the metadata of a source checkpoint (no tensor data) and find its backbone.

    ``path``: a ``.pth``/``.bin``/``.safetensors`` file or a Hugging Face model folder.
    Errors are ``ValueError`` messages that start with ``path``.
    """
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "jax_adapter.json")):
            raise ValueError(f"{path}: already a jax-adapter checkpoint directory "
                             f"(jax-adapter export writes it as PyTorch weights)")
        files = _hf_folder_files(path)
        hf_config = _hf_config(path)
    elif os.path.isfile(path):
        files = [path]
        hf_config = _hf_config(os.path.dirname(os.path.abspath(path)))
    else:
        raise ValueError(f"{path}: no such file or directory")
    entries: List[Entry] = []
    for f in files:
        entries += read_tensor_file(f)
    try:
        container, prefix = select_backbone(entries, prefix)
        tensors = {k[len(prefix):]: t for c, k, t in entries if c == container and k.startswith(prefix)}
        fmt = detect_format(tensors)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if fmt.startswith("hf_") and hf_config is not None:
        # The folder's config is authoritative (a registers model may have 0 registers).
        fmt = "hf_dinov2_with_registers" if hf_config["model_type"] == "dinov2_with_registers" else "hf_dinov2"
    elif not fmt.startswith("hf_"):
        hf_config = None
    return Source(path=path, files=files, format=fmt, container=container, prefix=prefix,
                  tensors=tensors, hf_config=hf_config, other_tensors=len(entries) - len(tensors))
