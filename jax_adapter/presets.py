"""Named model presets, and configs read from JSON files.

A preset name gives the config of one model family: ``dinov2_vit{s,b,l,g}14[_reg]`` a DinoAdapter
(:class:`AdapterConfig`; its trunk via :func:`trunk_config`), ``tiny`` a small DinoAdapter for
smoke runs. Each family registers its names here; ``PRESETS`` lists them all.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Dict, List, Tuple

from jax_adapter.errors import ConfigError
from jax_adapter.models.dinov2 import VARIANTS, DinoV2Config
from jax_adapter.models.dinov2_adapter import AdapterConfig
from jax_adapter.models.dinov3 import HUB_VARIANTS as DINOV3_VARIANTS, hub_config as dinov3_hub_config
from jax_adapter.models.dinov3 import DinoV3Config
from jax_adapter.models.dinov3_adapter import DinoV3AdapterConfig, default_interaction_indexes

# name -> (config factory, trunk-config factory)
_REGISTRY: Dict[str, Tuple[Callable[[], Any], Callable[[], Any]]] = {}


def register(name: str, config: Callable[[], Any], trunk: Callable[[], Any]) -> None:
    """Add a preset: ``config()`` is what :func:`get` returns, ``trunk()`` its trunk's config."""
    _REGISTRY[name] = (config, trunk)


def _dinov2_interactions(depth: int) -> Tuple[Tuple[int, int], ...]:
    step = depth // 4
    return tuple((i * step, (i + 1) * step - 1) for i in range(4))


def _dinov2(variant: str, regs: int) -> Tuple[DinoV2Config, AdapterConfig]:
    dim, depth, heads, ffn = VARIANTS[variant]
    trunk = DinoV2Config(
        embed_dim=dim, depth=depth, num_heads=heads, ffn_layer=ffn, num_register_tokens=regs,
        pos_embed_resize="bicubic_size_antialias" if regs else "bicubic_scale_offset",
    )
    # Deformable heads: 6 for S and B (the seed detector's choice), Dh = 64 for L and g.
    adapter = AdapterConfig(
        num_heads=heads, embed_dim=dim, depth=depth, deform_num_heads=6 if dim <= 768 else dim // 64,
        interaction_indexes=_dinov2_interactions(depth), num_register_tokens=regs, ffn_layer=ffn,
    )
    return trunk, adapter


def _tiny() -> AdapterConfig:
    # A small adapter (the shape of the test fixture) for smoke runs.
    return AdapterConfig(num_heads=3, embed_dim=96, depth=4, conv_inplane=16,
                         interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3)))


register("tiny", _tiny, lambda: _tiny().trunk_config())
for _v in VARIANTS:
    for _suffix, _regs in (("", 0), ("_reg", 4)):
        register(f"dinov2_vit{_v}14{_suffix}", lambda v=_v, r=_regs: _dinov2(v, r)[1],
                 lambda v=_v, r=_regs: _dinov2(v, r)[0])


# DINOv3 trunks with the hub's arguments (dinov3/hub/backbones.py); ``dinov3_vitl16_sat`` is the
# ViT-L of the SAT-493M weights (with its unused local_cls_norm).
for _v in DINOV3_VARIANTS:
    register(f"dinov3_{_v}", lambda v=_v: dinov3_hub_config(v), lambda v=_v: dinov3_hub_config(v))


# DINOv3 adapters (Meta's DINOv3_Adapter): upstream's defaults around a hub trunk, tapping the
# blocks upstream's segmentor taps (S/B [2,5,8,11], L [4,11,17,23], H+ [7,15,23,31], 7B
# [9,19,29,39]).
DINOV3_ADAPTER_VARIANTS = ("vits16", "vits16plus", "vitb16", "vitl16", "vitl16plus", "vith16plus", "vit7b16")


def _dinov3_adapter(variant: str) -> DinoV3AdapterConfig:
    trunk = dinov3_hub_config(variant)
    return DinoV3AdapterConfig(backbone=trunk, interaction_indexes=default_interaction_indexes(trunk.depth))


def _dinov3_tiny_adapter() -> DinoV3AdapterConfig:
    # The test fixture's shape (embed 96, depth 4, 6 heads, conv_inplane 16), for CPU smoke runs.
    trunk = dinov3_hub_config("vits16").replace(embed_dim=96, depth=4, num_heads=6)
    return DinoV3AdapterConfig(backbone=trunk, interaction_indexes=(0, 1, 2, 3), conv_inplane=16,
                               drop_path_rate=0.0, with_cp=False)


for _v in DINOV3_ADAPTER_VARIANTS:
    register(f"dinov3_{_v}_adapter", lambda v=_v: _dinov3_adapter(v), lambda v=_v: dinov3_hub_config(v))
register("dinov3_tiny_adapter", _dinov3_tiny_adapter, lambda: _dinov3_tiny_adapter().backbone)


def names() -> List[str]:
    return list(_REGISTRY)


def get(name: str) -> Any:
    """The config of preset ``name``; ``ConfigError`` naming the known presets otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name][0]()


def trunk_config(name: str) -> Any:
    """The trunk config of preset ``name``."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name][1]()


def read_json(path: str) -> Dict[str, Any]:
    """A JSON object from ``path``; ``ConfigError`` naming the file if it is not one."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object of config fields")
    return d


_DINOV3_ONLY = frozenset(f.name for f in dataclasses.fields(DinoV3Config)) - frozenset(
    f.name for f in dataclasses.fields(AdapterConfig))


def config_from_dict(d: Dict[str, Any]) -> Any:
    """The config a dict of fields describes (PyTorch keyword arguments or our own fields):
    with ``"backbone"`` a DINOv3 adapter (``DINOv3_Adapter`` arguments + the trunk's); with
    ``DinoVisionTransformer`` arguments only (at least one DINOv3-specific one, such as
    ``n_storage_tokens`` or ``ffn_ratio``) a DINOv3 trunk; otherwise a DinoAdapter."""
    if "backbone" in d:
        return DinoV3AdapterConfig.from_dict(d)
    if "interaction_indexes" not in d and set(d) & _DINOV3_ONLY:
        return DinoV3Config.from_dict(d)
    return AdapterConfig.from_dict(d)


def load_config_file(path: str) -> Any:
    """A model config from a JSON file of PyTorch keyword arguments (or our own fields)."""
    d = read_json(path)
    try:
        return config_from_dict(d)
    except (TypeError, ConfigError) as e:
        raise ConfigError(f"{path}: {e}") from None


PRESETS = _REGISTRY  # names, in registration order (``list(PRESETS)``)
