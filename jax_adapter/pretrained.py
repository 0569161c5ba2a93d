"""``jax_adapter.load_pretrained(NAME)``: a checkpoint directory, a source file, a pretrained name,
a URL or an ``hf-hub:`` name, as a model in one call.

This is the one module of the model package, beside the command line, that composes it with the
converters (``tests/test_layout.py`` allows it): :mod:`jax_adapter.hub` resolves a name to local
weights, :func:`jax_adapter.convert.pipeline.convert_file` converts them, and the result is cached
under ``$JAX_ADAPTER_CACHE/checkpoints/<key>``, so the second call is a plain
:func:`jax_adapter.checkpoint.load_pretrained`. The converters are imported inside the function
that uses them: ``jax_adapter.convert`` imports ``jax_adapter``, so a module-level import would
be a cycle.

The key is the digest of the source's identity (sha256 of a downloaded file, the commit of a
Hugging Face snapshot, or path, size and modification time of a local source) and of the
conversion options, so different options never share an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional, TextIO

from jax_adapter import checkpoint, hub
from jax_adapter.errors import CheckpointError, ConversionError

# Bump when the conversion of the same source with the same options gives different arrays.
CONVERTER_VERSION = 1


def _config_identity(config: Any) -> Any:
    if config is None:
        return None
    if isinstance(config, str):
        from jax_adapter.presets import read_json

        return read_json(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config)


def _local_identity(path: str) -> str:
    st = os.stat(path)
    if os.path.isdir(path):
        # A model folder: its files' sizes and times (hashing gigabytes would cost a conversion).
        entries = sorted((n, os.stat(os.path.join(path, n)).st_size, os.stat(os.path.join(path, n)).st_mtime_ns)
                         for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
        return f"local:{os.path.abspath(path)}:{entries}"
    return f"local:{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def checkpoint_key(identity: str, **options: Any) -> str:
    """The cache key of converting the source ``identity`` with ``options``."""
    blob = json.dumps({"source": identity, "options": options, "converter": CONVERTER_VERSION,
                       "format": checkpoint.FORMAT_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached_checkpoint(
    name: str, config: Any = None, *, preset: Optional[str] = None, prefix: Optional[str] = None,
    trunk_only: bool = False, dtype: Optional[str] = None, stream: Optional[TextIO] = None,
    show_progress: Optional[bool] = None,
) -> str:
    """The converted checkpoint directory of ``name`` in the cache, converting it first if needed.

    ``name``: a pretrained name (:data:`jax_adapter.hub.PRETRAINED`), an ``http(s)://`` URL, an
    ``hf-hub:ORG/NAME[@REVISION]`` name, or a local source file or Hugging Face folder. Options
    are those of ``jax-adapter convert``; a pretrained name uses its preset unless ``config`` or
    ``preset`` is given.
    """
    if os.path.exists(name):
        src, identity, origin = name, _local_identity(name), None
    else:  # a name (hub.fetch says what is accepted if it is none)
        fetched = hub.fetch(name, stream=stream, show_progress=show_progress)
        src, identity, origin = fetched.path, fetched.identity, fetched.origin
        if config is None and preset is None:
            preset = fetched.preset
    key = checkpoint_key(identity, config=_config_identity(config), preset=preset, prefix=prefix,
                         trunk_only=trunk_only, dtype=dtype)
    dst = os.path.join(hub.cache_dir(), "checkpoints", key)
    if checkpoint.is_checkpoint(dst):
        return dst
    from jax_adapter.convert.pipeline import convert_file

    os.makedirs(os.path.dirname(dst), exist_ok=True)
    # convert_file writes atomically: an interrupted conversion leaves no entry behind.
    convert_file(src, dst, config, preset=preset, prefix=prefix, trunk_only=trunk_only,
                 overwrite=True, dtype=dtype, progress=stream, origin=origin)
    return dst


def load_pretrained(
    name: str, config: Any = None, *, preset: Optional[str] = None, prefix: Optional[str] = None,
    trunk_only: bool = False, dtype: Optional[str] = None, stream: Optional[TextIO] = None,
    show_progress: Optional[bool] = None,
):
    """A model, in eval mode, from a checkpoint directory or anything ``jax-adapter convert`` reads.

    - a checkpoint directory (``jax-adapter convert``'s output or :func:`save_pretrained`'s):
      loaded as it is;
    - a pretrained name (``"dinov2_vitb14"``, ``"dinov2_vitg14_reg"``; see
      :data:`jax_adapter.hub.PRETRAINED`), an ``http(s)://`` URL of a ``.pth`` / ``.safetensors``
      (e.g. the signed URL of DINOv3 weights), ``"hf-hub:ORG/NAME[@REVISION]"``, or a local source
      file or Hugging Face folder: fetched and converted once, then loaded from the cache
      (``$JAX_ADAPTER_CACHE``, default ``~/.cache/jax-adapter``).

    Returns a :class:`~jax_adapter.DinoAdapter` (a trunk-only source gets a freshly initialised
    adapter, as ``jax-adapter convert`` does), or with ``trunk_only`` the trunk alone
    (:class:`~jax_adapter.DinoV2`: ``.cls [B, D]``, ``.registers [B, R, D]``, ``.patches [B, N, D]``).
    The other options are ``jax-adapter convert``'s.
    """
    if os.path.isdir(name) and checkpoint.is_checkpoint(name):
        return checkpoint.load_pretrained(name)
    try:
        path = cached_checkpoint(name, config, preset=preset, prefix=prefix, trunk_only=trunk_only,
                                 dtype=dtype, stream=stream, show_progress=show_progress)
    except ConversionError as e:
        if not os.path.isdir(name):
            raise
        # A folder is most often meant as a checkpoint directory: say that first.
        raise CheckpointError(f"{name}: not a jax-adapter checkpoint directory (no {checkpoint.RECORD}), "
                              f"nor a model folder to convert ({e})") from None
    return checkpoint.load_pretrained(path)
