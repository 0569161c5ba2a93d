"""Pallas sampling-core kernels against the XLA reference and the float64 PyTorch fixture.

The kernels run interpreted unless the default backend is a GPU, where the same tests run them
compiled by Triton. Shapes are kept small because the interpreter is slow to compile.
Tolerances are relative to each reference array's largest magnitude: float32 1e-5, bfloat16
2e-2, float64 1e-10.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_adapter import pallas_kernels
from jax_adapter.pallas_kernels._common import resolve_interpret
from jax_adapter.nn import msda as ops
from jax_adapter.nn.msda_xla import ms_deform_attn_xla
from tests import msda_cases as cases
from tests.helpers import load_npz, rel_err

INTERPRET = jax.default_backend() != "gpu"
# Interpreted kernels become large unrolled XLA:CPU programs whose compile time dominates these
# tests; LLVM optimisation and the fusion emitters only cost time on them (about 40% less).
_COMPILER_OPTIONS = (
    {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False} if INTERPRET else None
)

F32_TOL, BF16_TOL, F64_TOL = 1e-5, 2e-2, 1e-10


def _value_and_grads(fn, args, ct):
    """``fn(*args)`` and the gradients of ``<fn(*args), ct>`` for every arg, in one jitted call."""

    def run(args, ct):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(ct.astype(out.dtype))

    return jax.jit(run, compiler_options=_COMPILER_OPTIONS)(tuple(args), ct)


def _xla(shapes):
    return lambda v, l, a: ms_deform_attn_xla(v, shapes, l, a)


def _cotangent(rng, b, q, width):
    return jnp.asarray(rng.normal(size=(b, q, width)), jnp.float32)


def _close(actual, expected, tol, what, keep=None):
    """``rel_err`` below ``tol``, optionally only where ``keep`` (elsewhere both set to 0)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if keep is not None:
        actual, expected = np.where(keep, actual, 0.0), np.where(keep, expected, 0.0)
    err = rel_err(actual, expected)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"


def test_interpret_follows_backend():
    assert resolve_interpret(None) == INTERPRET
    assert resolve_interpret(True) is True and resolve_interpret(False) is False


