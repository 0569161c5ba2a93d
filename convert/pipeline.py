"""``convert``: a PyTorch checkpoint file -> a jax-adapter checkpoint directory."""

from __future__ import annotations

import hashlib
import os
from typing import Dict, Optional, Tuple

import numpy as np

from convert import checkpoint
from convert.keys import load_state_dict
from convert.sources import from_dinov2_hub
from convert.torch_io import find_state_dict, read_pth, to_numpy

# Keys of the DINOv2 trunk inside a DinoAdapter (the rest is the adapter).
_TRUNK_PREFIXES = ("cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed.", "blocks.", "norm.")


def is_trunk_key(key: str) -> bool:
    return key.startswith(_TRUNK_PREFIXES)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def detect_prefix(keys, prefix: Optional[str]) -> str:
    """The prefix under which the backbone sits (``img_backbone.``, ...), '' if none."""
    if prefix is not None:
        if prefix and not prefix.endswith("."):
            prefix += "."
        if not any(k.startswith(prefix) for k in keys):
            raise ValueError(f"no keys start with prefix {prefix!r}")
        return prefix
    found = sorted({k[: -len("pos_embed")] for k in keys if k.endswith("pos_embed")})
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError("no backbone found: no 'pos_embed' key (is this a DINOv2 or DinoAdapter checkpoint?)")
    raise ValueError(f"several backbones found under prefixes {found}; choose one with --prefix")


def detect_format(sd: Dict[str, np.ndarray]) -> str:
    if any(k.startswith(("spm.", "interactions.")) for k in sd):
        return "dinoadapter"
    if "pos_embed" in sd and any(k.startswith("blocks.") for k in sd):
        return "dinov2_hub"
    raise ValueError("unknown checkpoint format: neither DinoAdapter nor DINOv2 hub keys")


def read_source(src: str, prefix: Optional[str] = None) -> Tuple[Dict[str, np.ndarray], str, str]:
    """``(state_dict in seed names, format, prefix)`` of a PyTorch checkpoint file."""
    raw = find_state_dict(read_pth(src), source=src)
    try:
        prefix = detect_prefix(list(raw), prefix)
        sd = to_numpy(raw, prefix=prefix)
        fmt = detect_format(sd)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from e
    if fmt == "dinov2_hub":
        sd = from_dinov2_hub(sd)
    return sd, fmt, prefix


def convert_file(
    src: str, dst: str, config, *, prefix: Optional[str] = None, overwrite: bool = False,
    dtype: Optional[str] = None,
) -> Dict[str, object]:
    """Convert ``src`` (.pth) into a DinoAdapter checkpoint directory ``dst``.

    ``config`` is an :class:`AdapterConfig`. A DINOv2-only source fills the trunk and leaves the
    adapter freshly initialised. Returns the provenance record written beside the arrays.
    """
    from jax_adapter.adapter import DinoAdapter
    from flax import nnx

    checkpoint._check_destination(dst, overwrite)
    sd, fmt, prefix = read_source(src, prefix)
    model = DinoAdapter(config, rngs=nnx.Rngs(0))
    allow = (lambda k: not is_trunk_key(k)) if fmt == "dinov2_hub" else (lambda k: False)
    counts = load_state_dict(model, sd, allow_missing=allow, source=src)
    provenance = {
        "source": os.path.basename(src), "sha256": sha256(src), "format": fmt, "prefix": prefix,
        "source_keys": len(sd), **counts,
    }
    checkpoint.save(dst, model, "adapter", config.to_dict(), provenance, overwrite=overwrite, dtype=dtype)
    return provenance
