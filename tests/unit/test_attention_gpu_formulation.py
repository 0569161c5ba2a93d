"""The trunk attention's GPU formulation without cuDNN ("blocked": query blocks of all heads,
a recomputing custom_vjp), held to a float64 reference next to the textbook ("xla") and chunked
formulations; its residuals, block rule and the dispatch that picks it on GPUs. Runs on CPU."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from jax_adapter.nn import attention as att
from jax_adapter.nn.attention import (AttentionFallbackWarning, blocked_attention, choose_formulation,
                                      chunked_attention, default_block, dot_product_attention,
                                      xla_attention)

# float32 against float64, relative to each array's largest magnitude. Measured on CPU (worst of
# out, dq, dk, dv over the shapes below): xla 5.3e-7, chunked 6.8e-7, blocked 5.3e-7, blocked
# with 7-query blocks 7.4e-7, with 1-query blocks 8.4e-7.
F64_TOL_F32 = 2e-6
# bfloat16 inputs against float64 on the same (bfloat16-rounded) values: outputs and gradients are
# rounded to bfloat16 (relative step 2**-8). Measured: 2.8e-3 for xla, blocked and blocked:7.
F64_TOL_BF16 = 1.6e-2


def inputs(b=2, n=37, h=3, d=16, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((b, n, h, d)).astype(np.float32)).astype(dtype) for _ in range(4)]


def reference64(q, k, v, g, scale=None):
    """Softmax attention and its VJP in numpy float64, from the formulas:
    ``P = softmax(s q k^T)``, ``O = P v``; ``dv = P^T g``, ``dP = g v^T``,
    ``dS = P (dP - rowsum(dP P))``, ``dq = s dS k``, ``dk = s dS^T q``."""
    q, k, v, g = (np.asarray(a, np.float64).transpose(0, 2, 1, 3) for a in (q, k, v, g))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = scale * q @ k.transpose(0, 1, 3, 2)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dp = g @ v.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    out = (p @ v, scale * ds @ k, scale * ds.transpose(0, 1, 3, 2) @ q, p.transpose(0, 1, 3, 2) @ g)
    return [a.transpose(0, 2, 1, 3) for a in out]


def fwd_bwd(fn, q, k, v, g):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(g))


def rel_err(a, ref):
    """Largest deviation relative to the reference's largest magnitude (absolute where the
    reference is all zeros: dq and dk of a single token)."""
    a = np.asarray(a, np.float64)
    top = np.abs(ref).max()
    return float(np.abs(a - ref).max() / (top if top > 0 else 1.0))


FORMULATIONS = {
    "xla": xla_attention,
    "chunked": chunked_attention,
    "blocked": blocked_attention,
    "blocked:7": lambda q, k, v: blocked_attention(q, k, v, block=7),
    "blocked:1": lambda q, k, v: blocked_attention(q, k, v, block=1),
}


@pytest.mark.parametrize("impl", list(FORMULATIONS))
@pytest.mark.parametrize("shape", [(2, 37, 3, 16), (2, 150, 4, 64), (3, 2, 2, 8), (1, 1, 2, 8)])
def test_float32_against_float64(impl, shape):
    q, k, v, g = inputs(*shape, seed=1)
    got = jax.jit(lambda *a: fwd_bwd(FORMULATIONS[impl], *a))(q, k, v, g)
    ref = reference64(q, k, v, g)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.shape == r.shape and a.dtype == jnp.float32, name
        err = rel_err(a, r)
        assert err < F64_TOL_F32, (impl, name, err)


@pytest.mark.parametrize("impl", ["xla", "blocked", "blocked:7"])
def test_bfloat16_against_float64(impl):
    q, k, v, g = inputs(n=45, h=2, d=32, seed=5, dtype=jnp.bfloat16)
    got = jax.jit(lambda *a: fwd_bwd(FORMULATIONS[impl], *a))(q, k, v, g)
    ref = reference64(q, k, v, g)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.dtype == jnp.bfloat16, name
        err = rel_err(a, r)
        assert err < F64_TOL_BF16, (impl, name, err)


def test_custom_scale_and_large_logits():
    # Logits around 100: the float32 statistics (max, log-sum-exp) keep the softmax exact.
    q, k, v, g = inputs(n=29, h=2, d=16, seed=7)
    q = q * 8
    ref = reference64(q, k, v, g, scale=0.7)
    got = fwd_bwd(lambda q, k, v: blocked_attention(q, k, v, scale=0.7, block=5), q, k, v, g)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert rel_err(a, r) < F64_TOL_F32 * 4, name


@pytest.mark.slow
def test_blocks_agree_with_one_block():
    # Every block size (with a zero-padded last block) gives the one-block values.
    q, k, v, g = inputs(n=41, h=2, seed=3)
    one = fwd_bwd(lambda q, k, v: blocked_attention(q, k, v, block=41), q, k, v, g)
    for block in (1, 8, 13, 40, 64):
        got = fwd_bwd(lambda q, k, v: blocked_attention(q, k, v, block=block), q, k, v, g)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, one):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-6, err_msg=f"{block} {name}")


def test_saves_no_logits():
    # The point of the formulation: its residuals are q, k, v, out and the float32 log-sum-exp,
    # never a [B, H, N, N] array (the textbook form keeps two of them).
    q, k, v, _ = inputs(n=37, h=3, d=16)
    big = 2 * 3 * 37 * 37
    for fn in (blocked_attention, lambda q, k, v: blocked_attention(q, k, v, block=8)):
        shapes = [r[0].shape for r in saved_residuals(fn, q, k, v)]
        assert all(int(np.prod(s)) < big for s in shapes), shapes
        assert (2, 3, 37) in shapes
    assert any(int(np.prod(r[0].shape)) >= big for r in saved_residuals(xla_attention, q, k, v))


def test_default_block_rule():
    # [B, H, block, N] float32 logits under the budget; one block when the whole fits.
    assert default_block(6, 12, 970, block_bytes=1 << 40) == 970
    blk = default_block(6, 12, 970)                   # ViT-B, batch 6 at 256x704
    assert 4 * 6 * 12 * blk * 970 <= att.BLOCK_BYTES and blk < 970
    nb = -(-970 // blk)
    assert nb * blk - 970 < nb                        # equal blocks: less than a row of padding each
    assert default_block(1, 1, 10, block_bytes=4) == 1


def test_default_block_used(monkeypatch):
    monkeypatch.setattr(att, "BLOCK_BYTES", 4 * 2 * 3 * 37 * 10)  # 10 query rows a block
    q, k, v, g = inputs()
    assert default_block(2, 3, 37) == 10
    got = fwd_bwd(blocked_attention, q, k, v, g)
    ref = reference64(q, k, v, g)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert rel_err(a, r) < F64_TOL_F32, name


def test_undifferentiated_one_block_is_the_textbook_form():
    q, k, v, _ = inputs(dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(blocked_attention(q, k, v), np.float32),
                                  np.asarray(xla_attention(q, k, v), np.float32))


@pytest.mark.parametrize("platform, dtype, head_dim, cc, want", [
    ("cpu", jnp.float32, 64, None, "chunked"),
    ("gpu", jnp.float32, 64, "9.0", "blocked"),     # cuDNN flash attention is half precision only
    ("cuda", jnp.float32, 64, "8.9", "blocked"),
    ("gpu", jnp.bfloat16, 64, "9.0", "cudnn"),
    ("gpu", jnp.bfloat16, 100, "9.0", "blocked"),   # head size cuDNN refuses
    ("gpu", jnp.bfloat16, 192, "8.0", "blocked"),
    ("rocm", jnp.bfloat16, 64, None, "blocked"),
    ("tpu", jnp.float32, 64, None, "xla"),
    ("tpu", jnp.bfloat16, 64, None, "xla"),
])
def test_formulation_rule(platform, dtype, head_dim, cc, want):
    assert choose_formulation(platform, dtype, head_dim, cc) == want


def test_cudnn_refusal_on_gpu_runs_blocked(monkeypatch, gpu_target):

    def refuse(*a, **kw):
        raise RuntimeError("cuDNN not found.")

    monkeypatch.setattr(att.jax.nn, "dot_product_attention", refuse)
    q, k, v, g = inputs(dtype=jnp.bfloat16)
    with pytest.warns(AttentionFallbackWarning, match="blocked"):
        got = fwd_bwd(dot_product_attention, q, k, v, g)
    ref = reference64(q, k, v, g)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert rel_err(a, r) < F64_TOL_BF16, name


def test_forced_blocked_everywhere():
    q, k, v, g = inputs()
    got = fwd_bwd(lambda q, k, v: dot_product_attention(q, k, v, implementation="blocked"), q, k, v, g)
    ref = reference64(q, k, v, g)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert rel_err(a, r) < F64_TOL_F32, name


# --------------------------------------------------------------------------- exact GELU's derivative
# jax_adapter.nn.layers.gelu (the trunk MLP's and ConvFFN's activation) has a closed-form JVP so a
# training step keeps one array per activation instead of two: held to the float64 derivative
# of the textbook formula, next to that formula differentiated by JAX in float32 / bfloat16.

from jax_adapter.nn.layers import gelu  # noqa: E402

GELU_TOL_F32 = 2e-6    # measured 5.0e-7 on [-8, 8] for both the new and the old derivative
GELU_TOL_BF16 = 1e-2   # measured 3.9e-3 (new) and 5.3e-3 (old)


def _old_gelu(x):
    return jax.nn.gelu(x, approximate=False)


def _gelu_grad64(x):
    with jax.enable_x64(True):
        x64 = jnp.asarray(np.asarray(x, np.float64))
        return np.asarray(jax.vmap(jax.grad(_old_gelu))(x64))


def test_gelu_values_against_float64_and_torch():
    # 0.5 x (1 + erf(x / sqrt 2)), PyTorch's formula: within 2 float32 ulps of max(|x|, 1) of the
    # float64 value (measured 1 ulp, 1.05e-6 at |x| = 9; jax.nn.gelu's erfc form: 3.7e-7), and
    # within 4 of torch.nn.functional.gelu (measured 2.5, at x = 3.14: each is 1-2 ulps from the
    # float64 value, on opposite sides).
    torch = pytest.importorskip("torch")
    x = np.linspace(-9.0, 9.0, 20001, dtype=np.float32)
    with jax.enable_x64(True):
        ref = np.asarray(_old_gelu(jnp.asarray(x, jnp.float64)))
    got = np.asarray(gelu(jnp.asarray(x)), np.float64)
    ulp = np.finfo(np.float32).eps * np.maximum(np.abs(x), 1.0)
    assert np.all(np.abs(got - ref) <= 2 * ulp), np.abs(got - ref).max()
    ours = torch.nn.functional.gelu(torch.from_numpy(x)).double().numpy()
    assert np.all(np.abs(got - ours) <= 4 * ulp), np.abs(got - ours).max()
    # bfloat16: computed in float32 and rounded once, as PyTorch does: within half a bfloat16 ulp
    # of max(|x|, 1) of the float64 value (measured 0.47), and PyTorch's to 1/16 of one (measured
    # 6e-4: the float32 results round to the same bfloat16 but at x = -5.5, where PyTorch keeps
    # -1.6e-7 and the erf form gives -0).
    xb = torch.from_numpy(x).bfloat16()
    x32 = xb.float().numpy()
    got_b = np.asarray(gelu(jnp.asarray(x32).astype(jnp.bfloat16)), np.float64)
    with jax.enable_x64(True):
        ref_b = np.asarray(_old_gelu(jnp.asarray(x32, jnp.float64)))
    ulp_b = 2.0 ** -7 * np.maximum(np.abs(x32), 1.0)
    assert np.all(np.abs(got_b - ref_b) <= ulp_b / 2), np.abs(got_b - ref_b).max()
    ours_b = torch.nn.functional.gelu(xb).double().numpy()
    assert np.all(np.abs(got_b - ours_b) <= ulp_b / 16), np.abs(got_b - ours_b).max()


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, GELU_TOL_F32), (jnp.bfloat16, GELU_TOL_BF16)])
def test_gelu_derivative_against_float64(dtype, tol):
    x = jnp.linspace(-8.0, 8.0, 1601, dtype=jnp.float32).astype(dtype)
    ref = _gelu_grad64(np.asarray(x, np.float32))
    for fn in (gelu, _old_gelu):
        got = np.asarray(jax.jit(jax.vmap(jax.grad(fn)))(x), np.float64)
        assert np.abs(got - ref).max() < tol, (fn, np.abs(got - ref).max())


def test_gelu_keeps_one_array_and_supports_jvp():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 8)).astype(np.float32))
    w1 = jnp.asarray(rng.standard_normal((8, 16)).astype(np.float32))
    w2 = jnp.asarray(rng.standard_normal((16, 8)).astype(np.float32))

    def big(fn):
        res = saved_residuals(lambda x: fn(x @ w1) @ w2, x)
        return [r for r in res if r[0].shape == (4, 16)]

    assert len(big(gelu)) == 1 and len(big(_old_gelu)) >= 2
    t = jnp.ones_like(x)
    new = jax.jvp(lambda x: gelu(x @ w1), (x,), (t,))
    old = jax.jvp(lambda x: _old_gelu(x @ w1), (x,), (t,))
    for a, b in zip(new, old):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