def test_block_sizes_must_be_powers_of_two():
    value, loc, attn = jnp.zeros((1, 4, 1, 2)), jnp.zeros((1, 1, 1, 1, 1, 2)), jnp.zeros((1, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="block_q"):
        pallas_kernels.ms_deform_attn(value, ((2, 2),), loc, attn, block_q=6)


# --- the float64 PyTorch fixture ------------------------------------------------------------

# float64 runs in the interpreter; compiled (GPU) kernels are checked in float32.
FIXTURE_DTYPE = "float64" if INTERPRET else "float32"
FIXTURE_TOL = F64_TOL if INTERPRET else F32_TOL


def _fixture():
    core = load_npz("msda_core_io.npz")
    return core, tuple(map(tuple, core["spatial_shapes"].tolist()))


def test_fixture_parity():
    core, shapes = _fixture()
    fn = lambda v, l, a: pallas_kernels.ms_deform_attn(v, shapes, l, a, block_q=8, block_q_value=4)
    with jax.enable_x64(FIXTURE_DTYPE == "float64"):
        args = [jnp.asarray(core[k], FIXTURE_DTYPE) for k in ("value", "sampling_locations", "attention_weights")]
        out, grads = _value_and_grads(fn, args, jnp.asarray(core["cotangent"], FIXTURE_DTYPE))
        assert out.dtype == jnp.dtype(FIXTURE_DTYPE)
    _close(out, core["output"], FIXTURE_TOL, "output")
    for g, name in zip(grads, ("grad_value", "grad_sampling_locations", "grad_attention_weights")):
        _close(g, core[name], FIXTURE_TOL, name)


def test_fused_fixture_parity():
    """The fixture through the fused entry point (logits and offsets that reproduce it)."""
    cases.check_fused_fixture_parity(
        lambda v, s, r, o, z: pallas_kernels.ms_deform_attn_fused(v, s, r, o, z, block_q=8, block_q_value=4),
        FIXTURE_DTYPE, FIXTURE_TOL)


# --- edge cases against the XLA reference ---------------------------------------------------

SHAPES = ((5, 6), (2, 3))
B, Q, M, DH, P = 2, 13, 2, 5, 2  # DH not a power of two; Q not a multiple of the query block
L, S = len(SHAPES), sum(h * w for h, w in SHAPES)
BLOCKS = dict(block_q=8, block_q_value=4)
CENTRE_Q = 4  # every location of this query lies exactly on a pixel centre
# These queries (spread over several query blocks) put all their points of head 0, level 0 on one
# location: 16 atomic adds per corner pixel and batch item in the value gradient.
CROWD_Q = slice(5, Q)


def _edge_locations(rng) -> np.ndarray:
    """``[B, Q, M, L, P, 2]``: off-map, half-off, far, non-finite, pixel-centre and crowded."""
    loc = cases.hard_locations(rng, (B, Q, M, L, P, 2))
    for lvl, (h, w) in enumerate(SHAPES):
        loc[:, CENTRE_Q, :, lvl, :, 0] = (rng.integers(0, w, size=(B, M, P)) + 0.5) / w
        loc[:, CENTRE_Q, :, lvl, :, 1] = (rng.integers(0, h, size=(B, M, P)) + 0.5) / h
    loc[:, CROWD_Q, 0, 0, :] = [0.37, 0.61]
    return loc.astype(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_edge_cases_match_xla(dtype):
    rng = np.random.default_rng(0)
    value = jnp.asarray(rng.normal(size=(B, S, M, DH)), dtype)
    loc = _edge_locations(rng)
    attn = jnp.asarray(rng.uniform(size=(B, Q, M, L, P)), dtype)
    ct = _cotangent(rng, B, Q, M * DH).astype(dtype)
    fn = lambda v, l, a: pallas_kernels.ms_deform_attn(v, SHAPES, l, a, **BLOCKS)
    out, (g_v, g_l, g_a) = _value_and_grads(fn, (value, jnp.asarray(loc), attn), ct)
    assert out.dtype == value.dtype and g_v.dtype == value.dtype and g_a.dtype == attn.dtype
    assert g_l.dtype == jnp.float32
    # Reference: XLA in float32 on the same (rounded) inputs.
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    ref = lambda v, l, a: ms_deform_attn_xla(v, SHAPES, l, a)
    r_out, (r_v, r_l, r_a) = _value_and_grads(ref, (f32(value), jnp.asarray(loc), f32(attn)), f32(ct))
    tol = F32_TOL if dtype == "float32" else BF16_TOL
    _close(out, r_out, tol, "output")
    _close(g_v, r_v, tol, "grad value")
    _close(g_a, r_a, tol, "grad weights")
    # The location gradient is one-sided on pixel centres (floor): compared elsewhere only.
    off_centre = np.ones(loc.shape, bool)
    off_centre[:, CENTRE_Q] = False
    _close(g_l, r_l, tol, "grad locations", keep=off_centre)
    cases.check_nonfinite(loc, g_l, g_a)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_edge_cases_match_xla(dtype):
    rng = np.random.default_rng(1)
    value = jnp.asarray(rng.normal(size=(B, S, M, DH)), dtype)
    ref_pts = rng.uniform(size=(B, Q, 2)).astype(np.float32)
    norm = np.array([[w, h] for h, w in SHAPES], np.float32)[None, None, None, :, None]
    # Offsets that reproduce the edge-case locations (up to rounding) from the reference points.
    offsets = (_edge_locations(rng) - ref_pts[:, :, None, None, None]) * norm
    logits = (2 * rng.normal(size=(B, Q, M, L * P))).astype(np.float32)
    ct = _cotangent(rng, B, Q, M * DH).astype(dtype)
    fn = lambda v, r, o, z: pallas_kernels.ms_deform_attn_fused(v, SHAPES, r, o, z, **BLOCKS)
    args = (value, jnp.asarray(ref_pts), jnp.asarray(offsets), jnp.asarray(logits))
    out, (g_v, g_r, g_o, g_z) = _value_and_grads(fn, args, ct)
    assert out.dtype == value.dtype and g_v.dtype == value.dtype
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    ref = lambda v, r, o, z: ops.ms_deform_attn_fused(v, SHAPES, r, o, z, impl="xla")
    r_out, (r_v, r_r, r_o, r_z) = _value_and_grads(ref, (f32(value), *args[1:]), f32(ct))
    tol = F32_TOL if dtype == "float32" else BF16_TOL
    _close(out, r_out, tol, "output")
    _close(g_v, r_v, tol, "grad value")
    _close(g_z, r_z, tol, "grad logits")
    off_centre = np.ones(offsets.shape, bool)
    off_centre[:, CENTRE_Q] = False
    _close(g_o, r_o, tol, "grad offsets", keep=off_centre)
    _close(g_r, r_r, tol, "grad reference points", keep=off_centre[:, :, 0, 0, 0])
    bad = ~np.isfinite(offsets).all(-1)
    for g in (g_r, g_o, g_z):
        assert np.isfinite(np.asarray(g)).all()
    assert np.abs(np.asarray(g_o)[bad]).max() == 0.0


# --- level / point / head counts, through the public dispatch -------------------------------


def _random_case(rng, shapes, b, q, m, dh, p):
    n_l, s = len(shapes), sum(h * w for h, w in shapes)
    value = jnp.asarray(rng.normal(size=(b, s, m, dh)), jnp.float32)
    loc = jnp.asarray(rng.uniform(-0.2, 1.2, size=(b, q, m, n_l, p, 2)), jnp.float32)
    attn = jnp.asarray(rng.uniform(size=(b, q, m, n_l, p)), jnp.float32)
    return value, loc, attn, _cotangent(rng, b, q, m * dh)


@pytest.mark.parametrize(
    "shapes, b, q, m, dh, p",
    [
        (((3, 3),), 1, 5, 1, 4, 1),  # one level, one point, default (larger than Q) blocks
        (((4, 4), (2, 3), (1, 1), (3, 1)), 1, 6, 3, 16, 1),  # four levels
    ],
)
def test_level_and_point_counts_via_ops(shapes, b, q, m, dh, p):
    rng = np.random.default_rng(2)
    value, loc, attn, ct = _random_case(rng, shapes, b, q, m, dh, p)
    pallas = lambda v, l, a: ops.ms_deform_attn(v, shapes, l, a, impl="pallas")
    out, grads = _value_and_grads(pallas, (value, loc, attn), ct)
    r_out, r_grads = _value_and_grads(_xla(shapes), (value, loc, attn), ct)
    _close(out, r_out, F32_TOL, "output")
    for g, r, name in zip(grads, r_grads, ("value", "locations", "weights")):
        _close(g, r, F32_TOL, f"grad {name}")


def test_fused_level_and_point_counts_via_ops():
    rng = np.random.default_rng(3)
    shapes, b, q, m, dh, p = ((4, 5),), 2, 3, 3, 8, 3  # one level, three points
    value = jnp.asarray(rng.normal(size=(b, sum(h * w for h, w in shapes), m, dh)), jnp.float32)
    ref_pts = jnp.asarray(rng.uniform(size=(b, q, 2)), jnp.float32)
    offsets = jnp.asarray(rng.normal(scale=1.5, size=(b, q, m, len(shapes), p, 2)), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(b, q, m, len(shapes) * p)), jnp.float32)
    ct = _cotangent(rng, b, q, m * dh)
    args = (value, ref_pts, offsets, logits)
    fused = lambda impl: lambda v, r, o, z: ops.ms_deform_attn_fused(v, shapes, r, o, z, impl=impl)
    out, grads = _value_and_grads(fused("pallas"), args, ct)
    r_out, r_grads = _value_and_grads(fused("xla"), args, ct)
    _close(out, r_out, F32_TOL, "output")
    for g, r, name in zip(grads, r_grads, ("value", "reference points", "offsets", "logits")):
        _close(g, r, F32_TOL, f"grad {name}")


# --- glue --------------------------------------------------------------------------------------


def test_batch_sharded_matches_unsharded():
    devices = jax.devices()[: 2 if jax.device_count() >= 2 else 1]
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    rng = np.random.default_rng(4)
    shapes = ((3, 4),)
    value, loc, attn, ct = _random_case(rng, shapes, 2, 5, 2, 4, 1)
    sharded = lambda v, l, a: pallas_kernels.ms_deform_attn(v, shapes, l, a, mesh=mesh, batch_axis="data")
    out, grads = _value_and_grads(sharded, (value, loc, attn), ct)
    r_out, r_grads = _value_and_grads(_xla(shapes), (value, loc, attn), ct)
    _close(out, r_out, F32_TOL, "output")
    for g, r in zip(grads, r_grads):
        _close(g, r, F32_TOL, "grad")


def test_lowers_to_triton_for_gpu():
    """Both entry points (forward and backward) lower to Triton kernels for a CUDA target, also
    from a machine without a GPU: catches primitives or shapes the Triton lowering rejects."""
    shapes, b, q, m, dh, p = ((4, 5), (2, 3)), 2, 7, 2, 3, 3
    v = jnp.zeros((b, 26, m, dh), jnp.bfloat16)
    loc, attn = jnp.zeros((b, q, m, 2, p, 2)), jnp.zeros((b, q, m, 2, p), jnp.bfloat16)
    ref_pts, logits = jnp.zeros((b, q, 2)), jnp.zeros((b, q, m, 2 * p))
    ct = jnp.zeros((b, q, m * dh), jnp.bfloat16)
    cases = [
        (lambda v, l, a: pallas_kernels.ms_deform_attn(v, shapes, l, a, interpret=False), (v, loc, attn)),
        (lambda v, r, o, z: pallas_kernels.ms_deform_attn_fused(v, shapes, r, o, z, interpret=False),
         (v, ref_pts, loc.astype(jnp.float32), logits)),
    ]
    for fn, args in cases:

        def run(args, ct):
            out, vjp = jax.vjp(fn, *args)
            return out, vjp(ct)

        text = jax.jit(run).trace(args, ct).lower(lowering_platforms=("cuda",)).as_text()
        for name in ("msda_forward", "msda_grad_inputs", "msda_grad_value"):
            assert f'name = "{name}"' in text, name


def test_default_blocks_follow_the_kernel_report():
    """Block sizes per head width (``benchmarks/results/kernel_report.md``): [block, C] tiles of
    2048 elements in the plain forward, 1024 elsewhere, blocks within [8, 128]."""
    from jax_adapter.pallas_kernels._common import make_config

    def blocks(entry, dh):
        cfg = make_config(entry, dh, True, None, None, None, None)
        return cfg.block_q, cfg.block_q_grad, cfg.block_q_value

    assert blocks("plain", 64) == (32, 16, 8)  # ViT-S adapter
    assert blocks("fused", 64) == (16, 16, 8)
    assert blocks("plain", 12) == (128, 64, 8) and blocks("fused", 12) == (64, 64, 8)  # DINOv3 ViT-S
    assert blocks("plain", 128) == (16, 8, 8) and blocks("fused", 128) == (8, 8, 8)  # DINOv3 7B
    assert blocks("fused", 3) == (128, 128, 8)  # the tiny test model
    assert make_config("plain", 64, True, 4, 2, None, None).block_q_grad == 4  # explicit wins


def _triton_ir(fn, args, ct) -> dict:
    """Kernel name -> Triton IR text of every Pallas kernel in ``jax.vjp(fn)`` lowered for CUDA
    (read from the custom calls' backend config; uses jaxlib's MLIR bindings, no GPU)."""
    from jax._src.interpreters import mlir as jmlir
    from jax._src.lib.mlir import ir
    from jaxlib.triton import dialect as triton_dialect

    def run(args, ct):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(ct)

    module = jax.jit(run).trace(args, ct).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    found = {}

    def walk(op):
        op = op.operation if hasattr(op, "operation") else op
        if op.name == "stablehlo.custom_call" and "triton" in ir.StringAttr(op.attributes["call_target_name"]).value:
            cfg = ir.DictAttr(op.attributes["mhlo.backend_config"])
            with jmlir.make_ir_context() as ctx, ir.Location.unknown():
                triton_dialect.register_dialect(ctx)
                text = ir.Module.parse(ir.StringAttr(cfg["ir"]).value_bytes).operation.get_asm()
            found[ir.StringAttr(cfg["name"]).value] = text
        for region in op.regions:
            for block in region:
                for inner in block:
                    walk(inner)

    walk(module.operation)
    return found


@pytest.mark.parametrize("entry", ["ms_deform_attn", "ms_deform_attn_fused"])
def test_kernel_code_does_not_grow_with_levels_and_points(entry):
    """The points are walked in a rolled loop: the same loads and atomics for L*P = 1 and 6.
    (Unrolled over levels, points and corners, the kernels spilled heavily on sm_80/sm_90.)"""
    counts = []
    for shapes, p in ((((4, 5),), 1), (((4, 5), (2, 3)), 3)):
        n_l, s, b, q, m, dh = len(shapes), sum(h * w for h, w in shapes), 2, 7, 2, 3
        sds = jax.ShapeDtypeStruct
        v, ct = sds((b, s, m, dh), jnp.float32), sds((b, q, m * dh), jnp.float32)
        if entry == "ms_deform_attn":
            fn = lambda v, l, a: pallas_kernels.ms_deform_attn(v, shapes, l, a, interpret=False)
            args = (v, sds((b, q, m, n_l, p, 2), jnp.float32), sds((b, q, m, n_l, p), jnp.float32))
        else:
            fn = lambda v, r, o, z: pallas_kernels.ms_deform_attn_fused(v, shapes, r, o, z, interpret=False)
            args = (v, sds((b, q, 2), jnp.float32), sds((b, q, m, n_l, p, 2), jnp.float32),
                    sds((b, q, m, n_l * p), jnp.float32))
        irs = _triton_ir(fn, args, ct)
        assert sorted(irs) == ["msda_forward", "msda_grad_inputs", "msda_grad_value"]
        assert all("scf.for" in text for text in irs.values())
        counts.append({k: (t.count("tt.load"), t.count("tt.atomic_rmw"), t.count("tt.store")) for k, t in irs.items()})
    assert counts[0] == counts[1], counts
