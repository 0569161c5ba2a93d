"""One training-mode step of the tiny DINOv3 adapter against the PyTorch reference: the loss,
every adapter parameter gradient and the BatchNorm running statistics after the step. The
trunk is frozen (upstream: ``requires_grad_(False)``): it has no gradient there and none here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_adapter.convert.keys import key_table
from jax_adapter.training import exclude_frozen
from conftest import load_npz, rel_err
from dinov3_helpers import adapter_model as fixture_model


@pytest.fixture(scope="module")
def step():
    model = fixture_model()
    model.train()
    io = load_npz("dinov3_adapter_tiny_train_step.npz")
    images = jnp.asarray(io["input"].transpose(0, 2, 3, 1))
    cots = [jnp.asarray(io[f"cotangent_f{i}"].transpose(0, 2, 3, 1)) for i in range(1, 5)]
    trainable = exclude_frozen(nnx.Param, model)
    graph, params, rest = nnx.split(model, trainable, ...)

    @jax.jit
    def loss_and_grad(params, rest):
        m = nnx.merge(graph, params, rest)

        def loss_fn(m):
            out = m(images)
            return sum((o * c).sum() for o, c in zip(out.features, cots))

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable))(m)
        return loss, grads, nnx.state(m, nnx.BatchStat)

    loss, grads, stats = loss_and_grad(params, rest)
    nnx.update(model, stats)
    return model, io, loss, grads


def test_loss(step):
    _, io, loss, _ = step
    assert abs(float(loss) - float(io["loss"])) <= 1e-4 * abs(float(io["loss"]))


# ``spm.fc1.bias`` feeds a training-mode BatchNorm directly (c1 = fc1(stem) + up(c2) -> norm1):
# the batch mean removes it, so its true gradient is zero and the stored value is rounding noise.
# (``up.bias`` too, in exact arithmetic; the reference's value is noise-sized as well.)
ZERO_GRADIENT = ("spm.fc1.bias", "up.bias")


def test_every_adapter_parameter_gradient(step):
    # Tolerance: 1e-3 relative to each array's largest value.
    model, io, _, grads = step
    table = key_table(model)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(grads)}
    expected = {k[len("grad/"):]: v for k, v in io.items() if k.startswith("grad/")}
    ours = {table[p].torch_key: table[p].to_torch(np.asarray(v[...])) for p, v in flat.items()}
    assert not [k for k in ours if k.startswith("backbone.")]
    assert set(ours) == set(expected)
    worst = {k: rel_err(ours[k], expected[k]) for k in expected if k not in ZERO_GRADIENT}
    bad = {k: e for k, e in worst.items() if not e < 1e-3}
    assert not bad, bad
    for k in ZERO_GRADIENT:
        # Both sides must be rounding noise: five orders below the layer's weight gradient.
        scale = np.abs(expected[k.replace(".bias", ".weight")]).max()
        assert np.abs(expected[k]).max() < 1e-5 * scale, k
        assert np.abs(ours[k]).max() < 1e-5 * scale, k


def test_batchnorm_running_statistics_after_step(step):
    # The running variance uses the unbiased batch variance, as in PyTorch.
    model, io, _, _ = step
    table = key_table(model)
    stats = {table[tuple(p)].torch_key: np.asarray(v[...])
             for p, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}
    expected = {k[len("batch_stats_after/"):]: v for k, v in io.items() if k.startswith("batch_stats_after/")}
    assert len(expected) == 20 and set(expected) <= set(stats)
    for k, v in expected.items():
        np.testing.assert_allclose(stats[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
