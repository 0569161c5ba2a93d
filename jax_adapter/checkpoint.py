"""This library's checkpoint directories: writing, reading, and building models from them.

Layout of ``DST/``::

    jax_adapter.json   {"format_version", "kind", "config", "provenance"}
    arrays/            orbax StandardCheckpointer tree: {dotted module path: array}

``kind`` names the model class (:data:`MODEL_KINDS`). Writing goes to a temporary sibling that is
renamed into place only when complete, so an interrupted or failed write leaves nothing at
``DST`` (and an existing ``DST`` untouched).

Models are built abstractly (``nnx.eval_shape``: shapes only) and filled with the stored
arrays, so loading a 1.1B-parameter ViT-g neither spends time on a random initialisation nor
holds a second copy of the weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Collection, Dict, Iterator, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jax_adapter.errors import CheckpointError
from jax_adapter.models.dinov2 import DinoV2, DinoV2Config
from jax_adapter.models.dinov2_adapter import AdapterConfig, DinoAdapter
from jax_adapter.models.dinov3 import DinoV3, DinoV3Config
from jax_adapter.models.dinov3_adapter import DinoV3Adapter, DinoV3AdapterConfig

Model = Union[DinoAdapter, DinoV2]
STORED = nnx.Any(nnx.Param, nnx.BatchStat)  # what checkpoints hold

# Checkpoint kind -> (model class, config class). Each model family registers its kinds.
MODEL_KINDS: Dict[str, Tuple[type, type]] = {
    "adapter": (DinoAdapter, AdapterConfig),
    "dinov2": (DinoV2, DinoV2Config),
    "dinov3": (DinoV3, DinoV3Config),
    "dinov3_adapter": (DinoV3Adapter, DinoV3AdapterConfig),
}


def register_kind(kind: str, model_cls: type, config_cls: type) -> None:
    MODEL_KINDS[kind] = (model_cls, config_cls)


def kind_of(model: nnx.Module) -> str:
    """The checkpoint kind of a model instance; ``CheckpointError`` for other modules."""
    for kind, (model_cls, _) in MODEL_KINDS.items():
        if type(model) is model_cls:
            return kind
    known = tuple(c for c, _ in MODEL_KINDS.values())
    if isinstance(getattr(model, "backbone", None), known):
        # A detector or segmenter around one of ours (the training example's SegmentationModel):
        # its head has no checkpoint kind, its backbone has.
        raise CheckpointError(
            f"cannot save a {type(model).__name__}: save its backbone, a "
            f"{type(model.backbone).__name__}: save_pretrained(model.backbone, dst)")
    raise CheckpointError(
        f"cannot save a {type(model).__name__}: expected one of "
        f"{', '.join(c.__name__ for c, _ in MODEL_KINDS.values())} (for a model that holds a "
        f"backbone, save the backbone)")


def _config(kind: str, config: Any):
    if kind not in MODEL_KINDS:
        raise CheckpointError(f"unknown model kind {kind!r}")
    config_cls = MODEL_KINDS[kind][1]
    if isinstance(config, config_cls):
        return config
    return config_cls.from_dict(dict(config))


def build_model(kind: str, config: Any, seed: int = 0) -> Model:
    """A randomly initialised model of ``kind`` (``"adapter"``: DinoAdapter, ``"dinov2"``: DinoV2,
    ...; see :data:`MODEL_KINDS`)."""
    cfg = _config(kind, config)
    return MODEL_KINDS[kind][0](cfg, rngs=nnx.Rngs(seed))


def abstract_model(kind: str, config: Any) -> Model:
    """The model with ``jax.ShapeDtypeStruct`` in place of arrays (no memory, no init)."""
    cfg = _config(kind, config)
    return nnx.eval_shape(lambda: build_model(kind, cfg))


def _flat(state) -> Dict[str, nnx.Variable]:
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
        flat = _flat(nnx.state(build_model(kind, cfg, seed)))
        return {k: v.get_value() for k, v in flat.items() if k in wanted}

    return init() if wanted else {}


def fill_model(model: Model, kind: str, arrays: Dict[str, Any], *, source: str = "arrays", seed: int = 0,
               consume: bool = False) -> Model:
    """Give an abstract ``model`` the parameter and batch-statistic ``arrays`` (``{dotted path:
    array}``, cast to the model's dtypes); other state (RNG streams) is initialised fresh.

    A missing, unexpected or mis-shaped array is a ``ValueError`` naming it. With ``consume``,
    each array is removed from ``arrays`` once placed (bounded memory for large models).
    """
    state = nnx.state(model)
    flat = _flat(state)
    stored = _flat(nnx.state(model, STORED))
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


def load_pretrained(path: str) -> Model:
    """The model stored in a checkpoint directory written by ``jax-adapter convert``.

    Returns a :class:`DinoAdapter` or, for a ``--trunk-only`` checkpoint, a :class:`DinoV2`
    (whose call on NHWC images gives ``DinoV2Output(cls [B, D], registers [B, R, D],
    patches [B, N, D])``), in eval mode.
    """
    record = read_record(path)
    kind = record["kind"]
    try:
        model = abstract_model(kind, record["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid config in {RECORD} ({e})") from None
    fill_model(model, kind, read_arrays(path), source=path, consume=True)
    model.eval()
    return model


def save_pretrained(model: nnx.Module, dst: str, *, overwrite: bool = False,
                    dtype: Optional[str] = None, provenance: Optional[Dict[str, Any]] = None) -> None:
    """Write ``model`` (a DinoAdapter, DinoV2, ... with a ``cfg``) as a checkpoint directory
    that :func:`load_pretrained` and ``jax-adapter export`` read; atomic, like every write here.

    ``dtype`` (``"float32"`` / ``"bfloat16"``) casts the stored floating arrays.
    """
    kind = kind_of(model)
    save(dst, module_arrays(model), kind, model.cfg.to_dict(), provenance, overwrite=overwrite,
         dtype=dtype)


RECORD = "jax_adapter.json"
ARRAYS = "arrays"
FORMAT_VERSION = 1


def module_arrays(model) -> Dict[str, np.ndarray]:
    """``{dotted path: numpy array}`` of a model's parameters and batch statistics (what a
    checkpoint directory stores)."""
    return {k: np.asarray(v.get_value()) for k, v in _flat(nnx.state(model, STORED)).items()}


def check_destination(dst: str, overwrite: bool) -> None:
    """Refuse an existing ``dst`` unless ``overwrite``, and a missing parent directory."""
    if os.path.lexists(dst) and not overwrite:
        raise CheckpointError(f"{dst}: destination exists (pass --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise CheckpointError(f"{dst}: parent directory {parent} does not exist")


@contextlib.contextmanager
def atomic_path(dst: str, *, overwrite: bool, directory: bool) -> Iterator[str]:
    """Yield a temporary path beside ``dst``; on success it replaces ``dst``, on error it is
    removed and ``dst`` is left as it was."""
    check_destination(dst, overwrite)
    parent = os.path.dirname(os.path.abspath(dst))
    tmp = tempfile.mkdtemp(prefix=".jax_adapter-", dir=parent)
    target = tmp if directory else os.path.join(tmp, os.path.basename(dst))
    try:
        yield target
        if not os.path.lexists(dst):
            os.replace(target, dst)
        else:
            # os.replace cannot replace a non-empty directory: move the old one aside first,
            # and back if the final rename fails.
            old = tempfile.mkdtemp(prefix=".jax_adapter-old-", dir=parent)
            aside = os.path.join(old, "previous")
            os.replace(dst, aside)
            try:
                os.replace(target, dst)
            except BaseException:
                os.replace(aside, dst)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save(
    dst: str, arrays, kind: str, config: Dict[str, Any],
    provenance: Optional[Dict[str, Any]] = None, *, overwrite: bool = False,
    dtype: Optional[str] = None,
) -> None:
    """Write ``{dotted path: array}`` (or a model's parameters) to ``dst`` atomically.

    ``dtype`` casts floating arrays (``"float32"`` / ``"bfloat16"``) before writing.
    """
    import orbax.checkpoint as ocp

    if kind not in MODEL_KINDS:
        raise CheckpointError(f"unknown checkpoint kind {kind!r}")
    if not isinstance(arrays, Mapping):
        arrays = module_arrays(arrays)
    if dtype is not None:
        arrays = {k: cast_floats(v, dtype) for k, v in arrays.items()}
    record = {"format_version": FORMAT_VERSION, "kind": kind, "config": config,
              "provenance": provenance or {}}
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    # Numpy arrays written in place: orbax's default handler deep-copies every host array
    # first (a second copy of a 4.5 GB ViT-g), and zstd compression buffers a third while
    # saving a few percent on float weights. Readers need no options (StandardCheckpointer).
    import jax

    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),  # (unused; silences a warning)
    )
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
    with atomic_path(dst, overwrite=overwrite, directory=True) as tmp:
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(os.path.join(tmp, ARRAYS), args=ocp.args.PyTreeSave(arrays))
        with open(os.path.join(tmp, RECORD), "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RECORD))


def read_record(path: str) -> Dict[str, Any]:
    record_path = os.path.join(path, RECORD)
    if not os.path.isfile(record_path):
        raise CheckpointError(f"{path}: not a jax-adapter checkpoint directory (no {RECORD})")
    with open(record_path) as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{record_path}: corrupt record ({e})") from e
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION \
            or record.get("kind") not in MODEL_KINDS:
        raise CheckpointError(f"{record_path}: unsupported record (version {record.get('format_version')}, "
                         f"kind {record.get('kind')})")
    return record


def _arrays_dir(path: str) -> str:
    d = os.path.abspath(os.path.join(path, ARRAYS))
    if not os.path.isdir(d):
        raise CheckpointError(f"{path}: checkpoint has no {ARRAYS}/ directory")
    return d


def read_arrays(path: str) -> Dict[str, np.ndarray]:
    """``{dotted path: numpy array}`` as stored."""
    import orbax.checkpoint as ocp

    arrays_dir = _arrays_dir(path)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(arrays_dir)
    except Exception as e:  # orbax/tensorstore raise many types for damaged directories
        raise CheckpointError(f"{path}: cannot read the stored arrays ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from e
    return {k: np.asarray(v) for k, v in tree.items()}


def array_shapes(path: str) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    """``{dotted path: (shape, dtype)}`` from the stored metadata, without reading arrays."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(_arrays_dir(path))
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    return {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in tree.items()}


def write_file(dst: str, writer: Callable[[str], None], *, overwrite: bool) -> None:
    """Run ``writer(tmp_path)`` and move the result to ``dst`` only if it succeeded."""
    with atomic_path(dst, overwrite=overwrite, directory=False) as tmp:
        writer(tmp)


def _is_float(dt: np.dtype) -> bool:
    return np.issubdtype(dt, np.floating) or dt == np.dtype(ml_dtypes.bfloat16)


def numpy_dtype(name: str) -> np.dtype:
    """``"float32"`` / ``"bfloat16"`` / ... as a numpy dtype (bfloat16 from ml_dtypes)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def cast_floats(a: np.ndarray, dtype: Optional[str]) -> np.ndarray:
    """``a`` in ``dtype`` if it is floating (integers such as counters are left alone)."""
    if dtype is None or not _is_float(a.dtype) or a.dtype == numpy_dtype(dtype):
        return a
    return a.astype(numpy_dtype(dtype))
