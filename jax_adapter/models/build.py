"""Models by kind, and their state as named arrays: build (or shape only), fill, read out.

Models are built abstractly (``nnx.eval_shape``: shapes only) and filled with stored arrays, so
loading a 1.1B-parameter ViT-g neither spends time on a random initialisation nor holds a second
copy of the weights. Names are dotted module paths (``interactions.0.injector.attn.value_proj.
kernel``), the names checkpoint directories store.
"""

from __future__ import annotations

from typing import Any, Collection, Dict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_adapter import registry
from jax_adapter.errors import CheckpointError

STORED = nnx.Any(nnx.Param, nnx.BatchStat)  # what checkpoints hold


def _config(kind: str, config: Any):
    config_cls = registry.kind(kind).config
    if isinstance(config, config_cls):
        return config
    return config_cls.from_dict(dict(config))


def build_model(kind: str, config: Any, seed: int = 0) -> nnx.Module:
    """A randomly initialised model of ``kind`` (``"dinov2_adapter"``, ``"dinov3"``, ...) from its
    config object or dict."""
    cfg = _config(kind, config)
    return registry.kind(kind).model(cfg, rngs=nnx.Rngs(seed))


def abstract_model(kind: str, config: Any) -> nnx.Module:
    """The model with ``jax.ShapeDtypeStruct`` in place of arrays (no memory, no init)."""
    cfg = _config(kind, config)
    return nnx.eval_shape(lambda: build_model(kind, cfg))


def flat_variables(state) -> Dict[str, nnx.Variable]:
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
        flat = flat_variables(nnx.state(build_model(kind, cfg, seed)))
        return {k: v.get_value() for k, v in flat.items() if k in wanted}

    return init() if wanted else {}


def fill_model(model: nnx.Module, kind: str, arrays: Dict[str, Any], *, source: str = "arrays",
               seed: int = 0, consume: bool = False) -> nnx.Module:
    """Give an abstract ``model`` the parameter and batch-statistic ``arrays`` (``{dotted path:
    array}``, cast to the model's dtypes); other state (RNG streams) is initialised fresh.

    A missing, unexpected or mis-shaped array is a ``CheckpointError`` naming it. With
    ``consume``, each array is removed from ``arrays`` once placed (bounded memory for large
    models).
    """
    state = nnx.state(model)
    flat = flat_variables(state)
    stored = flat_variables(nnx.state(model, STORED))
    missing = sorted(set(stored) - set(arrays))
    unknown = sorted(set(arrays) - set(stored))
    shapes = sorted(k for k in set(stored) & set(arrays)
                    if tuple(stored[k].get_value().shape) != tuple(np.shape(arrays[k])))
    if missing or unknown or shapes:
        raise CheckpointError(f"{source}: arrays do not fit the model (missing {missing[:5]}, unexpected "
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


def model_arrays(model: nnx.Module) -> Dict[str, np.ndarray]:
    """``{dotted path: numpy array}`` of a model's parameters and batch statistics (what a
    checkpoint directory stores)."""
    return {k: np.asarray(v.get_value()) for k, v in flat_variables(nnx.state(model, STORED)).items()}


def kind_of(model: nnx.Module) -> str:
    """The registered kind of a model instance; ``CheckpointError`` for other modules."""
    k = registry.kind_of_model(model)
    if k is not None:
        return k.name
    known = tuple(k.model for k in registry.kinds())
    if isinstance(getattr(model, "backbone", None), known):
        # A detector or segmenter around one of ours (the training example's SegmentationModel):
        # its head has no kind, its backbone has.
        raise CheckpointError(
            f"cannot save a {type(model).__name__}: save its backbone, a "
            f"{type(model.backbone).__name__}: save_pretrained(model.backbone, dst)")
    raise CheckpointError(
        f"cannot save a {type(model).__name__}: expected one of "
        f"{', '.join(c.__name__ for c in known)} (for a model that holds a backbone, save the backbone)")
