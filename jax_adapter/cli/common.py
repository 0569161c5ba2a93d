"""What the commands share: their error type and the parsing of sizes and model names."""

from __future__ import annotations

from typing import Any, Optional, Tuple

from jax_adapter.errors import ConfigError


class CliError(ConfigError):
    """A bad command-line option or combination."""


def parse_size(s: str, option: str = "size") -> Tuple[int, int]:
    """``"256x704"`` -> ``(256, 704)``."""
    try:
        h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise CliError(f"bad {option} {s!r}: expected HxW, e.g. 256x704") from None
    return h, w


def model_config(preset: Optional[str] = None, config: Optional[str] = None, *, role: str = "adapter",
                 default: Optional[str] = None) -> Any:
    """The config ``--preset`` (a registered model or a JSON config file) or ``--config`` (a JSON
    file) names, as an adapter (a trunk name gives its adapter: ``dinov2_vitb14``) or a trunk."""
    from jax_adapter import registry
    from jax_adapter.models import config_for, load_config_file

    if config and preset:
        raise CliError("give --config or --preset, not both")
    name = preset or default
    if config:
        cfg = load_config_file(config)
    elif name is None:
        raise CliError("the model config is needed: pass --config CONFIG.json or --preset NAME")
    elif registry.is_architecture(name):
        cfg = registry.config_of(registry.in_role(name, role))
    else:
        cfg = config_for(name)
    kind = registry.kind_of_config(cfg)
    if kind is None or kind.role != role:
        raise CliError(f"--preset {name!r} is a {type(cfg).__name__} (a trunk alone): this command needs "
                       f"an {role} preset or config (e.g. dinov3_vits16_adapter)")
    return cfg
