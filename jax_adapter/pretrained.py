"""Loading converted checkpoints: ``load_pretrained(path)`` -> a model in eval mode.

Models are built abstractly (``nnx.eval_shape``: shapes only) and filled with the stored
arrays, so loading a 1.1B-parameter ViT-g neither spends time on a random initialisation nor
holds a second copy of the weights.
"""

from __future__ import annotations

from typing import Any, Collection, Dict, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_adapter.adapter import DinoAdapter
from jax_adapter.config import AdapterConfig, DinoV2Config
from jax_adapter.dinov2 import DinoV2

Model = Union[DinoAdapter, DinoV2]
_STORED = nnx.Any(nnx.Param, nnx.BatchStat)  # what checkpoints hold


def _config(kind: str, config: Any):
    if isinstance(config, (AdapterConfig, DinoV2Config)):
        return config
    if kind == "adapter":
        return AdapterConfig.from_dict(dict(config))
    if kind == "dinov2":
        return DinoV2Config.from_dict(dict(config))
    raise ValueError(f"unknown model kind {kind!r}")


def build_model(kind: str, config: Any, seed: int = 0) -> Model:
    """A randomly initialised ``DinoAdapter`` (``kind="adapter"``) or ``DinoV2`` (``"dinov2"``)."""
    cfg = _config(kind, config)
    cls = DinoAdapter if kind == "adapter" else DinoV2
    return cls(cfg, rngs=nnx.Rngs(seed))


def abstract_model(kind: str, config: Any) -> Model:
    """The model with ``jax.ShapeDtypeStruct`` in place of arrays (no memory, no init)."""
    cfg = _config(kind, config)
    return nnx.eval_shape(lambda: build_model(kind, cfg))


def _flat(state) -> Dict[str, nnx.Variable]:
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def init_arrays(kind: str, config: Any, names: Collection[str], seed: int = 0) -> Dict[str, jax.Array]:
    """The freshly initialised values of just the variables ``names`` (dotted paths).

    The constructor runs under ``jit`` and only the requested values are returned, so XLA drops
    the initialisation of everything else (a fresh adapter around a ViT-g trunk costs the
    adapter's init only).
    """
    cfg = _config(kind, config)
    wanted = frozenset(names)

    @jax.jit
    def init():
        flat = _flat(nnx.state(build_model(kind, cfg, seed)))
        return {k: v.get_value() for k, v in flat.items() if k in wanted}

    return init() if wanted else {}


def fill_model(model: Model, kind: str, arrays: Dict[str, Any], *, source: str = "arrays", seed: int = 0,
               consume: bool = False) -> Model:
    """Give an abstract ``model`` the parameter and batch-statistic ``arrays`` (``{dotted path:
    array}``, cast to the model's dtypes); other state (RNG streams) is initialised fresh.

    A missing, unexpected or mis-shaped array is a ``ValueError`` naming it. With ``consume``,
    each array is removed from ``arrays`` once placed (bounded memory for large models).
    """
    state = nnx.state(model)
    flat = _flat(state)
    stored = _flat(nnx.state(model, _STORED))
    missing = sorted(set(stored) - set(arrays))
    unknown = sorted(set(arrays) - set(stored))
    shapes = sorted(k for k in set(stored) & set(arrays)
                    if tuple(stored[k].get_value().shape) != tuple(np.shape(arrays[k])))
    if missing or unknown or shapes:
        raise ValueError(f"{source}: arrays do not fit the model (missing {missing[:5]}, unexpected "
                         f"{unknown[:5]}, mis-shaped {shapes[:5]})")
    rest = init_arrays(kind, model.cfg, [k for k in flat if k not in stored], seed)
    for k, var in flat.items():
        if k in stored:
            value = arrays.pop(k) if consume else arrays[k]
            var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
        else:
            var.set_value(rest[k])
    nnx.update(model, state)
    return model


def load_pretrained(path: str) -> Model:
    """The model stored in a checkpoint directory written by ``jax-adapter convert``.

    Returns a :class:`DinoAdapter` or, for a ``--trunk-only`` checkpoint, a :class:`DinoV2`
    (whose call on NHWC images gives ``DinoV2Output(cls [B, D], registers [B, R, D],
    patches [B, N, D])``), in eval mode.
    """
    from convert import checkpoint

    record = checkpoint.read_record(path)
    kind = record["kind"]
    try:
        model = abstract_model(kind, record["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid config in {checkpoint.RECORD} ({e})") from None
    fill_model(model, kind, checkpoint.read_arrays(path), source=path, consume=True)
    model.eval()
    return model


def stored_arrays(model: Model) -> Mapping[str, np.ndarray]:
    """``{dotted path: numpy array}`` of the parameters and batch statistics (what a checkpoint
    directory stores)."""
    return {k: np.asarray(v.get_value()) for k, v in _flat(nnx.state(model, _STORED)).items()}
