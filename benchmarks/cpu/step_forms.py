"""The adapter's forward+backward in the two forms the CPU benchmarks compare (no torch needed):
``nnx.jit`` of ``nnx.value_and_grad`` on the module, as a user's own loop is written, and
``jax.jit`` of a pure function of the split state, as ``jax_adapter.training.TrainStep`` does."""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_adapter import DinoAdapter
from jax_adapter.training.params import trainable_filter

LOOPS = ("user", "split")


def output_loss(m: DinoAdapter, images: jax.Array, cots: Sequence[jax.Array]) -> jax.Array:
    """``sum_i <out_i, cot_i>`` over the five outputs (four feature maps and the ViT map)."""
    out = m(images)
    return sum(jnp.vdot(o, c) for o, c in zip((*out.features, out.vit), cots))


def jax_step(model: DinoAdapter, freeze: bool, loop: str) -> Tuple[Callable, nnx.GraphDef, nnx.State]:
    """``(run(images, cots) -> (loss, grads), graph, rest)``: the model's train-mode
    forward+backward, gradients for the adapter only when ``freeze``.

    ``loop="split"``: the model split once into graph and state, ``jax.jit`` of a pure function
    of the state. ``loop="user"``: ``nnx.jit`` of ``nnx.value_and_grad`` called on the module
    itself."""
    model.train()
    filt = trainable_filter(freeze)
    graph, params, rest = nnx.split(model, filt, ...)
    if loop == "user":
        @nnx.jit
        def user_step(m, images, cots):
            return nnx.value_and_grad(output_loss, argnums=nnx.DiffState(0, filt))(m, images, cots)

        return (lambda images, cots: user_step(model, images, cots)), graph, rest

    @jax.jit
    def fn(params, rest, images, cots):
        m = nnx.merge(graph, params, rest)
        return nnx.value_and_grad(output_loss, argnums=nnx.DiffState(0, filt))(m, images, cots)

    return (lambda images, cots: fn(params, rest, images, cots)), graph, rest
