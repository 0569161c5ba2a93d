"""The Pallas TPU (Mosaic) sampling-core kernels, run by the Pallas interpreter on CPU, against the
float64 PyTorch fixture, the XLA core and a hand-computed kink convention; and lowered for TPU.

Compiling for a real TPU needs libtpu (``benchmarks/tpu/core.py`` does it deviceless); here the
kernels are lowered to Mosaic for a TPU target, which checks what the lowering checks, and their
semantics are checked in interpret mode. Tolerances are relative to each expected array's largest
magnitude: float64 1e-6, float32 1e-4, bfloat16 2e-2 (bfloat16 inputs and MXU operands).
Small query blocks (``block_q=8``, allowed in interpret mode) put several blocks, and a partial
last one, into every call.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_adapter.nn.msda_xla import ms_deform_attn_xla
from jax_adapter.pallas_kernels import tpu
from jax_adapter.pallas_kernels.tpu import ms_deform_attn_fused_tpu, ms_deform_attn_tpu
from tests import msda_cases as cases
from tests.msda_cases import TOL, EDGE_SHAPES, close, jit, value_and_grads


def _kernel(block_q=8):
    return lambda v, s, l, a: ms_deform_attn_tpu(v, s, l, a, interpret=True, block_q=block_q)


# --- the float64 PyTorch fixture ------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_fixture_parity(dtype):
    cases.check_fixture_parity(_kernel(), dtype)


def test_fused_fixture_parity_float64():
    cases.check_fused_fixture_parity(
        lambda v, s, r, o, z: ms_deform_attn_fused_tpu(v, s, r, o, z, interpret=True, block_q=8))


# --- edge cases and kinks against the XLA core ----------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_edge_cases_match_xla_including_kinks(dtype):
    """Off-map, far, non-finite, crowded and kink locations (pixel centres and support borders,
    exact in float32), a 1x1 and an odd level: every gradient entry, kinks included, agrees
    with the XLA core (float32 reference on the same rounded inputs)."""
    cases.check_edge_cases(lambda v, l, a: _kernel()(v, EDGE_SHAPES, l, a), dtype)


def test_kink_convention_by_hand():
    cases.check_kink_convention(_kernel(), jit)


def test_fused_edge_cases_match_xla_fused():
    cases.check_fused_edge_cases(lambda v, r, o, z: ms_deform_attn_fused_tpu(v, EDGE_SHAPES, r, o, z, interpret=True, block_q=8))


@pytest.mark.parametrize(
    "shapes, b, q, m, dh, p, dtype",
    [
        (((4, 4), (2, 3), (1, 1), (3, 1)), 1, 6, 3, 16, 1, "float32"),  # four levels, 1x1, 3x1
        (((3, 5), (20, 3)), 2, 9, 2, 3, 3, "float32"),  # odd levels, Dh=3, a level of 20 rows
        # Dh=64: two heads share a 128-lane block (head groups, per-head channel masks).
        (((3, 5),), 1, 9, 4, 64, 2, "bfloat16"),
    ],
)
def test_random_shapes_match_xla(shapes, b, q, m, dh, p, dtype):
    rng = np.random.default_rng(1)
    value, loc, attn, ct = cases.random_case(rng, shapes, b, q, m, dh, p, dtype)
    if dh == 64:
        assert tpu.head_group(m, dh) == 2
    fn = lambda v, l, a: _kernel()(v, shapes, l, a)
    out, grads = value_and_grads(fn, (value, loc, attn), ct)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    r_out, r_grads = value_and_grads(lambda v, l, a: ms_deform_attn_xla(v, shapes, l, a),
                                      (f32(value), loc, f32(attn)), f32(ct))
    close(out, r_out, TOL[dtype], "output")
    for g, r, name in zip(grads, r_grads, ("value", "locations", "weights")):
        close(g, r, TOL[dtype], f"grad {name}")


def test_rows_outside_the_band_are_not_read():
    """All points of the block sit in image rows 1-3 of a 12-row level; rows 7-11 (other chunks
    of rows: W=20 gives 5 rows per chunk) hold NaN. The kernels skip those chunks, so output and
    gradients stay finite and equal the XLA core's (which reads only the corners it needs)."""
    shapes, b, q, m, dh, p = ((12, 20),), 1, 6, 1, 4, 2
    assert tpu.make_levels(shapes)[0].rows == 5
    rng = np.random.default_rng(3)
    value = rng.normal(size=(b, 240, m, dh)).astype(np.float32)
    value[:, 7 * 20:] = np.nan
    loc = np.stack([rng.uniform(0, 1, size=(b, q, m, 1, p)),
                    rng.uniform(1.5 / 12, 3.4 / 12, size=(b, q, m, 1, p))], -1).astype(np.float32)
    attn = rng.uniform(size=(b, q, m, 1, p)).astype(np.float32)
    ct = jnp.asarray(rng.normal(size=(b, q, m * dh)), jnp.float32)
    args = (jnp.asarray(value), jnp.asarray(loc), jnp.asarray(attn))
    out, grads = value_and_grads(lambda v, l, a: _kernel()(v, shapes, l, a), args, ct)
    r_out, r_grads = value_and_grads(lambda v, l, a: ms_deform_attn_xla(v, shapes, l, a), args, ct)
    assert np.isfinite(np.asarray(out)).all()
    close(out, r_out, TOL["float32"], "output")
    for g, r, name in zip(grads, r_grads, ("value", "locations", "weights")):
        assert np.isfinite(np.asarray(g)).all(), name
        close(g, r, TOL["float32"], f"grad {name}")


