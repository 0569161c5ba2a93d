"""The trunks' attention core: the chunked CPU path, the XLA path, PyTorch's SDPA, the dispatch
rule and the cuDNN fallback (forced on CPU)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_adapter
from jax_adapter.nn import attention as att
from jax_adapter.nn.attention import (AttentionFallbackWarning, choose_implementation,
                                      chunked_attention, dot_product_attention, xla_attention)

pytestmark = pytest.mark.torch

# float32 against float32: both compute the same sums in another order.
F32_TOL = 1e-5
# bfloat16 inputs against the float32 reference on the same (bfloat16-rounded) values: the output
# and the gradients are rounded to bfloat16 (8 bits of mantissa, relative step 2**-8 = 3.9e-3).
BF16_RTOL = 1.6e-2


def qkvg(b=2, n=37, h=3, d=16, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((b, n, h, d)).astype(dtype)) for _ in range(4)]


def fwd_bwd(fn, q, k, v, g):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(g))


def max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("n, chunk", [(37, None), (37, 8), (37, 37), (50, 16), (1, None)])
def test_chunked_matches_xla_float32(n, chunk):
    q, k, v, g = qkvg(n=n)
    ref = jax.jit(lambda *a: fwd_bwd(xla_attention, *a))(q, k, v, g)
    got = jax.jit(lambda *a: fwd_bwd(lambda q, k, v: chunked_attention(q, k, v, chunk=chunk), *a))(q, k, v, g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=F32_TOL, err_msg=name)


def test_chunked_long_sequence_uses_query_chunks(monkeypatch):
    # Past WHOLE_HEAD_MAX the default goes QUERY_CHUNK queries at a time, padding the last chunk.
    monkeypatch.setattr(att, "WHOLE_HEAD_MAX", 16)
    monkeypatch.setattr(att, "QUERY_CHUNK", 12)
    q, k, v, g = qkvg(n=41, h=2)
    ref = fwd_bwd(xla_attention, q, k, v, g)
    got = fwd_bwd(chunked_attention, q, k, v, g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=F32_TOL, err_msg=name)


def test_matches_pytorch_sdpa():
    q, k, v, g = qkvg(b=2, n=29, h=4, d=32, seed=3)
    got = jax.jit(lambda *a: fwd_bwd(dot_product_attention, *a))(q, k, v, g)
    t = [torch.from_numpy(np.asarray(a).transpose(0, 2, 1, 3).copy()) for a in (q, k, v, g)]
    leaves = [x.requires_grad_(True) for x in t[:3]]
    out = torch.nn.functional.scaled_dot_product_attention(*leaves)
    out.backward(t[3])
    ref = [out.detach()] + [x.grad for x in leaves]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        np.testing.assert_allclose(np.asarray(a), b.numpy().transpose(0, 2, 1, 3), rtol=0, atol=F32_TOL,
                                   err_msg=name)


@pytest.mark.parametrize("impl", ["chunked", "xla"])
def test_bfloat16_against_float32_reference(impl):
    q, k, v, g = (a.astype(jnp.bfloat16) for a in qkvg(n=45, h=2, d=32, seed=5))
    got = jax.jit(lambda *a: fwd_bwd(lambda q, k, v: dot_product_attention(q, k, v, implementation=impl), *a))(
        q, k, v, g)
    ref = fwd_bwd(xla_attention, *(a.astype(jnp.float32) for a in (q, k, v, g)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.dtype == jnp.bfloat16, name
        err = max_rel(a, b)
        assert err < BF16_RTOL, (name, err)


def test_softmax_statistics_are_float32():
    # Logits of 200 in bfloat16 would make a low-precision softmax collapse; the float32 statistics
    # keep the result equal to the reference on the same inputs.
    q, k, v, _ = qkvg(n=20, h=1, d=8, seed=7)
    q = (q * 12).astype(jnp.bfloat16)
    k, v = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    ref = xla_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    got = chunked_attention(q, k, v, chunk=7)
    assert max_rel(got, ref) < BF16_RTOL


@pytest.mark.parametrize("platform, dtype, head_dim, cc, want", [
    ("cpu", jnp.float32, 64, None, "chunked"),
    ("cpu", jnp.bfloat16, 64, None, "chunked"),
    ("gpu", jnp.bfloat16, 64, "8.0", "cudnn"),
    ("cuda", jnp.float16, 128, "8.6", "cudnn"),
    ("gpu", jnp.float32, 64, "9.0", "xla"),       # cuDNN flash attention is half precision only
    ("gpu", jnp.bfloat16, 100, "9.0", "xla"),     # head size not a multiple of 8
    ("gpu", jnp.bfloat16, 192, "8.0", "xla"),     # over 128 before Hopper
    ("gpu", jnp.bfloat16, 192, "9.0", "cudnn"),   # up to 256 from sm_90
    ("gpu", jnp.bfloat16, 264, "9.0", "xla"),
    ("tpu", jnp.bfloat16, 64, None, "xla"),
    ("rocm", jnp.bfloat16, 64, None, "xla"),
])
def test_dispatch_rule(platform, dtype, head_dim, cc, want):
    assert choose_implementation(platform, dtype, head_dim, cc) == want


class _Spy:
    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def __call__(self, q, k, v, *, scale, implementation):
        self.calls.append(implementation)
        if self.fail:
            raise self.fail
        return xla_attention(q, k, v, scale=scale)


def test_auto_on_gpu_bfloat16_calls_cudnn(monkeypatch, gpu_target):
    spy = _Spy()
    monkeypatch.setattr(att.jax.nn, "dot_product_attention", spy)
    q, k, v, _ = (a.astype(jnp.bfloat16) for a in qkvg())
    dot_product_attention(q, k, v)
    assert spy.calls == ["cudnn"]
    spy.calls.clear()
    dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)))  # float32: no cuDNN
    assert spy.calls == []


def test_cudnn_refusal_falls_back_to_xla(monkeypatch, gpu_target):
    spy = _Spy(fail=NotImplementedError("cuDNN version too old"))
    monkeypatch.setattr(att.jax.nn, "dot_product_attention", spy)
    q, k, v, _ = (a.astype(jnp.bfloat16) for a in qkvg())
    with pytest.warns(AttentionFallbackWarning, match="cuDNN version too old"):
        out = dot_product_attention(q, k, v)
    assert spy.calls == ["cudnn"]
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(xla_attention(q, k, v), np.float32))


def test_forced_cudnn_on_cpu_warns_and_runs_xla():
    q, k, v, _ = qkvg()
    with pytest.warns(AttentionFallbackWarning, match="needs a CUDA GPU"):
        out = dot_product_attention(q, k, v, implementation="cudnn")
    np.testing.assert_allclose(np.asarray(out), np.asarray(xla_attention(q, k, v)), rtol=0, atol=F32_TOL)


@pytest.mark.parametrize("platform, formulation", [("cpu", "chunked_attention"), ("gpu", "blocked_attention")])
def test_auto_float32_is_silent_and_picks_the_platform_formulation(monkeypatch, platform, formulation):
    called = []
    monkeypatch.setattr(att, formulation, lambda *a, **kw: called.append(1) or xla_attention(*a, **kw))
    q, k, v, _ = qkvg()
    with warnings.catch_warnings(), jax_adapter.target(platform, compute_capability="9.0", ahead_of_time=False):
        warnings.simplefilter("error")
        dot_product_attention(q, k, v)
    assert called == [1]


def test_bad_arguments():
    q, k, v, _ = qkvg()
    with pytest.raises(ValueError, match="implementation must be one of"):
        dot_product_attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match=r"\[B, N, H, Dh\]"):
        dot_product_attention(q, k[:, :5], v)
    from flax import nnx
    from jax_adapter.nn.vit import Attention
    with pytest.raises(ValueError, match="implementation must be one of"):
        Attention(32, 4, rngs=nnx.Rngs(0), implementation="fast")
