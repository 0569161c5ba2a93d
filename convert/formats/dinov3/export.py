"""DINOv3 checks that need the resolved config, and the way back to Meta's names.

The two buffers the library does not store are checked here before they are dropped (each
``qkv.bias_mask`` must be Meta's ones/zeros/ones, the stored ``rope_embed.periods`` the config's)
and written back on export, so that Meta's ``load_state_dict(strict=True)`` takes the file and
the round trip is bit for bit.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import numpy as np

from jax_adapter.errors import ConversionError
from jax_adapter.hub import check_hash_prefix

from ...tensors import load
from .keys import BACKBONE, BIAS_MASK, PERIODS


def _trunk_config(cfg):
    return cfg.backbone if hasattr(cfg, "backbone") else cfg


def check_source(source: Mapping[str, Any], tensors: Mapping[str, Any], cfg, kind: str) -> None:
    """Checks of the dropped buffers against the resolved config (small tensors are read):
    each ``qkv.bias_mask`` must be exactly ones, zeros, ones over q, k, v; the stored
    ``rope_embed.periods`` must be the config's (else the trunk would rotate differently)."""
    trunk = _trunk_config(cfg)
    for key, t in source.items():
        rel = key.removeprefix(BACKBONE)
        if BIAS_MASK.match(rel):
            d = trunk.embed_dim
            want = np.concatenate([np.ones(d), np.zeros(d), np.ones(d)])
            got = np.asarray(load(t), np.float64)
            if got.shape != want.shape or not np.array_equal(got, want):
                off = "wrong shape" if got.shape != want.shape else \
                    f"{int(np.sum(got != want))} of {got.size} entries differ"
                raise ConversionError(
                    f"{key} is not DINOv3's key-bias mask (ones over q and v, zeros over k): {off}; "
                    f"a tampered mask would change which biases the model adds")
        elif rel == PERIODS:
            want = trunk.rope_periods()
            got = np.asarray(load(t), np.float64)
            if got.shape != want.shape or not np.allclose(got, want, rtol=1e-6, atol=0.0):
                raise ConversionError(
                    f"{key} {np.array2string(got.ravel()[:4], precision=4)}... differs from the "
                    f"periods of the config (head dim {trunk.head_dim}, base {trunk.pos_embed_rope_base}: "
                    f"{np.array2string(want.ravel()[:4], precision=4)}...); pass the right "
                    f"pos_embed_rope_* / num_heads with --config")


def check_files(records: Sequence[Mapping[str, Any]]) -> None:
    """A Meta file named ``...-<8 hex>.pth`` carries its sha256 prefix (torch.hub's convention):
    refuse a file whose content does not match (a corrupt or mislabelled download)."""
    for r in records:
        check_hash_prefix(r["name"], r["sha256"])


def export_trunk(sd: Dict[str, Any], cfg) -> Dict[str, Any]:
    """Canonical trunk arrays -> Meta's ``state_dict`` as ``load_state_dict(strict=True)`` expects:
    ``rope_embed.periods`` (float32) and each block's ``qkv.bias_mask`` put back, in Meta's order."""
    trunk = _trunk_config(cfg)
    ref = sd["cls_token"]
    out: Dict[str, Any] = {}
    for key in ("cls_token", "storage_tokens", "mask_token"):
        if key in sd:
            out[key] = sd[key]
    if "mask_token" not in out:
        out["mask_token"] = np.zeros((1, trunk.embed_dim), ref.dtype)
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        out[key] = sd[key]
    out[PERIODS] = trunk.rope_periods().astype(np.float32)
    for key, v in sd.items():
        if key in out:
            continue
        out[key] = v
        if key.endswith(".attn.qkv.bias") and trunk.mask_k_bias:
            d = trunk.embed_dim
            out[key[: -len("bias")] + "bias_mask"] = np.concatenate(
                [np.ones(d), np.zeros(d), np.ones(d)]).astype(v.dtype)
    return out


def export_adapter(sd: Dict[str, Any], cfg) -> Dict[str, Any]:
    """Adapter arrays in Meta's names: the trunk's part through :func:`export_trunk`."""
    trunk = export_trunk({k[len(BACKBONE):]: v for k, v in sd.items() if k.startswith(BACKBONE)}, cfg)
    return {**{BACKBONE + k: v for k, v in trunk.items()},
            **{k: v for k, v in sd.items() if not k.startswith(BACKBONE)}}


