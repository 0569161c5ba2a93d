"""DINOv2 source names: small pure functions from each source's names to the canonical ones.

The seed DinoAdapter's ``state_dict`` names (of which the DINOv2 hub's names are a subset) are
the DINOv2 family's canonical names; :mod:`convert.keys` maps those onto modules. Values are
numpy arrays or lazy :class:`convert.tensors.Tensor` handles; the converters only rename, drop
and concatenate, so they work on either.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Tuple

import numpy as np

from jax_adapter.errors import ConversionError
from jax_adapter.models.base import trunk_names
from jax_adapter.models.dinov2 import DinoV2

from ...tensors import ArrayTensor, concat

FORMATS = ("dinoadapter", "dinov2_hub", "hf_dinov2", "hf_dinov2_with_registers")

_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")
# The trunk's top-level names (the trunk's parameter groups): inside a DinoAdapter they sit at
# the top level beside the adapter's.
_TRUNK_NAMES = trunk_names(DinoV2)


def is_trunk_key(key: str) -> bool:
    """Whether an adapter-canonical key is the trunk's."""
    return key.split(".", 1)[0] in _TRUNK_NAMES


def detect_format(keys: Iterable[str]) -> str:
    """Which of :data:`FORMATS` a (prefix-stripped) key set is; ``ValueError`` if none."""
    keys = set(keys)
    if any(k.startswith(("spm.", "interactions.")) for k in keys):
        return "dinoadapter"
    if "embeddings.position_embeddings" in keys or any(k.startswith("encoder.layer.") for k in keys):
        return "hf_dinov2_with_registers" if "embeddings.register_tokens" in keys else "hf_dinov2"
    if "pos_embed" in keys and any(k.startswith("blocks.") for k in keys):
        return "dinov2_hub"
    sample = ", ".join(sorted(keys)[:4])
    raise ConversionError(
        f"unknown checkpoint format: neither DinoAdapter, DINOv2 hub nor Hugging Face DINOv2 keys "
        f"(found {len(keys)} tensors: {sample}{', ...' if len(keys) > 4 else ''})"
    )


def from_dinov2_hub(sd: Mapping[str, object]) -> Dict[str, object]:
    """DINOv2 hub ``.pth`` (and the seed DinoAdapter): drop ``mask_token``; un-chunk
    ``blocks.<chunk>.<N>.`` keys (block chunking keeps global block indices)."""
    out = {}
    for key, v in sd.items():
        if key == "mask_token":
            continue  # used only by masked pretraining
        out[_CHUNKED.sub(r"blocks.\1.", key)] = v
    return out


# Hugging Face -> hub names. Each rule: the hub name and the Hugging Face name(s) whose rows
# are concatenated into it, as templates over {i} (layer) and {p} (weight / bias). Saved
# checkpoints use the first spelling; transformers 5 modules' own state_dict() the second.
_HF_RULES: List[Tuple[str, Tuple[str, ...]]] = [
    ("cls_token", ("embeddings.cls_token",)),
    ("pos_embed", ("embeddings.position_embeddings",)),
    ("register_tokens", ("embeddings.register_tokens",)),
    ("patch_embed.proj.{p}", ("embeddings.patch_embeddings.projection.{p}",)),
    ("blocks.{i}.norm1.{p}", ("encoder.layer.{i}.norm1.{p}",)),
    ("blocks.{i}.attn.qkv.{p}", ("encoder.layer.{i}.attention.attention.query.{p}",
                                 "encoder.layer.{i}.attention.attention.key.{p}",
                                 "encoder.layer.{i}.attention.attention.value.{p}")),
    ("blocks.{i}.attn.qkv.{p}", ("encoder.layer.{i}.attention.q_proj.{p}",
                                 "encoder.layer.{i}.attention.k_proj.{p}",
                                 "encoder.layer.{i}.attention.v_proj.{p}")),
    ("blocks.{i}.attn.proj.{p}", ("encoder.layer.{i}.attention.output.dense.{p}",)),
    ("blocks.{i}.attn.proj.{p}", ("encoder.layer.{i}.attention.o_proj.{p}",)),
    ("blocks.{i}.ls1.gamma", ("encoder.layer.{i}.layer_scale1.lambda1",)),
    ("blocks.{i}.norm2.{p}", ("encoder.layer.{i}.norm2.{p}",)),
    ("blocks.{i}.mlp.fc1.{p}", ("encoder.layer.{i}.mlp.fc1.{p}",)),
    ("blocks.{i}.mlp.fc2.{p}", ("encoder.layer.{i}.mlp.fc2.{p}",)),
    # SwiGLU: weights_in holds [gate; up] rows, as the hub's w12 does.
    ("blocks.{i}.mlp.w12.{p}", ("encoder.layer.{i}.mlp.weights_in.{p}",)),
    ("blocks.{i}.mlp.w12.{p}", ("encoder.layer.{i}.mlp.gate_proj.{p}", "encoder.layer.{i}.mlp.up_proj.{p}")),
    ("blocks.{i}.mlp.w3.{p}", ("encoder.layer.{i}.mlp.weights_out.{p}",)),
    ("blocks.{i}.mlp.w3.{p}", ("encoder.layer.{i}.mlp.down_proj.{p}",)),
    ("blocks.{i}.ls2.gamma", ("encoder.layer.{i}.layer_scale2.lambda1",)),
    ("norm.{p}", ("layernorm.{p}",)),
]


