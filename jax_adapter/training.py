"""Training with the backbone: a jitted functional train step, the ViT-Adapter optimizer recipe,
data parallelism over a device mesh and whole-train-state checkpoints.

The pieces, smallest first:

* :func:`trainable_filter`, :func:`layer_id`: which parameters train (the DINOv2 trunk can be
  frozen) and which ViT depth each one sits at (for layer-wise learning-rate decay).
* :func:`make_optimizer`: AdamW, linear warmup then cosine decay, layer-wise decay
  ``decay ** (depth + 1 - layer_id)``, no weight decay on vectors and embeddings.
* :class:`TrainStep`: splits an NNX model into its graph and state and jits one pure function
  ``(TrainState, batch) -> (TrainState, metrics)`` over a 1-D device mesh (batch split over
  ``BATCH_AXIS``, state replicated), donating the state. Frozen parameters get no gradient and no
  optimizer state. BatchNorm statistics are taken over the global batch (SyncBatchNorm
  semantics): the SPMD partitioner inserts the cross-device reductions.
* :class:`Checkpoints`: orbax ``CheckpointManager`` over the whole :class:`TrainState`
  (parameters, batch statistics, optimizer state, step, rng): periodic, keep-last-N, atomic.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Hashable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jax_adapter.deform_attn import BATCH_AXIS

Path = Tuple[Hashable, ...]
Batch = Any
# ``loss_fn(model, batch) -> (scalar loss, {name: scalar})``; it runs the model in train mode.
LossFn = Callable[[nnx.Module, Batch], Tuple[jax.Array, Dict[str, jax.Array]]]

# Top-level names of the DINOv2 trunk inside a DinoAdapter (or DinoV2).
EMBEDDING_NAMES = ("patch_embed", "cls_token", "pos_embed", "register_tokens")
TRUNK_NAMES = EMBEDDING_NAMES + ("blocks", "norm")
# Parameters without weight decay besides vectors (biases, norms, LayerScale, gamma).
NO_DECAY_NAMES = ("cls_token", "pos_embed", "register_tokens", "level_embed")


# --------------------------------------------------------------------------- parameter groups

def _relative(path: Sequence[Hashable], backbone_path: Sequence[Hashable]) -> Optional[Path]:
    """``path`` below ``backbone_path``, or ``None`` when it lies outside the backbone."""
    n = len(backbone_path)
    return tuple(path[n:]) if tuple(path[:n]) == tuple(backbone_path) else None


def is_trunk(path: Sequence[Hashable], backbone_path: Sequence[Hashable] = ()) -> bool:
    """Whether a state path belongs to the DINOv2 trunk of the backbone at ``backbone_path``."""
    rel = _relative(path, backbone_path)
    return bool(rel) and rel[0] in TRUNK_NAMES


def trainable_filter(freeze_trunk: bool = False, backbone_path: Sequence[Hashable] = ()):
    """NNX filter of the trained parameters: all ``nnx.Param`` or all but the trunk's."""
    if not freeze_trunk:
        return nnx.Param
    bp = tuple(backbone_path)
    return nnx.All(nnx.Param, nnx.Not(lambda path, _: is_trunk(path, bp)))


def layer_id(path: Sequence[Hashable], depth: int, backbone_path: Sequence[Hashable] = ()) -> int:
    """ViT-Adapter's layer id: embeddings 0, ``blocks.i`` i+1, everything else depth+1."""
    rel = _relative(path, backbone_path)
    if rel:
        if rel[0] in EMBEDDING_NAMES:
            return 0
        if rel[0] == "blocks":
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


# --------------------------------------------------------------------------- optimizer

@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup + cosine decay and layer-wise learning-rate decay.

    ``total_steps`` is the schedule's length (warmup included); ``layer_decay`` 1.0 turns the
    layer-wise decay off (ViT-Adapter uses 0.65 for ViT-B, 0.9 for ViT-L).
    """

    learning_rate: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 0
    total_steps: int = 1000
    end_lr_ratio: float = 0.0
    layer_decay: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_grad_norm: Optional[float] = None


def lr_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then cosine decay to ``end_lr_ratio`` of it."""
    total = max(cfg.total_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.warmup_steps, total, end_value=cfg.learning_rate * cfg.end_lr_ratio
    )


