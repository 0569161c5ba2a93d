"""What every model family shares: dtype choices, the config methods, the output types and the
trunk protocol that adapters, training and conversion read."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Dict, List, NamedTuple, Protocol, Sequence, Tuple

import jax
import numpy as np

from jax_adapter import registry
from jax_adapter.errors import ConfigError
from jax_adapter.nn.neck import AdapterOutput  # noqa: F401 - the adapters' output type

# The ImageNet statistics of pixels in [0, 1] that most weights were trained with.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Compute dtypes and parameter dtypes (names, so that configs stay JSON).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def fields_to_config(cls, d: Dict[str, Any]):
    """``cls(**d)``, refusing unknown field names with one message naming them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    return cls(**d)


class ConfigMethods:
    """The methods every (frozen dataclass) config has: ``replace``, ``to_dict``, ``to_json``,
    ``from_dict`` (refusing unknown fields) and ``preset`` (a registered architecture's config,
    which must be of this class)."""

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]):
        return fields_to_config(cls, d)

    @classmethod
    def preset(cls, name: str):
        """The config of the registered architecture ``name`` (``jax_adapter.list_models()``)."""
        return registry.config_of(name, cls)


class TrunkOutput(NamedTuple):
    """Final-normalised tokens: ``cls [B, D]``, ``registers [B, R, D]`` (DINOv3: storage
    tokens), ``patches [B, N, D]`` (row-major over the patch grid)."""

    cls: jax.Array
    registers: jax.Array
    patches: jax.Array


class Trunk(Protocol):
    """What a ViT trunk offers the adapters, training and conversion.

    Parameter groups, by top-level attribute name: ``EMBEDDINGS`` (layer id 0 of the layer-wise
    learning-rate decay), ``BLOCKS`` (block ``i`` has layer id ``i + 1``) and ``FINAL_NORMS``;
    together they are the trunk's parameters, wherever an adapter holds it.
    """

    EMBEDDINGS: ClassVar[Tuple[str, ...]]
    BLOCKS: ClassVar[str]
    FINAL_NORMS: ClassVar[Tuple[str, ...]]
    cfg: Any

    def __call__(self, images: jax.Array) -> TrunkOutput: ...

    def intermediates(self, images: jax.Array, indices: Sequence[int], *, norm: bool = True
                      ) -> List[Tuple[jax.Array, jax.Array]]: ...


def trunk_names(trunk_class: Any) -> Tuple[str, ...]:
    """Every top-level attribute name that holds a trunk parameter."""
    return tuple(trunk_class.EMBEDDINGS) + (trunk_class.BLOCKS,) + tuple(trunk_class.FINAL_NORMS)


def check_indices(indices: Sequence[int], depth: int) -> Tuple[int, ...]:
    """``indices`` of intermediate blocks as a tuple if sorted, unique and in ``[0, depth)``;
    ``ConfigError`` otherwise (``get_intermediate_layers`` semantics)."""
    idx = tuple(indices)
    if not idx:
        raise ConfigError("indices of intermediate layers are empty")
    if any(not isinstance(i, (int, np.integer)) or isinstance(i, bool) for i in idx):
        raise ConfigError(f"indices of intermediate layers must be integers, got {list(idx)}")
    if any(i < 0 or i >= depth for i in idx):
        raise ConfigError(f"indices of intermediate layers must be in [0, {depth}), got {list(idx)}")
    if any(a >= b for a, b in zip(idx, idx[1:])):
        raise ConfigError(f"indices of intermediate layers must be sorted and unique, got {list(idx)}")
    return tuple(int(i) for i in idx)


def drop_path_rates(rate: float, depth: int) -> List[float]:
    """Stochastic-depth rate of each block: linear from 0 to ``rate``."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]
