"""The name-and-layout table between a jax-adapter module and a PyTorch ``state_dict``.

Module paths already follow PyTorch (``interactions.0.injector.attn.value_proj``); only the leaf
names and array layouts differ, by layer type:

=====================  ==============  ===================  ==========================
layer                  JAX leaf        PyTorch leaf         layout (JAX <- PyTorch)
=====================  ==============  ===================  ==========================
``nnx.Linear``         kernel          weight               ``[in, out] <- [out, in]``
``nnx.Conv``           kernel          weight               ``HWIO <- OIHW``
``ConvTranspose2x2``   kernel          weight               ``[kh, kw, in, out] <- [in, out, kh, kw]``
``LayerNorm``          scale           weight
``BatchNorm2d``        scale/mean/var  weight/running_*
anything else          same name       same name
=====================  ==============  ===================  ==========================
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np
from flax import nnx

from jax_adapter.checkpoint import cast_floats, dtype_by_name, is_float

from .tensors import load
from jax_adapter.nn.layers import BatchNorm2d, ConvTranspose2x2, LayerNorm
from jax_adapter.errors import ConversionError

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
    LayerNorm: {"scale": ("weight", _same, _same)},
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


def dotted(path: Path) -> str:
    return ".".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class Slot:
    """One model array as the PyTorch side sees it."""

    path: str  # dotted module path, the checkpoint's array name
    rule: KeyRule
    shape: Tuple[int, ...]  # JAX layout
    dtype: np.dtype

    @property
    def torch_shape(self) -> Tuple[int, ...]:
        # A zero-strided view: the layout change is computed without allocating the array.
        return tuple(self.rule.to_torch(np.broadcast_to(np.zeros((), np.int8), self.shape)).shape)


def slots(model: nnx.Module) -> Dict[str, Slot]:
    """``{PyTorch key: Slot}`` for every ``Param`` and ``BatchStat`` of ``model`` (which may be
    abstract, from ``nnx.eval_shape``)."""
    table = key_table(model)
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    out = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        out[table[tuple(path)].torch_key] = Slot(dotted(path), table[tuple(path)], tuple(value.shape),
                                                 np.dtype(value.dtype))
    return out


def check_fit(
    expected: Dict[str, Slot], shapes: Dict[str, Tuple[int, ...]], *,
    allow_missing: Callable[[str], bool] = lambda key: False, source: str = "state dict",
    names: Callable[[str], list] = lambda key: [key],
) -> list:
    """Compare a source's ``{key: shape}`` with the model's slots, before reading any data.

    Unknown keys, missing keys (unless ``allow_missing(key)``) and mis-shaped tensors raise one
    ``ValueError`` naming them (missing keys in the source's own names, via ``names``).
    Returns the allowed missing keys.
    """
    unknown = set(shapes) - set(expected)
    missing = [k for k in expected if k not in shapes]
    bad_missing = {n for k in missing if not allow_missing(k) for n in names(k)}
    bad_shape = [
        f"{k} {tuple(shapes[k])} (expected {expected[k].torch_shape})"
        for k in set(shapes) & set(expected) if tuple(shapes[k]) != expected[k].torch_shape
    ]
    problems = []
    if unknown:
        problems.append(f"unexpected keys: {_fmt(unknown)}")
    if bad_missing:
        problems.append(f"missing keys: {_fmt(bad_missing)}")
    if bad_shape:
        problems.append(f"mis-shaped keys: {_fmt(bad_shape)}")
    if problems:
        raise ConversionError(f"{source} does not fit the model: " + "; ".join(problems))
    return [k for k in missing if allow_missing(k)]


def check_stored(expected: Dict[str, Slot], shapes: Dict[str, Tuple[int, ...]], *, source: str) -> None:
    """Compare a checkpoint directory's ``{dotted path: shape}`` (JAX layout) with the slots."""
    want = {s.path: s.shape for s in expected.values()}
    missing, unknown = set(want) - set(shapes), set(shapes) - set(want)
    bad_shape = [f"{k} {tuple(shapes[k])} (expected {want[k]})"
                 for k in set(want) & set(shapes) if tuple(shapes[k]) != want[k]]
    problems = [f"{what}: {_fmt(keys)}" for what, keys in
                (("unexpected arrays", unknown), ("missing arrays", missing), ("mis-shaped arrays", bad_shape)) if keys]
    if problems:
        raise ConversionError(f"{source}: stored arrays do not fit its config: " + "; ".join(problems))


def convert_tensors(
    expected: Dict[str, Slot], tensors: Dict[str, object], *, dtype: Optional[str] = None,
    on_tensor: Callable[[int], None] = lambda nbytes: None,
) -> Dict[str, np.ndarray]:
    """``{dotted path: array}`` in JAX layout, converting one tensor at a time.

    ``tensors`` maps PyTorch keys to numpy arrays or lazy handles (call :func:`check_fit`
    first). Floating arrays become ``dtype`` (default: the model's), others the model's dtype;
    each result is a fresh C-contiguous array, never a view of the source.
    """
    out = {}
    for key, t in tensors.items():
        slot = expected[key]
        a = load(t)
        target = dtype_by_name(dtype) if dtype is not None and is_float(a.dtype) else slot.dtype
        out[slot.path] = np.array(slot.rule.to_jax(a), dtype=target, order="C", copy=True)
        on_tensor(a.nbytes)
        del a
    return out


def torch_arrays(expected: Dict[str, Slot], arrays: Dict[str, np.ndarray], *, pop: bool = False,
                 dtype: Optional[str] = None) -> Iterator[Tuple[str, np.ndarray]]:
    """``(PyTorch key, array in PyTorch layout)`` for each slot, lazily.

    Integer arrays (``num_batches_tracked``) come out as int64, as PyTorch stores them; with
    ``pop`` each array is removed from ``arrays`` once converted (bounded memory on export).
    """
    for key, slot in expected.items():
        a = arrays.pop(slot.path) if pop else arrays[slot.path]
        a = cast_floats(a, dtype) if is_float(a.dtype) else a.astype(np.int64)
        yield key, np.asarray(slot.rule.to_torch(a), order="C")


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
    expected = slots(model)
    check_fit(expected, {k: np.shape(v) for k, v in state_dict.items()}, allow_missing=allow_missing,
              source=source)
    arrays = convert_tensors(expected, state_dict)
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    for path, var in nnx.to_flat_state(state):
        name = dotted(path)
        if name in arrays:
            var[...] = arrays[name]
    return {"loaded": len(arrays), "kept": len(expected) - len(arrays)}


def to_state_dict(model: nnx.Module) -> Dict[str, np.ndarray]:
    """``model``'s parameters and batch statistics as a PyTorch-named ``state_dict`` (numpy)."""
    table = key_table(model)
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    out = {}
    for path, var in nnx.to_flat_state(state):
        rule = table[tuple(path)]
        out[rule.torch_key] = np.asarray(rule.to_torch(np.asarray(var[...])), order="C")
    return out