def _regex(template: str) -> "re.Pattern[str]":
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern + "$")


_HF_MATCHERS = [[_regex(t) for t in hf] for _, hf in _HF_RULES]
_HUB_MATCHERS = [_regex(hub) for hub, _ in _HF_RULES]


def _match_hf(key: str):
    """``(rule index, part index, {i, p})`` of a Hugging Face key, or None."""
    for r, matchers in enumerate(_HF_MATCHERS):
        for j, pattern in enumerate(matchers):
            m = pattern.match(key)
            if m:
                return r, j, m.groupdict()
    return None


def from_hf(sd: Mapping[str, object]) -> Dict[str, object]:
    """Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` -> hub names.

    ``query``/``key``/``value`` rows are concatenated into ``qkv``; ``mask_token`` and empty
    ``register_tokens`` (a registers model with 0 registers) are dropped; unknown keys pass
    through unchanged (to be reported as unexpected). An incomplete q/k/v or gate/up group is a
    ``ValueError`` naming the absent keys.
    """
    out: Dict[str, object] = {}
    groups: Dict[Tuple[int, str, str], Dict[int, object]] = {}
    for key, v in sd.items():
        if key == "embeddings.mask_token":
            continue
        if key == "embeddings.register_tokens" and tuple(v.shape)[1:2] == (0,):
            continue
        hit = _match_hf(key)
        if hit is None:
            out[key] = v
            continue
        r, j, fields = hit
        groups.setdefault((r, fields.get("i", ""), fields.get("p", "")), {})[j] = v
    absent = []
    for (r, i, p), parts in groups.items():
        hub, hf = _HF_RULES[r]
        if len(parts) < len(hf):
            absent += [hf[j].format(i=i, p=p) for j in range(len(hf)) if j not in parts]
            continue
        ordered = [parts[j] for j in range(len(hf))]
        out[hub.format(i=i, p=p)] = ordered[0] if len(ordered) == 1 else concat(ordered)
    if absent:
        raise ConversionError(f"missing keys: {', '.join(sorted(absent))}")
    return out


def hf_names(hub_key: str) -> List[str]:
    """The Hugging Face (saved-file) names a hub key comes from, for messages."""
    for (hub, hf), m in zip(_HF_RULES, _HUB_MATCHERS):
        match = m.match(hub_key)
        if match:
            return [t.format(**match.groupdict()) for t in hf]
    return [hub_key]


def to_dinov2_hub(sd: Mapping[str, object]) -> Dict[str, object]:
    """Trunk keys only, in hub names, with a zero ``mask_token [1, D]`` (unused at inference,
    present so that the hub's ``DinoVisionTransformer.load_state_dict`` accepts the file)."""
    out = {k: v for k, v in sd.items() if is_trunk_key(k)}
    pos = out["pos_embed"]
    mask = np.zeros((1, pos.shape[-1]), pos.dtype)
    out["mask_token"] = mask if isinstance(pos, np.ndarray) else ArrayTensor(mask)
    return out
