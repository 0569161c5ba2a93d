"""Parameter groups: which parameters train, their layer ids (layer-wise lr decay) and
which get weight decay."""

from __future__ import annotations

from typing import Any, Callable, Hashable, Optional, Sequence, Tuple

import jax
from flax import nnx

from jax_adapter import models, registry
from jax_adapter.models.base import trunk_names

Path = Tuple[Hashable, ...]


def _unique(names) -> Tuple[str, ...]:
    return tuple(dict.fromkeys(names))


# The trunks' parameter groups (the :class:`~jax_adapter.models.base.Trunk` protocol) of every
# registered family: embeddings (layer id 0), blocks, final norms. A DINOv2 adapter holds its
# trunk's parameters at its top level, as in PyTorch.
_TRUNKS = [k.model for k in registry.kinds() if k.role == "trunk"]
EMBEDDING_NAMES = _unique(n for t in _TRUNKS for n in t.EMBEDDINGS)
BLOCK_NAMES = _unique(t.BLOCKS for t in _TRUNKS)
TRUNK_NAMES = _unique(n for t in _TRUNKS for n in trunk_names(t))
# The attributes under which adapters hold their trunk as a separate module (the DINOv3
# adapter: ``backbone.blocks.0...``); everything below one is trunk.
NESTED_TRUNKS = _unique(k.model.TRUNK_PATH[0] for k in registry.kinds()
                        if k.role == "adapter" and k.model.TRUNK_PATH)
NESTED_TRUNK = NESTED_TRUNKS[0]  # earlier name
# Parameters without weight decay besides vectors (biases, norms, LayerScale, gamma): the
# trunks' token and position embeddings, and the adapters' level embedding.
NO_DECAY_NAMES = tuple(n for n in EMBEDDING_NAMES if n not in ("patch_embed", "rope_embed")) + ("level_embed",)
assert models  # the families are registered before the names above are read



def _relative(path: Sequence[Hashable], backbone_path: Sequence[Hashable]) -> Optional[Path]:
    """``path`` below ``backbone_path``, or ``None`` when it lies outside the backbone."""
    n = len(backbone_path)
    return tuple(path[n:]) if tuple(path[:n]) == tuple(backbone_path) else None


def is_trunk(path: Sequence[Hashable], backbone_path: Sequence[Hashable] = ()) -> bool:
    """Whether a state path belongs to the trunk of the backbone at ``backbone_path``: the
    DINOv2 trunk's top-level names, or everything under a nested trunk module (DINOv3)."""
    rel = _relative(path, backbone_path)
    return bool(rel) and (rel[0] in TRUNK_NAMES or rel[0] in NESTED_TRUNKS)


def frozen_paths(model: nnx.Module) -> Tuple[Path, ...]:
    """Paths of the submodules that never train: those a module names in its
    ``frozen_submodules`` (the DINOv3 adapter's trunk), wherever it sits in ``model``."""
    out = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            out += [tuple(path) + (name,) for name in getattr(node, "frozen_submodules", ())]
    return tuple(out)


def exclude_frozen(trainable: Any, model: nnx.Module) -> Any:
    """``trainable`` (an NNX filter) without the parameters of ``model``'s always-frozen
    submodules (:func:`frozen_paths`); ``trainable`` itself when there are none."""
    frozen = frozen_paths(model)
    if not frozen:
        return trainable

    def inside(path, _) -> bool:
        return any(tuple(path[:len(f)]) == f for f in frozen)

    return nnx.All(trainable, nnx.Not(inside))


def trainable_filter(freeze_trunk: bool = False, backbone_path: Sequence[Hashable] = ()):
    """NNX filter of the trained parameters: all ``nnx.Param`` or all but the trunk's."""
    if not freeze_trunk:
        return nnx.Param
    bp = tuple(backbone_path)
    return nnx.All(nnx.Param, nnx.Not(lambda path, _: is_trunk(path, bp)))


def layer_id(path: Sequence[Hashable], depth: int, backbone_path: Sequence[Hashable] = ()) -> int:
    """ViT-Adapter's layer id: embeddings 0, ``blocks.i`` i+1, everything else depth+1."""
    rel = _relative(path, backbone_path)
    if rel and rel[0] in NESTED_TRUNKS:
        rel = rel[1:]  # a separate trunk module: the same names one level down
    if rel:
        if rel[0] in EMBEDDING_NAMES:
            return 0
        if rel[0] in BLOCK_NAMES:
            return int(rel[1]) + 1
    return depth + 1


def path_names(keypath) -> Path:
    """``jax.tree_util`` key path -> plain names (dict keys, sequence indices, attributes)."""
    out = []
    for k in keypath:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
    return tuple(out)


def map_with_path(fn: Callable[[Path, jax.Array], Any], tree: Any) -> Any:
    """``tree`` with every array leaf replaced by ``fn(names, leaf)``; ``names`` is the leaf's
    state path (``("blocks", 0, "attn", "qkv", "kernel", ...)``)."""
    return jax.tree_util.tree_map_with_path(lambda kp, x: fn(path_names(kp), x), tree)


def lr_scales(params: Any, depth: int, decay: float, backbone_path: Sequence[Hashable] = ()) -> Any:
    """Per-parameter learning-rate factors ``decay ** (depth + 1 - layer_id)``."""
    return map_with_path(
        lambda p, _: float(decay ** (depth + 1 - layer_id(p, depth, backbone_path))), params
    )


def weight_decay_mask(params: Any) -> Any:
    """True where AdamW's weight decay applies: matrices and kernels, not vectors or embeddings."""
    return map_with_path(
        lambda p, x: x.ndim > 1 and not any(n in NO_DECAY_NAMES for n in p), params
    )
