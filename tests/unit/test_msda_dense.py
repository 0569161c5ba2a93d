"""The gather-free (dense, chunked) sampling core against the float64 PyTorch fixture, the XLA
core and a hand-computed kink convention.

Tolerances are relative to each expected array's largest magnitude: float64 1e-6, float32 1e-4,
bfloat16 2e-2 (bfloat16 inputs, and ``A`` rounded to bfloat16 for the products).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_adapter.errors import ConfigError
from jax_adapter.nn import msda as ops
from jax_adapter.nn import msda_dense
from jax_adapter.nn.msda_dense import ms_deform_attn_dense, ms_deform_attn_dense_fused
from jax_adapter.nn.msda_xla import ms_deform_attn_xla
from tests import msda_cases as cases
from tests.msda_cases import B, DH, EDGE_SHAPES, L, M, P, Q, S, close

TOL = {"float64": 1e-6, "float32": 1e-4, "bfloat16": 2e-2}
# These small programs compile several times faster without LLVM optimisation and the fusion
# emitters; compile time is what these tests spend.
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
_jit = lambda f: jax.jit(f, compiler_options=_COMPILER_OPTIONS)
GRADS = ("grad_value", "grad_sampling_locations", "grad_attention_weights")


def _value_and_grads(fn, args, ct):
    def run(args, ct):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(ct.astype(out.dtype))

    return _jit(run)(tuple(args), ct)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_fixture_parity(dtype):
    """Against the float64 PyTorch outputs and gradients; chunk=4 walks 11 queries in 3 chunks
    (the last one padded). Locations stay float32 (float64 in the float64 run)."""
    core, shapes = cases.fixture()
    fn = lambda v, l, a: ms_deform_attn_dense(v, shapes, l, a, chunk=4)
    with jax.enable_x64(dtype == "float64"):
        loc_dtype = "float64" if dtype == "float64" else "float32"
        args = (jnp.asarray(core["value"], dtype), jnp.asarray(core["sampling_locations"], loc_dtype),
                jnp.asarray(core["attention_weights"], dtype))
        out, grads = _value_and_grads(fn, args, jnp.asarray(core["cotangent"], dtype))
        assert out.dtype == jnp.dtype(dtype) and grads[0].dtype == jnp.dtype(dtype)
    close(out, core["output"], TOL[dtype], "output")
    for g, name in zip(grads, GRADS):
        close(g, core[name], TOL[dtype], name)


def test_default_chunk_bounds_the_sampling_matrix():
    b, m, s, q = 6, 6, 4032, 969  # ViT-S injector
    chunk = msda_dense.default_chunk(b, m, s, q)
    assert chunk % 8 == 0 and 8 <= chunk < q
    assert b * m * s * chunk * 4 <= msda_dense.A_CHUNK_BYTES
    assert msda_dense.default_chunk(1, 1, 10, 5) == 8  # never more than Q rounded up to 8


def test_bad_chunk_raises():
    with pytest.raises(ConfigError, match="chunk"):
        ms_deform_attn_dense(jnp.zeros((1, 4, 1, 2)), ((2, 2),), jnp.zeros((1, 1, 1, 1, 1, 2)),
                             jnp.zeros((1, 1, 1, 1, 1)), chunk=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_edge_cases_match_xla_including_kinks(dtype):
    """Off-map, far, non-finite, crowded and kink locations (pixel centres and support borders,
    exact in float32): every gradient entry, kinks included, agrees with the XLA core."""
    rng = np.random.default_rng(0)
    value = jnp.asarray(rng.normal(size=(B, S, M, DH)), dtype)
    loc = cases.edge_locations(rng)
    attn = jnp.asarray(rng.uniform(size=(B, Q, M, L, P)), dtype)
    ct = jnp.asarray(rng.normal(size=(B, Q, M * DH)), dtype)
    fn = lambda v, l, a: ms_deform_attn_dense(v, EDGE_SHAPES, l, a, chunk=8)
    out, (g_v, g_l, g_a) = _value_and_grads(fn, (value, jnp.asarray(loc), attn), ct)
    assert out.dtype == value.dtype and g_v.dtype == value.dtype and g_a.dtype == attn.dtype
    assert g_l.dtype == jnp.float32
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    ref = lambda v, l, a: ms_deform_attn_xla(v, EDGE_SHAPES, l, a)
    r_out, r_grads = _value_and_grads(ref, (f32(value), jnp.asarray(loc), f32(attn)), f32(ct))
    close(out, r_out, TOL[dtype], "output")
    for g, r, name in zip((g_v, g_l, g_a), r_grads, ("value", "locations", "weights")):
        close(g, r, TOL[dtype], f"grad {name}")
    cases.check_nonfinite(loc, g_l, g_a)


def test_kink_convention_by_hand():
    cases.check_kink_convention(lambda v, s, l, a: ms_deform_attn_dense(v, s, l, a), _jit)
    # The XLA core follows the same convention (what the dense core must reproduce).
    cases.check_kink_convention(lambda v, s, l, a: ms_deform_attn_xla(v, s, l, a), _jit)


@pytest.mark.parametrize(
    "shapes, b, q, m, dh, p, chunk",
    [
        (((4, 4), (2, 3), (1, 1), (3, 1)), 1, 6, 3, 16, 1, None),  # four levels, 1x1 and 3x1
        (((3, 5),), 2, 9, 2, 3, 3, 8),  # odd level, Dh=3, two chunks
        (((5, 6), (2, 3)), 1, 7, 1, 7, 2, 2),
    ],
)
def test_random_shapes_match_xla(shapes, b, q, m, dh, p, chunk):
    rng = np.random.default_rng(1)
    value, loc, attn, ct = cases.random_case(rng, shapes, b, q, m, dh, p)
    fn = lambda v, l, a: ms_deform_attn_dense(v, shapes, l, a, chunk=chunk)
    out, grads = _value_and_grads(fn, (value, loc, attn), ct)
    r_out, r_grads = _value_and_grads(lambda v, l, a: ms_deform_attn_xla(v, shapes, l, a),
                                      (value, loc, attn), ct)
    close(out, r_out, TOL["float32"], "output")
    for g, r, name in zip(grads, r_grads, ("value", "locations", "weights")):
        close(g, r, TOL["float32"], f"grad {name}")


def test_fused_matches_xla_fused_with_gradients():
    """Edge-case locations reproduced from reference points and offsets (kinks included)."""
    rng = np.random.default_rng(2)
    value = jnp.asarray(rng.normal(size=(B, S, M, DH)), jnp.float32)
    ref_pts = rng.uniform(size=(B, Q, 2)).astype(np.float32)
    norm = np.array([[w, h] for h, w in EDGE_SHAPES], np.float32)[None, None, None, :, None]
    offsets = (cases.edge_locations(rng) - ref_pts[:, :, None, None, None]) * norm
    logits = (2 * rng.normal(size=(B, Q, M, L * P))).astype(np.float32)
    ct = jnp.asarray(rng.normal(size=(B, Q, M * DH)), jnp.float32)
    args = (value, jnp.asarray(ref_pts), jnp.asarray(offsets), jnp.asarray(logits))
    fn = lambda v, r, o, z: ms_deform_attn_dense_fused(v, EDGE_SHAPES, r, o, z, chunk=8)
    out, grads = _value_and_grads(fn, args, ct)
    ref = lambda v, r, o, z: ops.ms_deform_attn_fused(v, EDGE_SHAPES, r, o, z, impl="xla")
    r_out, r_grads = _value_and_grads(ref, args, ct)
    close(out, r_out, TOL["float32"], "output")
    for g, r, name in zip(grads, r_grads, ("value", "reference points", "offsets", "logits")):
        close(g, r, TOL["float32"], f"grad {name}")
    bad = ~np.isfinite(offsets).all(-1)
    assert bad.any() and np.abs(np.asarray(grads[2])[bad]).max() == 0.0
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
