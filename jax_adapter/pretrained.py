"""Models by name, with or without weights, and back to disk.

- :func:`create_model`: a registered architecture (``jax_adapter.list_models()``), randomly
  initialised or with pretrained weights (``jax_adapter.list_pretrained()``, a URL, a local
  file, an ``hf-hub:`` name);
- :func:`load_pretrained`: a checkpoint directory, or anything ``jax-adapter convert`` reads,
  fetched and converted once;
- :func:`save_pretrained` / :func:`load_checkpoint`: this library's checkpoint directories.

The composition is registry -> :mod:`jax_adapter.hub` (a name to local weights) ->
:func:`jax_adapter.convert.pipeline.convert_file` -> :mod:`jax_adapter.checkpoint`. The
converted result is cached under ``$JAX_ADAPTER_CACHE/checkpoints/<key>``, keyed by the digest
of the source's identity (sha256 of a downloaded file, the commit of a Hugging Face snapshot, or
path, size and modification time of a local source) and of the conversion options. Processes
sharing the cache convert an entry once: the conversion runs under a file lock, and the others
wait for it and load the result. The converters are imported inside the functions that use
them: ``jax_adapter.convert`` imports the model package, never the other way.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Optional, TextIO, Union

from flax import nnx

from jax_adapter import checkpoint, hub, registry
from jax_adapter.errors import CheckpointError, ConversionError, FetchError
from jax_adapter.files import file_lock, read_json
from jax_adapter.models.build import abstract_model, build_model, fill_model, kind_of, model_arrays

# Bump when the conversion of the same source with the same options gives different arrays.
CONVERTER_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Checkpoint directories <-> models


def load_checkpoint(path: str) -> nnx.Module:
    """The model stored in a checkpoint directory (``jax-adapter convert``'s output or
    :func:`save_pretrained`'s), in eval mode: a ``DinoV2Adapter``, ``DinoV2``, ``DinoV3`` or
    ``DinoV3Adapter`` as its record says."""
    record = checkpoint.read_record(path)
    kind = record["kind"]
    try:
        model = abstract_model(kind, record["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid config in {checkpoint.RECORD} ({e})") from None
    fill_model(model, kind, checkpoint.read_arrays(path), source=path, consume=True)
    model.eval()
    return model


def save_pretrained(model: nnx.Module, dst: str, *, overwrite: bool = False,
                    dtype: Optional[str] = None, provenance: Optional[Dict[str, Any]] = None) -> None:
    """Write ``model`` (any registered kind: a trunk or an adapter) as a checkpoint directory that
    :func:`load_pretrained` and ``jax-adapter export`` read; atomic, like every write here.

    ``dtype`` (``"float32"`` / ``"bfloat16"``) casts the stored floating arrays.
    """
    kind = kind_of(model)
    checkpoint.save(dst, model_arrays(model), kind, model.cfg.to_dict(), provenance,
                    overwrite=overwrite, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The conversion cache


def _config_identity(config: Any) -> Any:
    if config is None:
        return None
    if isinstance(config, str):
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

    ``name``: registered weights or an architecture with weights (:func:`hub.fetch`), an
    ``http(s)://`` URL, an ``hf-hub:ORG/NAME[@REVISION]`` name, or a local source file or Hugging
    Face folder. Options are those of ``jax-adapter convert``; registered weights use their
    architecture's config unless ``config`` or ``preset`` is given.
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
    # One conversion per entry across processes; the others find it done when they get the lock.
    with file_lock(hub.lock_path("checkpoints", key)):
        if not checkpoint.is_checkpoint(dst):
            # convert_file writes atomically: an interrupted conversion leaves no entry behind.
            convert_file(src, dst, config, preset=preset, prefix=prefix, trunk_only=trunk_only,
                         overwrite=True, dtype=dtype, progress=stream, origin=origin)
    return dst


def load_pretrained(
    name: str, config: Any = None, *, preset: Optional[str] = None, prefix: Optional[str] = None,
    trunk_only: bool = False, dtype: Optional[str] = None, stream: Optional[TextIO] = None,
    show_progress: Optional[bool] = None,
) -> nnx.Module:
    """A model, in eval mode, from a checkpoint directory or anything ``jax-adapter convert`` reads.

    - a checkpoint directory (``jax-adapter convert``'s output or :func:`save_pretrained`'s):
      loaded as it is;
    - registered weights (``"dinov2_vitb14.lvd142m"``, or an architecture with weights such as
      ``"dinov2_vitb14"``; see ``jax_adapter.list_pretrained()``), an ``http(s)://`` URL of a
      ``.pth`` / ``.safetensors`` (e.g. the signed URL of DINOv3 weights),
      ``"hf-hub:ORG/NAME[@REVISION]"``, or a local source file or Hugging Face folder: fetched and
      converted once, then loaded from the cache (``$JAX_ADAPTER_CACHE``, default
      ``~/.cache/jax-adapter``).

    Returns the family's adapter (a trunk-only source gets a freshly initialised adapter, as
    ``jax-adapter convert`` does), or with ``trunk_only`` the trunk alone (``.cls [B, D]``,
    ``.registers [B, R, D]``, ``.patches [B, N, D]``). The other options are
    ``jax-adapter convert``'s. :func:`create_model` builds by architecture name instead.
    """
    if os.path.isdir(name) and checkpoint.is_checkpoint(name):
        return load_checkpoint(name)
    try:
        path = cached_checkpoint(name, config, preset=preset, prefix=prefix, trunk_only=trunk_only,
                                 dtype=dtype, stream=stream, show_progress=show_progress)
    except ConversionError as e:
        if not os.path.isdir(name):
            raise
        # A folder is most often meant as a checkpoint directory: say that first.
        raise CheckpointError(f"{name}: not a jax-adapter checkpoint directory (no {checkpoint.RECORD}), "
                              f"nor a model folder to convert ({e})") from None
    return load_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# Models by architecture name


def create_model(name: str, pretrained: Union[bool, str] = False, *, seed: int = 0,
                 stream: Optional[TextIO] = None, **overrides: Any) -> nnx.Module:
    """The model of a registered architecture (``jax_adapter.list_models()``), in eval mode.

    ``name``: an architecture (``"dinov2_vitb14_adapter"``, ``"dinov3_vits16"``) or registered
    weights (``"dinov2_vitb14.lvd142m"``, which implies ``pretrained=True``). ``pretrained``:
    ``False`` for a random initialisation (``seed``); ``True`` for the architecture's default
    weights (an adapter takes its trunk's, with a fresh adapter); or a string: registered
    weights, a URL (the signed URL of gated DINOv3 weights), a local file or an ``hf-hub:`` name.
    ``overrides``: config fields to change (``dtype="bfloat16"``, ``with_cp=True``, ...).
    """
    if registry.is_weights(name) and not registry.is_architecture(name):
        weights = registry.weights(name)
        arch, source = registry.architecture(weights.architecture), weights.name
        pretrained = pretrained or True
    else:
        arch, source = registry.architecture(name), None
    kind = registry.kind(arch.kind)
    cfg = arch.config()
    if overrides:
        cfg = cfg.replace(**overrides)
    if not pretrained:
        model = build_model(kind.name, cfg, seed)
        model.eval()
        return model
    if isinstance(pretrained, str):
        source = pretrained
    elif source is None:
        available = registry.weights_of(arch.name)
        if not available:
            raise FetchError(f"{arch.name} has no registered weights (jax_adapter.list_pretrained() "
                             "lists them); pass pretrained=<URL, file or hf-hub name>")
        source = available[0].name
    path = cached_checkpoint(source, cfg, trunk_only=kind.role == "trunk", stream=stream)
    return load_checkpoint(path)


list_models = registry.list_models
list_pretrained = registry.list_pretrained
