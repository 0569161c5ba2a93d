"""Small loaders of Meta's DINOv3 ``state_dict``s (trunk and ``DINOv3_Adapter``) for the parity
tests, independent of the converter under test in ``test_dinov3_conversion.py``.

Module paths follow Meta's names, so the generic key table does the work; the two buffers that
the JAX trunk does not store (``rope_embed.periods``, ``blocks.N.attn.qkv.bias_mask``) are checked
and dropped here.
"""

from __future__ import annotations

import json
from typing import Dict

import numpy as np
import torch
from flax import nnx

import jax.numpy as jnp

from jax_adapter.convert.keys import check_fit, convert_tensors, load_state_dict, slots
from jax_adapter.models.dinov3 import DinoV3, DinoV3Config
from jax_adapter.models.dinov3_adapter import DinoV3Adapter, DinoV3AdapterConfig
from conftest import FIXTURES


def read_meta_state_dict(name: str) -> Dict[str, np.ndarray]:
    sd = torch.load(str(FIXTURES / f"{name}.pth"), map_location="cpu", weights_only=True)
    return {k: v.detach().numpy().copy() for k, v in sd.items()}


def drop_meta_buffers(sd: Dict[str, np.ndarray], cfg: DinoV3Config, prefix: str = "") -> Dict[str, np.ndarray]:
    """``sd`` without the trunk's buffers (under ``prefix``), after checking them: ``ValueError``
    for stored RoPE periods that differ from the config's or a ``bias_mask`` other than
    ``[1, 0, 1]`` thirds."""
    sd = dict(sd)
    periods = sd.pop(prefix + "rope_embed.periods", None)
    if periods is not None and not np.allclose(periods, cfg.rope_periods(), rtol=1e-6, atol=0):
        raise ValueError(f"stored rope_embed.periods {periods} differ from the config's {cfg.rope_periods()}")
    for key in [k for k in sd if k.startswith(prefix) and k.endswith("attn.qkv.bias_mask")]:
        mask = sd.pop(key)
        d = mask.shape[0] // 3
        if not np.array_equal(mask, np.repeat(np.array([1.0, 0.0, 1.0], mask.dtype), d)):
            raise ValueError(f"{key} is not the [1, 0, 1] key mask")
    return sd


def load_meta_trunk(model: DinoV3, sd: Dict[str, np.ndarray]) -> DinoV3:
    """Copy Meta's trunk ``state_dict`` (numpy) into ``model`` (concrete or abstract)."""
    sd = drop_meta_buffers(sd, model.cfg)
    expected = slots(model)
    check_fit(expected, {k: v.shape for k, v in sd.items()}, source="DINOv3 state_dict")
    arrays = convert_tensors(expected, sd)
    # set_value works on concrete and abstract (nnx.eval_shape) models alike.
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(arrays[".".join(map(str, path))]))
    nnx.update(model, state)
    return model


def fixture_config(name: str, **overrides) -> DinoV3Config:
    return DinoV3Config.from_dict({**json.loads((FIXTURES / f"{name}.json").read_text()), **overrides})


def new_trunk(cfg: DinoV3Config) -> DinoV3:
    """A trunk to be filled by :func:`load_meta_trunk`: abstract (no random init, which is slow
    op by op on CPU) unless it holds RNG state that loading would not fill."""
    if cfg.rope_augment:
        return DinoV3(cfg, rngs=nnx.Rngs(0))
    return nnx.eval_shape(lambda: DinoV3(cfg, rngs=nnx.Rngs(0)))


def load_fixture_trunk(name: str, **overrides) -> DinoV3:
    return load_meta_trunk(new_trunk(fixture_config(name, **overrides)), read_meta_state_dict(name))


def adapter_config(**changes) -> DinoV3AdapterConfig:
    """The tiny ``DINOv3_Adapter`` fixture's config (``changes``: config fields)."""
    cfg = DinoV3AdapterConfig.from_dict(json.loads((FIXTURES / "dinov3_adapter_tiny.json").read_text()))
    return cfg.replace(**changes)


def adapter_model(**changes) -> DinoV3Adapter:
    """The fixture's adapter in eval mode (``changes``: config fields, e.g. ``with_cp``)."""
    cfg = adapter_config(**changes)
    model = DinoV3Adapter(cfg, rngs=nnx.Rngs(0))
    load_state_dict(model, drop_meta_buffers(read_meta_state_dict("dinov3_adapter_tiny"), cfg.backbone,
                                             prefix="backbone."))
    model.eval()
    return model


def write_segmentor(path) -> None:
    """The tiny adapter as a DINOv3 segmentor checkpoint, in the reference's container: the adapter
    under ``segmentation_model.0.`` in ``model`` beside an M2F head tensor, and optimizer state."""
    adapter = torch.load(str(FIXTURES / "dinov3_adapter_tiny.pth"), map_location="cpu", weights_only=True)
    model = {f"segmentation_model.0.{k}": v for k, v in adapter.items()}
    model["segmentation_model.1.query_embed.weight"] = torch.randn(10, 96, generator=torch.Generator().manual_seed(0))
    torch.save({"model": model, "optimizer": {"step": 12}}, str(path))
