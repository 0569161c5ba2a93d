"""One training-mode step of each family's tiny adapter against its PyTorch reference: the loss,
every trained parameter's gradient and the BatchNorm running statistics after the step. The
DINOv3 trunk is frozen (upstream: ``requires_grad_(False)``): it has no gradient there and none
here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_adapter.convert.keys import key_table
from jax_adapter.training import exclude_frozen
from tests.helpers import ZERO_GRADIENT, dinov3_adapter, load_npz, nhwc, rel_err, seed_adapter

pytestmark = pytest.mark.torch

# fixture name, model, whether the reference's loss includes the ViT map, BatchNorm count.
FAMILIES = {
    "dinov2": ("seed_adapter_tiny_train_step.npz", seed_adapter, True, None),
    "dinov3": ("dinov3_adapter_tiny_train_step.npz", dinov3_adapter, False, 20),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def step(request):
    npz, build, with_vit, n_stats = FAMILIES[request.param]
    model = build()
    model.train()
    io = load_npz(npz)
    images = jnp.asarray(nhwc(io["input"]))
    cots = [jnp.asarray(nhwc(io[f"cotangent_f{i}"])) for i in range(1, 5)]
    if with_vit:
        cots.append(jnp.asarray(nhwc(io["cotangent_x_out"])))
    trainable = exclude_frozen(nnx.Param, model)
    graph, params, rest = nnx.split(model, trainable, ...)

    @jax.jit
    def loss_and_grad(params, rest):
        m = nnx.merge(graph, params, rest)

        def loss_fn(m):
            out = m(images)
            return sum((o * c).sum() for o, c in zip(out.features + (out.vit,), cots))

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable))(m)
        return loss, grads, nnx.state(m, nnx.BatchStat)

    loss, grads, stats = loss_and_grad(params, rest)
    nnx.update(model, stats)
    return model, io, loss, grads, n_stats


def test_loss(step):
    # Tolerance: 1e-4 relative.
    _, io, loss, _, _ = step
    assert abs(float(loss) - float(io["loss"])) <= 1e-4 * abs(float(io["loss"]))


def test_every_trained_parameter_gradient(step):
    # Tolerance: 1e-3 relative to each array's largest value.
    model, io, _, grads, _ = step
    table = key_table(model)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(grads)}
    expected = {k[len("grad/"):]: v for k, v in io.items() if k.startswith("grad/")}
    ours = {table[p].torch_key: table[p].to_torch(np.asarray(v[...])) for p, v in flat.items()}
    assert set(ours) == set(expected)  # the DINOv3 trunk has none on either side
    worst = {k: rel_err(ours[k], expected[k]) for k in expected if k not in ZERO_GRADIENT}
    bad = {k: e for k, e in worst.items() if not e < 1e-3}
    assert not bad, bad
    for k in ZERO_GRADIENT:
        # Both sides must be rounding noise: five orders below the layer's weight gradient.
        scale = np.abs(expected[k.replace(".bias", ".weight")]).max()
        assert np.abs(expected[k]).max() < 1e-5 * scale, k
        assert np.abs(ours[k]).max() < 1e-5 * scale, k


def test_batchnorm_running_statistics_after_step(step):
    # The running variance uses the unbiased batch variance, as in PyTorch. Tolerance 1e-5.
    model, io, _, _, n_stats = step
    table = key_table(model)
    stats = {table[tuple(p)].torch_key: np.asarray(v[...])
             for p, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}
    expected = {k[len("batch_stats_after/"):]: v for k, v in io.items() if k.startswith("batch_stats_after/")}
    assert expected and set(expected) <= set(stats)
    assert n_stats is None or len(expected) == n_stats
    for k, v in expected.items():
        np.testing.assert_allclose(stats[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
