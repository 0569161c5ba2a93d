"""Loading converted checkpoints: ``load_pretrained(path)`` -> a model in eval mode."""

from __future__ import annotations

from typing import Union

from flax import nnx

from jax_adapter.adapter import DinoAdapter
from jax_adapter.config import AdapterConfig, DinoV2Config
from jax_adapter.dinov2 import DinoV2


def build_model(kind: str, config: dict, seed: int = 0) -> Union[DinoAdapter, DinoV2]:
    if kind == "adapter":
        return DinoAdapter(AdapterConfig.from_dict(config), rngs=nnx.Rngs(seed))
    if kind == "dinov2":
        return DinoV2(DinoV2Config.from_dict(config), rngs=nnx.Rngs(seed))
    raise ValueError(f"unknown model kind {kind!r}")


def load_pretrained(path: str) -> Union[DinoAdapter, DinoV2]:
    """The model stored in a checkpoint directory written by ``jax-adapter convert``.

    Returns a :class:`DinoAdapter` or, for a ``--trunk-only`` checkpoint, a :class:`DinoV2`,
    in eval mode.
    """
    from convert import checkpoint

    record = checkpoint.read_record(path)
    model = build_model(record["kind"], record["config"])
    checkpoint.assign_arrays(model, checkpoint.read_arrays(path), source=path)
    model.eval()
    return model