def _scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiply each update by a fixed per-leaf factor (stateless)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(
    cfg: OptimizerConfig, params: Any, *, depth: int, backbone_path: Sequence[Hashable] = ()
) -> optax.GradientTransformation:
    """The ViT-Adapter AdamW for the trained ``params`` (the state to be optimised).

    The update of a parameter with layer id ``i`` is ``-lr(t) * decay**(depth+1-i) * (adam +
    wd * p)``, as PyTorch's AdamW computes it for a parameter group with that learning rate.
    """
    parts = []
    if cfg.clip_grad_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    parts += [
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=weight_decay_mask(params)),
        optax.scale_by_learning_rate(lr_schedule(cfg)),
    ]
    if cfg.layer_decay != 1.0:
        parts.append(_scale_by_tree(lr_scales(params, depth, cfg.layer_decay, backbone_path)))
    return optax.chain(*parts)


# --------------------------------------------------------------------------- mesh and state

def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes) named ``BATCH_AXIS``."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (BATCH_AXIS,), axis_types=(AxisType.Auto,))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step reads and writes (and a checkpoint holds).

    ``params``: the trained parameters; ``frozen``: the others (unchanged by a step);
    ``batch_stats``: BatchNorm running statistics; ``opt_state``: the optimizer's state for
    ``params`` only; ``step``: int32 scalar; ``rng``: raw ``uint32[2]`` key from which the
    stochastic layers (drop path) of step ``t`` draw ``fold_in(rng, t)``.
    """

    step: jax.Array
    params: Any
    frozen: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    def replace(self, **changes) -> "TrainState":
        return dataclasses.replace(self, **changes)


def replicate(tree: Any, sharding: NamedSharding) -> Any:
    """Place every array of ``tree`` (the same value on every process) replicated on ``sharding``.

    One process: a device-to-device copy. Several: ``device_put`` accepts only addressable
    shardings, so each process builds its shards of the global array from its host copy.
    """
    def place(x):
        if not isinstance(x, jax.Array):
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = place(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(place, tree)


def reseed_streams(model: nnx.Module, key: jax.Array) -> None:
    """Give every random stream of ``model`` (drop path) a key derived from ``key``."""
    tags = sorted({s.key.tag for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)})
    if tags:
        nnx.reseed(model, **{t: jax.random.fold_in(key, i) for i, t in enumerate(tags)})


class TrainStep:
    """A jitted, data-parallel train step for ``model`` and ``loss_fn``.

    ``step(state, batch) -> (state, metrics)``: ``batch`` is a pytree of global arrays with the
    batch on axis 0 (see :meth:`shard_batch`); ``metrics`` holds ``loss``, ``grad_norm`` and
    whatever ``loss_fn`` returns, replicated. The same code runs on one device, on many, and on
    many hosts: only ``mesh`` changes. Put the model in train mode (``model.train()``) first.

    :meth:`init` hands the model's arrays to the state, and each step donates its input state:
    afterwards use :meth:`model` (``step.model(state)``), not the original module.
    """

    def __init__(
        self,
        model: nnx.Module,
        loss_fn: LossFn,
        optimizer: Callable[[Any], optax.GradientTransformation] | optax.GradientTransformation,
        *,
        trainable: Any = nnx.Param,
        mesh: Optional[Mesh] = None,
        donate: bool = True,
    ):
        """``optimizer``: a transformation, or a function of the trained parameters that builds
        one (as :func:`make_optimizer` needs them for its per-parameter factors)."""
        self.mesh = make_mesh() if mesh is None else mesh
        self.loss_fn = loss_fn
        self.trainable = trainable
        self.graph, params, frozen, batch_stats, self._other = nnx.split(
            model, trainable, nnx.Param, nnx.BatchStat, ...
        )
        self.optimizer = optimizer if isinstance(optimizer, optax.GradientTransformation) else optimizer(params)
        self._init_parts = (params, frozen, batch_stats)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(BATCH_AXIS))
        # Concrete arrays go to the mesh; an abstract model (``nnx.eval_shape``) can still be
        # lowered with :meth:`abstract_state`, e.g. to read the memory a step needs.
        self._other = replicate(self._other, self.replicated)
        self._jitted = jax.jit(
            self._step,
            in_shardings=(self.replicated, self.replicated, self.batch_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=(0,) if donate else (),
        )

    # The pure function that is jitted.
    def _step(self, state: TrainState, other: Any, batch: Batch):
        model = nnx.merge(self.graph, state.params, state.frozen, state.batch_stats, other)
        reseed_streams(model, jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step))
        diff = nnx.DiffState(0, self.trainable)
        (loss, aux), grads = nnx.value_and_grad(self.loss_fn, argnums=diff, has_aux=True)(model, batch)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(
            step=state.step + 1, params=params, batch_stats=nnx.state(model, nnx.BatchStat),
            opt_state=opt_state,
        )
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

    def init(self, seed: int = 0) -> TrainState:
        """The initial state (from the model's current values), replicated over the mesh."""
        params, frozen, batch_stats = self._init_parts
        state = TrainState(
            step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, batch_stats=batch_stats,
            opt_state=self.optimizer.init(params), rng=jax.random.PRNGKey(seed),
        )
        return replicate(state, self.replicated)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of :meth:`init`'s result, without computing it."""
        params, frozen, batch_stats = self._init_parts
        abstract = jax.eval_shape(
            lambda p: TrainState(
                step=jnp.zeros((), jnp.int32), params=p, frozen=frozen, batch_stats=batch_stats,
                opt_state=self.optimizer.init(p), rng=jax.random.PRNGKey(0),
            ),
            params,
        )
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.replicated), abstract
        )

    def shard_batch(self, local_batch: Batch) -> Batch:
        """This process's part of the global batch (numpy, batch on axis 0) -> global arrays
        split over the mesh. On one host the local batch is the global batch."""
        n = self.mesh.devices.size
        for x in jax.tree.leaves(local_batch):
            if (x.shape[0] * jax.process_count()) % n:
                raise ValueError(
                    f"the global batch ({x.shape[0]} per process x {jax.process_count()}) is not "
                    f"divisible by the {n} devices of the mesh"
                )
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)),
            local_batch,
        )

    def __call__(self, state: TrainState, batch: Batch) -> Tuple[TrainState, Dict[str, jax.Array]]:
        # The mesh in context lets layers place per-device work (the deformable-attention
        # sampling core runs under shard_map over the batch axis).
        with jax.set_mesh(self.mesh):
            return self._jitted(state, self._other, batch)

    def lower(self, state: TrainState, batch: Batch) -> jax.stages.Lowered:
        """The lowered step, e.g. for ``.compile().memory_analysis()``."""
        with jax.set_mesh(self.mesh):
            return self._jitted.lower(state, self._other, batch)

    def model(self, state: TrainState) -> nnx.Module:
        """A model holding ``state``'s parameters and statistics (e.g. for evaluation or export)."""
        return nnx.merge(self.graph, state.params, state.frozen, state.batch_stats, self._other)


