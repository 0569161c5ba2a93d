"""The name-and-layout table between a jax-adapter module and a PyTorch ``state_dict``.

Module paths already follow PyTorch (``interactions.0.injector.attn.value_proj``); only the leaf
names and array layouts differ, by layer type:

=====================  ==============  ===================  ==========================
layer                  JAX leaf        PyTorch leaf         layout (JAX <- PyTorch)
=====================  ==============  ===================  ==========================
``nnx.Linear``         kernel          weight               ``[in, out] <- [out, in]``
``nnx.Conv``           kernel          weight               ``HWIO <- OIHW``
``ConvTranspose2x2``   kernel          weight               ``[kh, kw, in, out] <- [in, out, kh, kw]``
``nnx.LayerNorm``      scale           weight
``BatchNorm2d``        scale/mean/var  weight/running_*
anything else          same name       same name
=====================  ==============  ===================  ==========================
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Tuple

import numpy as np
from flax import nnx

from jax_adapter.layers import BatchNorm2d, ConvTranspose2x2

Path = Tuple


def _same(a: np.ndarray) -> np.ndarray:
    return a


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One parameter: its PyTorch key and the layout changes both ways."""

    torch_key: str
    to_jax: Callable[[np.ndarray], np.ndarray] = _same
    to_torch: Callable[[np.ndarray], np.ndarray] = _same


_LEAF_RULES: Dict[type, Dict[str, Tuple[str, Callable, Callable]]] = {
    nnx.Linear: {"kernel": ("weight", lambda a: a.T, lambda a: a.T)},
    nnx.Conv: {"kernel": ("weight", lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))},
    ConvTranspose2x2: {"kernel": ("weight", lambda a: a.transpose(2, 3, 0, 1), lambda a: a.transpose(2, 3, 0, 1))},
    nnx.LayerNorm: {"scale": ("weight", _same, _same)},
    BatchNorm2d: {
        "scale": ("weight", _same, _same),
        "mean": ("running_mean", _same, _same),
        "var": ("running_var", _same, _same),
    },
}


def _owner_types(model: nnx.Module) -> Dict[Path, type]:
    return {tuple(path): type(node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}


def key_table(model: nnx.Module) -> Dict[Path, KeyRule]:
    """For every ``Param`` and ``BatchStat`` of ``model``: its PyTorch key and layout rules."""
    owners = _owner_types(model)
    table = {}
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    for path, _ in nnx.to_flat_state(state):
        path = tuple(path)
        leaf = path[-1]
        rules = _LEAF_RULES.get(owners.get(path[:-1]), {})
        name, to_jax, to_torch = rules.get(leaf, (leaf, _same, _same))
        key = ".".join(str(p) for p in path[:-1] + (name,))
        table[path] = KeyRule(key, to_jax, to_torch)
    return table


def _fmt(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_dict(
    model: nnx.Module,
    state_dict: Dict[str, np.ndarray],
    *,
    allow_missing: Callable[[str], bool] = lambda key: False,
    source: str = "state dict",
) -> Dict[str, int]:
    """Copy a PyTorch-named ``state_dict`` (numpy arrays) into ``model`` in place.

    Unknown keys, missing keys (unless ``allow_missing(key)``) and mis-shaped tensors raise one
    ``ValueError`` naming them; nothing is assigned unless everything fits. Returns counts.
    """
    table = key_table(model)
    by_key = {rule.torch_key: path for path, rule in table.items()}
    unknown = set(state_dict) - set(by_key)
    missing = {k for k in by_key if k not in state_dict and not allow_missing(k)}
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    flat = dict((tuple(p), v) for p, v in nnx.to_flat_state(state))
    updates, bad_shape = {}, []
    for key, arr in state_dict.items():
        if key not in by_key:
            continue
        path = by_key[key]
        target = flat[path]
        value = table[path].to_jax(np.asarray(arr))
        if value.shape != tuple(target.shape):
            bad_shape.append(f"{key} {tuple(np.asarray(arr).shape)} (expected {tuple(table[path].to_torch(np.zeros(target.shape)).shape)})")
            continue
        updates[path] = value.astype(target.dtype)
    problems = []
    if unknown:
        problems.append(f"unexpected keys: {_fmt(unknown)}")
    if missing:
        problems.append(f"missing keys: {_fmt(missing)}")
    if bad_shape:
        problems.append(f"mis-shaped keys: {_fmt(bad_shape)}")
    if problems:
        raise ValueError(f"{source} does not fit the model: " + "; ".join(problems))
    for path, value in updates.items():
        flat[path][...] = value
    return {"loaded": len(updates), "kept": len(table) - len(updates)}


def to_state_dict(model: nnx.Module) -> Dict[str, np.ndarray]:
    """``model``'s parameters and batch statistics as a PyTorch-named ``state_dict`` (numpy)."""
    table = key_table(model)
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    out = {}
    for path, var in nnx.to_flat_state(state):
        rule = table[tuple(path)]
        out[rule.torch_key] = np.ascontiguousarray(rule.to_torch(np.asarray(var[...])))
    return out
