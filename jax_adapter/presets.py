"""Named model presets, and configs read from JSON files.

A preset name gives the config of one model family: ``dinov2_vit{s,b,l,g}14[_reg]`` a DinoAdapter
(:class:`AdapterConfig`; its trunk via :func:`trunk_config`), ``tiny`` a small DinoAdapter for
smoke runs. Each family registers its names here; ``PRESETS`` lists them all.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Tuple

from jax_adapter.errors import ConfigError
from jax_adapter.models.dinov2 import VARIANTS, DinoV2Config
from jax_adapter.models.dinov2_adapter import AdapterConfig

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


def config_from_dict(d: Dict[str, Any]) -> Any:
    """The config a dict of fields describes (PyTorch keyword arguments or our own fields)."""
    return AdapterConfig.from_dict(d)


def load_config_file(path: str) -> Any:
    """A model config from a JSON file of PyTorch keyword arguments (or our own fields)."""
    d = read_json(path)
    try:
        return config_from_dict(d)
    except (TypeError, ConfigError) as e:
        raise ConfigError(f"{path}: {e}") from None


PRESETS = _REGISTRY  # names, in registration order (``list(PRESETS)``)
