"""The gather-free (dense, chunked) sampling core against the float64 PyTorch fixture, the XLA
core and a hand-computed kink convention.

Tolerances are relative to each expected array's largest magnitude: float64 1e-6, float32 1e-4,
bfloat16 2e-2 (bfloat16 inputs, and ``A`` rounded to bfloat16 for the products).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from jax_adapter.errors import ConfigError
from jax_adapter.nn import msda_dense
from jax_adapter.nn.msda_dense import ms_deform_attn_dense, ms_deform_attn_dense_fused
from jax_adapter.nn.msda_xla import ms_deform_attn_xla
from tests import msda_cases as cases
from tests.msda_cases import TOL, EDGE_SHAPES, close, jit, value_and_grads



@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_fixture_parity(dtype):
    """Against the float64 PyTorch outputs and gradients; chunk=4 walks 11 queries in 3 chunks
    (the last one padded). Locations stay float32 (float64 in the float64 run)."""
    cases.check_fixture_parity(lambda v, s, l, a: ms_deform_attn_dense(v, s, l, a, chunk=4), dtype)


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
    cases.check_edge_cases(lambda v, l, a: ms_deform_attn_dense(v, EDGE_SHAPES, l, a, chunk=8), dtype)


def test_kink_convention_by_hand():
    cases.check_kink_convention(lambda v, s, l, a: ms_deform_attn_dense(v, s, l, a), jit)
    # The XLA core follows the same convention (what the dense core must reproduce).
    cases.check_kink_convention(lambda v, s, l, a: ms_deform_attn_xla(v, s, l, a), jit)


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
    out, grads = value_and_grads(fn, (value, loc, attn), ct)
    r_out, r_grads = value_and_grads(lambda v, l, a: ms_deform_attn_xla(v, shapes, l, a),
                                      (value, loc, attn), ct)
    close(out, r_out, TOL["float32"], "output")
    for g, r, name in zip(grads, r_grads, ("value", "locations", "weights")):
        close(g, r, TOL["float32"], f"grad {name}")


def test_fused_matches_xla_fused_with_gradients():
    """Edge-case locations reproduced from reference points and offsets (kinks included)."""
    cases.check_fused_edge_cases(lambda v, r, o, z: ms_deform_attn_dense_fused(v, EDGE_SHAPES, r, o, z, chunk=8))