# --------------------------------------------------------------------------- checkpoints

def _flat(tree: Any) -> Dict[str, Any]:
    """A pytree as ``{"params.blocks.0.attn.qkv.kernel.value": leaf}`` (orbax wants plain
    containers; nnx ``State`` and optax named tuples are not)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(kp, simple=True, separator="."): x for kp, x in leaves}


class Checkpoints:
    """Periodic, keep-last-N, atomic checkpoints of :class:`TrainState` under ``directory``.

    Each checkpoint is a step directory written by orbax into a temporary name and renamed when
    complete, so an interrupted save never appears as the latest checkpoint. ``save`` writes
    when ``step % save_every == 0`` (or when forced); writing continues in the background
    (``wait()`` blocks until it is done). All processes of a multi-host run call the same
    methods.
    """

    def __init__(self, directory: str, *, max_to_keep: Optional[int] = 3, save_every: int = 1):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self.save_every = max(int(save_every), 1)
        self._mgr = ocp.CheckpointManager(
            self.directory,
            item_handlers=ocp.StandardCheckpointHandler(),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def all_steps(self) -> Sequence[int]:
        return list(self._mgr.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._mgr.latest_step()

    def save(self, state: TrainState, *, force: bool = False) -> bool:
        """Save ``state`` under its step if due (or ``force``); returns whether it saved."""
        step = int(jax.device_get(state.step))
        if step in self._mgr.all_steps() or not (force or step % self.save_every == 0):
            return False
        # The manager's own interval logic also saves the first step it sees; decide here.
        return self._mgr.save(step, args=self._ocp.args.StandardSave(_flat(state)), force=True)

    def restore(self, like: TrainState, step: Optional[int] = None) -> TrainState:
        """The checkpoint of ``step`` (default: the latest) with ``like``'s structure and
        shardings (``like``: a state or :meth:`TrainStep.abstract_state`)."""
        step = self._latest_or(step)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
        target = {
            jax.tree_util.keystr(kp, simple=True, separator="."): jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=getattr(x, "sharding", None)
            )
            for kp, x in leaves
        }
        flat = self._mgr.restore(step, args=self._ocp.args.StandardRestore(target))
        return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in target])

    def read(self, step: Optional[int] = None) -> Dict[str, np.ndarray]:
        """The arrays of a checkpoint as ``{flat name: numpy array}`` (no model needed; read on
        this process's first device whatever the devices that wrote it)."""
        step = self._latest_or(step)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
                  for k, m in self._mgr.item_metadata(step).items()}
        flat = self._mgr.restore(step, args=self._ocp.args.StandardRestore(target))
        return {k: np.asarray(v) for k, v in flat.items()}

    def _latest_or(self, step: Optional[int]) -> int:
        step = self._mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()

