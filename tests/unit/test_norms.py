"""The norms' closed-form gradients (taken when compiling for a CPU) against differentiation of
the plain formulas in float64, and both formulations against PyTorch: training-mode
``BatchNorm2d`` and ``LayerNorm``."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_adapter
from jax_adapter.nn.layers import BatchNorm2d, LayerNorm, _batch_norm_train, batch_norm_train, layer_norm
from tests.helpers import rel_err

# float32 against PyTorch's float32 kernel: the same statistics, other summation orders.
F32_TOL = 1e-5
# The closed-form VJP against differentiating the formula, both in float64.
F64_TOL = 1e-12


def formulation(name: str):
    """Trace for a target whose rule picks ``name``: the CPU's ``"fused_vjp"``, a TPU's
    ``"autodiff"`` (the program still runs here: both are plain XLA, traced afresh)."""
    return contextlib.nullcontext() if name == "fused_vjp" else jax_adapter.target("tpu", ahead_of_time=False)


def test_closed_form_vjp_matches_differentiation_in_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((2, 5, 7, 3)) * 3 + 1)
        scale, bias, gmean, gvar = (jnp.asarray(rng.standard_normal(3)) for _ in range(4))
        gy = jnp.asarray(rng.standard_normal(x.shape))
        # Cotangents on the returned statistics too: the VJP must not assume they are unused.
        want_out, want_vjp = jax.vjp(lambda *a: _batch_norm_train(*a, 1e-5), x, scale, bias)
        got_out, got_vjp = jax.vjp(lambda *a: batch_norm_train(*a, 1e-5), x, scale, bias)
        for w, g in zip(want_out, got_out):
            assert g.dtype == jnp.float64
            assert float(jnp.max(jnp.abs(w - g))) < F64_TOL
        for w, g in zip(want_vjp((gy, gmean, gvar)), got_vjp((gy, gmean, gvar))):
            assert float(jnp.max(jnp.abs(w - g)) / jnp.max(jnp.abs(w))) < F64_TOL


@pytest.mark.torch
@pytest.mark.parametrize("impl", ["fused_vjp", "autodiff"])
def test_training_step_matches_pytorch(impl):
    rng = np.random.default_rng(1)
    c = 6
    x = (rng.standard_normal((2, 9, 11, c)) * 2 + 0.5).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    w, b = (rng.standard_normal(c).astype(np.float32) for _ in range(2))

    ref = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w))
        ref.bias.copy_(torch.from_numpy(b))
    ref.train()
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    ty = torch.relu(ref(tx))
    ty.backward(torch.from_numpy(g.transpose(0, 3, 1, 2).copy()))

    bn = BatchNorm2d(c, use_running_average=False)
    bn.scale[...] = jnp.asarray(w)
    bn.bias[...] = jnp.asarray(b)
    with formulation(impl) as t:
        def loss(m, x):
            return jnp.vdot(jax.nn.relu(m(x)), jnp.asarray(g))
        _, (grads, dx) = nnx.value_and_grad(loss, argnums=(nnx.DiffState(0, nnx.Param), 1))(bn, jnp.asarray(x))
    if t is not None:
        assert dict(t.decisions["batch_norm"]) == {"autodiff": 1}
    assert rel_err(np.asarray(dx), tx.grad.numpy().transpose(0, 2, 3, 1)) < F32_TOL
    assert rel_err(np.asarray(grads["scale"][...]), ref.weight.grad.numpy()) < F32_TOL
    assert rel_err(np.asarray(grads["bias"][...]), ref.bias.grad.numpy()) < F32_TOL
    # Running statistics: PyTorch's rule (unbiased variance), one update.
    assert rel_err(np.asarray(bn.mean[...]), ref.running_mean.numpy()) < F32_TOL
    assert rel_err(np.asarray(bn.var[...]), ref.running_var.numpy()) < F32_TOL
    assert int(bn.num_batches_tracked[...]) == 1


def test_cpu_records_the_closed_form_and_bfloat16_keeps_its_dtype():
    bn = BatchNorm2d(4, use_running_average=False)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 5, 4)), jnp.bfloat16)
    with jax_adapter.target("cpu") as t:
        y = bn(x)
    assert dict(t.decisions["batch_norm"]) == {"fused_vjp": 1}
    assert y.dtype == jnp.bfloat16 and bn.mean[...].dtype == jnp.float32
    dx = jax.grad(lambda x: jnp.sum(batch_norm_train(x, bn.scale[...], bn.bias[...], 1e-5)[0] ** 2))(x)
    assert dx.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(dx.astype(jnp.float32))))


# --- LayerNorm --------------------------------------------------------------------------------


def _ln(c: int, eps: float = 1e-6, dtype=None, param_dtype=np.float32) -> LayerNorm:
    m = layer_norm(c, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    m.scale[...] = jnp.asarray(rng.standard_normal(c).astype(param_dtype))
    m.bias[...] = jnp.asarray(rng.standard_normal(c).astype(param_dtype))
    return m


def _ln_grads(m, x, g, impl):
    """Value and gradients (input, scale, bias) of ``<m(x), g>`` under formulation ``impl``."""
    with formulation(impl) as t:
        def loss(m, x):
            return jnp.vdot(m(x), g)
        _, (grads, dx) = nnx.value_and_grad(loss, argnums=(nnx.DiffState(0, nnx.Param), 1))(m, x)
        y = m(x)
    if t is not None:
        assert set(t.decisions["layer_norm"]) == {"autodiff"}
    return y, dx, grads["scale"][...], grads["bias"][...]


@pytest.mark.parametrize("shape", [(2, 7, 5), (1, 9, 5), (3, 5)])
def test_layer_norm_closed_form_matches_flax_in_float64(shape):
    """Same values and gradients as ``nnx.LayerNorm`` differentiated by JAX, for leading axes of
    any size (a leading 1 included)."""
    with jax.enable_x64(True):
        m = _ln(5, param_dtype=np.float64)
        rng = np.random.default_rng(4)
        x = jnp.asarray(rng.standard_normal(shape) * 3 + 2)
        g = jnp.asarray(rng.standard_normal(shape))
        want = _ln_grads(m, x, g, "autodiff")
        got = _ln_grads(m, x, g, "fused_vjp")
        for w, a in zip(want, got):
            assert a.dtype == jnp.float64 and a.shape == w.shape
            assert rel_err(a, w) < F64_TOL


@pytest.mark.torch
@pytest.mark.parametrize("impl", ["fused_vjp", "autodiff"])
def test_layer_norm_matches_pytorch(impl):
    c = 16
    m = _ln(c)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 11, c)) * 2 + 1).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    ref = torch.nn.LayerNorm(c, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.array(m.scale[...])))
        ref.bias.copy_(torch.from_numpy(np.array(m.bias[...])))
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = ref(tx)
    ty.backward(torch.from_numpy(g))
    y, dx, ds, db = _ln_grads(m, jnp.asarray(x), jnp.asarray(g), impl)
    assert rel_err(y, ty.detach().numpy()) < F32_TOL
    assert rel_err(dx, tx.grad.numpy()) < F32_TOL
    assert rel_err(ds, ref.weight.grad.numpy()) < F32_TOL
    assert rel_err(db, ref.bias.grad.numpy()) < F32_TOL


def test_layer_norm_bfloat16_compute_and_cpu_record():
    """bfloat16 compute (``dtype``) with float32 parameters: the result in bfloat16 within one
    rounding of the float32 layer's; the CPU target records the closed form."""
    m16, m32 = _ln(8, dtype="bfloat16"), _ln(8)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 4, 8)), jnp.bfloat16)
    with jax_adapter.target("cpu") as t:
        y = m16(x)
        dx = jax.grad(lambda x: jnp.sum(m16(x).astype(jnp.float32) ** 2))(x)
    assert dict(t.decisions["layer_norm"]) == {"fused_vjp": 2}
    assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    ref = m32(x.astype(jnp.float32))
    assert rel_err(np.asarray(y, np.float32), ref) < 2 ** -7
