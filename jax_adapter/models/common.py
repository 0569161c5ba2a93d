"""What every model family shares: dtype choices, config helpers and the output types."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, NamedTuple, Sequence, Tuple

import jax

from jax_adapter.errors import ConfigError

# Compute dtypes and parameter dtypes (names, so that configs stay JSON).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def config_from_dict(cls, d: Dict[str, Any]):
    """``cls(**d)``, refusing unknown field names with one message naming them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    return cls(**d)


def named_preset(cls, name: str, *, trunk: bool):
    """The config of preset ``name`` (its trunk's config when ``trunk``), which must be a ``cls``."""
    from jax_adapter import presets  # the registry imports the model modules: import it late

    cfg = presets.trunk_config(name) if trunk else presets.get(name)
    if not isinstance(cfg, cls):
        raise ConfigError(f"preset {name!r} is a {type(cfg).__name__} preset, not {cls.__name__}")
    return cfg


class TrunkOutput(NamedTuple):
    """Final-normalised tokens: ``cls [B, D]``, ``registers [B, R, D]`` (DINOv3: storage
    tokens), ``patches [B, N, D]`` (row-major over the patch grid)."""

    cls: jax.Array
    registers: jax.Array
    patches: jax.Array


class AdapterOutput(NamedTuple):
    """``features``: ``f1..f4`` at strides 4, 8, 16, 32, ``[B, h_i, w_i, D]``; ``vit``: a
    ``[B, h/p, w/p, D]`` map of the trunk's tokens (DINOv2 adapter: the final patch tokens with no
    final LayerNorm; DINOv3 adapter: the last tapped layer, final norm applied)."""

    features: Tuple[jax.Array, jax.Array, jax.Array, jax.Array]
    vit: jax.Array
