"""The jitted data-parallel train step over a 1-D device mesh, and its state."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jax_adapter.errors import InputError
from jax_adapter.sharding import BATCH_AXIS
from jax_adapter.training.params import exclude_frozen

Batch = Any
# ``loss_fn(model, batch) -> (scalar loss, {name: scalar})``; it runs the model in train mode.
LossFn = Callable[[nnx.Module, Batch], Tuple[jax.Array, Dict[str, jax.Array]]]


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
        # Always-frozen submodules (the DINOv3 adapter's trunk) never train, whatever the
        # filter: no gradient, no optimizer state.
        trainable = exclude_frozen(trainable, model)
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
                raise InputError(
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

    def model(self, state: TrainState, *, train: bool = False) -> nnx.Module:
        """A model holding ``state``'s parameters and statistics, in eval mode (deterministic:
        no drop path, BatchNorm running statistics), ready for evaluation or
        :func:`jax_adapter.save_pretrained`; ``train=True`` keeps the training mode instead.

        It shares ``state``'s arrays, which the next step donates: build it after training.
        """
        model = nnx.merge(self.graph, state.params, state.frozen, state.batch_stats, self._other)
        # The graph was split from a module in train mode (as training needs).
        if train:
            model.train()
        else:
            model.eval()
        return model
