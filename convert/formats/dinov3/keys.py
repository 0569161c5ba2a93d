"""DINOv3 source names: Meta's hub and adapter ``state_dict`` and Hugging Face
``DINOv3ViTModel``, to the canonical names (Meta's, which the :class:`DinoV3` module paths
follow; the adapter's trunk under ``backbone.``).

Two buffers of Meta's are not stored: ``rope_embed.periods`` and ``blocks.N.attn.qkv.bias_mask``
(checked against the config by :mod:`.export`'s ``check_source``, then dropped). Hugging Face
splits ``qkv`` into ``q_proj``/``k_proj``/``v_proj`` and has no key bias; the fused bias gets a
zero key third. Its MLP names are a trap: ``up_proj`` is the GELU MLP's ``fc1`` but the SwiGLU's
*linear* branch ``w2`` (``gate_proj`` is ``w1``, the SiLU branch), so each layer is mapped by
whether it has a ``gate_proj``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from jax_adapter.errors import ConversionError

from ...tensors import ArrayTensor, concat, load

BACKBONE = "backbone."
PERIODS = "rope_embed.periods"
BIAS_MASK = re.compile(r"^(?P<block>blocks\.\d+)\.attn\.qkv\.bias_mask$")
_HF_LAYER = re.compile(r"^(?P<outer>(?:model\.)?layer\.)(?P<i>\d+)\.(?P<rest>.+)$")
# Canonical keys a trunk may lack without being incomplete (the model keeps them when it can).
_OPTIONAL = ("mask_token", "local_cls_norm.weight", "local_cls_norm.bias")


@dataclasses.dataclass(frozen=True)
class _Reshaped:
    """A tensor viewed with another shape (Hugging Face ``mask_token [1, 1, D]`` -> ``[1, D]``)."""

    parts: Tuple[Any]
    shape: Tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    def load(self) -> np.ndarray:
        return load(self.parts[0]).reshape(self.shape)


# --- key maps --------------------------------------------------------------------------------


def is_trunk_key(key: str) -> bool:
    """Whether an adapter-canonical key is the trunk's."""
    return key.startswith(BACKBONE)


def optional(key: str) -> bool:
    """Canonical keys the model may lack (dropped then, not "unexpected")."""
    return key.removeprefix(BACKBONE) in _OPTIONAL


def from_meta(sd: Mapping[str, Any]) -> Dict[str, Any]:
    """Meta trunk (or adapter) ``state_dict`` -> canonical: the periods and bias masks dropped
    (they are checked once the config is known, by :func:`check_source`)."""
    out = {}
    for key, v in sd.items():
        rel = key.removeprefix(BACKBONE)
        if rel == PERIODS or BIAS_MASK.match(rel):
            continue
        out[key] = v
    return out


def _hf_layer(i: str, parts: Dict[str, Any], outer: str) -> Tuple[Dict[str, Any], List[str]]:
    """One Hugging Face layer's tensors (names relative to the layer) -> ``blocks.i.*``; returns
    the converted tensors and the absent Hugging Face names of incomplete groups."""
    out: Dict[str, Any] = {}
    absent: List[str] = []
    b = f"blocks.{i}."
    hf = f"{outer}{i}."
    qkv = [f"attention.{x}_proj.weight" for x in "qkv"]
    if any(n in parts for n in qkv):
        missing = [n for n in qkv if n not in parts]
        if missing:
            absent += [hf + n for n in missing]
        else:
            out[b + "attn.qkv.weight"] = concat([parts.pop(n) for n in qkv])
    biases = [f"attention.{x}_proj.bias" for x in "qkv"]
    present = [n for n in biases if n in parts]
    if present:
        # Hugging Face has no key bias (and may lack the query or value one): zeros, so that
        # the fused bias is what the split projections add.
        ref = parts[present[0]]
        zeros = ArrayTensor(np.zeros(tuple(ref.shape), np.dtype(ref.dtype)))
        out[b + "attn.qkv.bias"] = concat([parts.pop(n) if n in parts else zeros for n in biases])
    renames = {"attention.o_proj": "attn.proj", "norm1": "norm1", "norm2": "norm2"}
    gated = "mlp.gate_proj.weight" in parts
    if gated:
        renames.update({"mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w2", "mlp.down_proj": "mlp.w3"})
        if "mlp.up_proj.weight" not in parts:
            absent.append(hf + "mlp.up_proj.weight")
    else:
        renames.update({"mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"})
    for name in list(parts):
        if name in ("layer_scale1.lambda1", "layer_scale2.lambda1"):
            out[b + f"ls{name[11]}.gamma"] = parts.pop(name)
            continue
        module, _, leaf = name.rpartition(".")
        if module in renames and leaf in ("weight", "bias"):
            out[b + renames[module] + "." + leaf] = parts.pop(name)
    out.update({hf + n: v for n, v in parts.items()})  # unknown: reported as unexpected
    return out, absent