# --- lowering for TPU, configuration, costs --------------------------------------------------

VITS_INJECTOR = dict(shapes=((34, 90), (17, 45), (9, 23)), b=6, q=969, m=6, dh=64, p=4)


@pytest.mark.parametrize("entry", ["plain", "fused"])
def test_lowers_for_tpu_without_gather_or_scatter(entry):
    """Forward and backward at the ViT-S injector shape, bfloat16, lowered for a TPU target:
    two Mosaic kernels, and neither a gather nor a scatter in the program around them."""
    c = VITS_INJECTOR
    shapes, b, q, m, dh, p = (c[k] for k in ("shapes", "b", "q", "m", "dh", "p"))
    n_l, s = len(shapes), sum(h * w for h, w in shapes)
    sds = jax.ShapeDtypeStruct
    value, ct = sds((b, s, m, dh), jnp.bfloat16), sds((b, q, m * dh), jnp.bfloat16)
    if entry == "plain":
        fn = lambda v, l, a: ms_deform_attn_tpu(v, shapes, l, a)
        args = (value, sds((b, q, m, n_l, p, 2), jnp.float32), sds((b, q, m, n_l, p), jnp.bfloat16))
    else:
        fn = lambda v, r, o, z: ms_deform_attn_fused_tpu(v, shapes, r, o, z)
        args = (value, sds((b, q, 2), jnp.float32), sds((b, q, m, n_l, p, 2), jnp.float32),
                sds((b, q, m, n_l * p), jnp.float32))

    def run(args, ct):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(ct)

    text = jax.jit(run).trace(args, ct).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 2
    assert "msda_tpu_forward" in text and "msda_tpu_backward" in text
    assert "gather" not in text and "scatter" not in text


def test_bad_configurations_raise():
    value, loc, attn = jnp.zeros((1, 6, 1, 8)), jnp.zeros((1, 300, 1, 1, 1, 2)), jnp.zeros((1, 300, 1, 1, 1))
    with pytest.raises(ValueError, match="block_q"):
        ms_deform_attn_tpu(value, ((2, 3),), loc, attn, block_q=100)  # not lanes-aligned
    with pytest.raises(ValueError, match="add up"):
        ms_deform_attn_tpu(value, ((2, 2),), loc, attn, interpret=True)
    with jax.enable_x64(True):
        with pytest.raises(ValueError, match="float64"):
            ms_deform_attn_tpu(value.astype(jnp.float64), ((2, 3),), loc, attn)


def test_costs_follow_the_block_specs():
    """Hand count at the ViT-S injector shape: padded layout, grid and per-call traffic."""
    c = VITS_INJECTOR
    info = tpu.call_costs((c["b"], 4032, c["m"], c["dh"]), jnp.bfloat16, c["shapes"], c["q"], c["p"])
    assert info["block_q"] == 128 and info["head_group"] == 2
    # Rows padded to 96, 48, 24 positions; 1, 2, 5 rows per chunk.
    assert [(lv["wp"], lv["rows"], lv["chunks"]) for lv in info["levels"]] == [(96, 1, 34), (48, 2, 9), (24, 5, 2)]
    s_pad, qp = 34 * 96 + 9 * 96 + 2 * 120, 1024
    fwd, bwd = info["forward"], info["backward"]
    assert fwd["grid_steps"] == 6 * 3 * 8
    assert fwd["mxu_flops"] == 2 * 6 * 6 * qp * 64 * s_pad
    assert bwd["mxu_flops"] == 2 * 2 * 6 * 6 * qp * 128 * s_pad
    value_bytes = 6 * 4032 * 384 * 2
    q_in = 6 * 3 * 8 * (2 * 3 * 3 * 4 * 128 * 4)  # [G, L, 3, P, Tq] float32 blocks
    out = 6 * 8 * 3 * 128 * 128 * 2
    assert fwd["hbm_bytes"] == value_bytes + q_in + out
    assert bwd["hbm_bytes"] == 2 * value_bytes + 2 * q_in + out