def from_hf(sd: Mapping[str, Any]) -> Dict[str, Any]:
    """Hugging Face ``DINOv3ViTModel`` (saved ``layer.N.*`` or in-memory ``model.layer.N.*``)
    -> canonical Meta names. An incomplete q/k/v or gate/up group is a ``ConversionError``
    naming the absent Hugging Face keys."""
    out: Dict[str, Any] = {}
    layers: Dict[str, Dict[str, Any]] = {}
    outer = "layer."
    top = {"embeddings.cls_token": "cls_token", "embeddings.register_tokens": "storage_tokens",
           "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
           "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
    for key, v in sd.items():
        m = _HF_LAYER.match(key)
        if m:
            outer = m.group("outer")
            layers.setdefault(m.group("i"), {})[m.group("rest")] = v
        elif key == "embeddings.mask_token":
            shape = tuple(v.shape)
            out["mask_token"] = _Reshaped((v,), (1, shape[-1])) if len(shape) == 3 else v
        elif key == "embeddings.register_tokens" and tuple(v.shape)[1:2] == (0,):
            continue
        else:
            out[top.get(key, key)] = v
    absent: List[str] = []
    for i, parts in sorted(layers.items(), key=lambda kv: int(kv[0])):
        converted, missing = _hf_layer(i, dict(parts), outer)
        out.update(converted)
        absent += missing
    if absent:
        raise ConversionError(f"missing keys: {', '.join(sorted(absent))}")
    return out


_HF_NAMES = [
    (re.compile(r"^cls_token$"), ["embeddings.cls_token"]),
    (re.compile(r"^storage_tokens$"), ["embeddings.register_tokens"]),
    (re.compile(r"^mask_token$"), ["embeddings.mask_token"]),
    (re.compile(r"^patch_embed\.proj\.(\w+)$"), ["embeddings.patch_embeddings.{0}"]),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(\w+)$"),
     ["layer.{0}.attention.q_proj.{1}", "layer.{0}.attention.k_proj.{1}", "layer.{0}.attention.v_proj.{1}"]),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\.(\w+)$"), ["layer.{0}.attention.o_proj.{1}"]),
    (re.compile(r"^blocks\.(\d+)\.ls(\d)\.gamma$"), ["layer.{0}.layer_scale{1}.lambda1"]),
    (re.compile(r"^blocks\.(\d+)\.(norm\d)\.(\w+)$"), ["layer.{0}.{1}.{2}"]),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc1\.(\w+)$"), ["layer.{0}.mlp.up_proj.{1}"]),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc2\.(\w+)$"), ["layer.{0}.mlp.down_proj.{1}"]),
    (re.compile(r"^blocks\.(\d+)\.mlp\.w1\.(\w+)$"), ["layer.{0}.mlp.gate_proj.{1}"]),
    (re.compile(r"^blocks\.(\d+)\.mlp\.w2\.(\w+)$"), ["layer.{0}.mlp.up_proj.{1}"]),
    (re.compile(r"^blocks\.(\d+)\.mlp\.w3\.(\w+)$"), ["layer.{0}.mlp.down_proj.{1}"]),
]


def hf_names(key: str) -> List[str]:
    """The Hugging Face names a canonical trunk key comes from, for messages."""
    for pattern, names in _HF_NAMES:
        m = pattern.match(key)
        if m:
            return [n.format(*m.groups()) for n in names]
    return [key]


# --- detection -------------------------------------------------------------------------------


def is_hf(keys: set) -> bool:
    return "embeddings.patch_embeddings.weight" in keys or any(_HF_LAYER.match(k) for k in keys)


def is_meta_trunk(keys: set) -> bool:
    # DINOv3 has no position table: a ViT with a patch embedding and no pos_embed.
    return "patch_embed.proj.weight" in keys and "pos_embed" not in keys and any(
        k.startswith("blocks.") for k in keys)


def is_adapter(keys: set) -> bool:
    # Meta's DINOv3_Adapter: SPM and extractors, no injector, the trunk under backbone.
    return (any(k.startswith(("spm.", "interactions.")) for k in keys)
            and not any(".injector." in k for k in keys)
            and (any(k.startswith(BACKBONE) for k in keys) or "level_embed" in keys))


