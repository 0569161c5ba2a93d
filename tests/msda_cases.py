"""Inputs, hand-computed expectations and checks shared by the sampling-core tests of the
gather-free implementations (``tests/unit/test_msda_dense.py``, ``tests/unit/test_pallas_tpu.py``)
and of the Triton kernels (``tests/unit/test_pallas_kernels.py``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import load_npz, rel_err

# Level sizes of powers of two keep ``(px + 0.5) / W * W - 0.5 == px`` exact in float32, so the
# pixel-centre and border locations below really sit on the kinks of the bilinear weights.
EDGE_SHAPES = ((4, 8), (3, 5), (1, 1))
EDGE_KINK_LEVEL = 0
B, Q, M, DH, P = 2, 13, 2, 5, 2  # DH not a power of two; Q not a multiple of the test blocks
L, S = len(EDGE_SHAPES), sum(h * w for h, w in EDGE_SHAPES)
KINK_Q = (4, 5)  # every location of these queries lies on a kink of level EDGE_KINK_LEVEL
CROWD_Q = slice(6, Q)  # all points of head 0, level 0 on one location


# Relative to the largest expected magnitude, against the float64 fixture or XLA's float32 core.
TOL = {"float64": 1e-6, "float32": 1e-4, "bfloat16": 2e-2}
GRADS = ("grad_value", "grad_sampling_locations", "grad_attention_weights")
# The tests' small (and interpreted) programs compile several times faster without LLVM
# optimisation and the fusion emitters; compile time is what these tests spend.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def jit(f):
    return jax.jit(f, compiler_options=COMPILER_OPTIONS)


def value_and_grads(fn, args, ct):
    """``fn(*args)`` and the gradients of ``<fn(*args), ct>`` in every argument, jitted."""
    def run(args, ct):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(ct.astype(out.dtype))

    return jit(run)(tuple(args), ct)


def fixture():
    core = load_npz("msda_core_io.npz")
    return core, tuple(map(tuple, core["spatial_shapes"].tolist()))


def kink_coordinates(rng, n: int, size: int) -> np.ndarray:
    """``n`` pixel coordinates on kinks of a map of ``size`` pixels: centres ``0..size-1`` and the
    borders of the support ``-1`` and ``size`` (one past the last centre)."""
    return rng.integers(-1, size + 1, size=n).astype(np.float64)


def hard_locations(rng, shape) -> np.ndarray:
    """``shape`` = ``[B>=2, Q>=4, M>=2, L>=2, P>=2, 2]`` float64 locations in [-0.3, 1.3], eight of
    them off the map, half off it, far away (1e9) and non-finite (NaN, +-inf): four non-finite."""
    loc = rng.uniform(-0.3, 1.3, size=shape)
    loc[0, 0, 0, 0, 0] = [-5.0, 0.5]
    loc[0, 0, 1, 1, 1] = [0.5, 7.0]
    loc[1, 3, 0, 1, 0] = [1e9, -1e9]
    loc[1, 0, 1, 0, 1] = [-0.05, 1.02]  # only some corners on the map
    loc[0, 2, 0, 0, 0] = [np.nan, 0.5]
    loc[0, 2, 1, 1, 0] = [np.inf, 0.5]
    loc[1, 2, 0, 0, 1] = [0.5, -np.inf]
    loc[1, 1, 1, 1, 1] = [np.nan, np.nan]
    return loc


def edge_locations(rng) -> np.ndarray:
    """``[B, Q, M, L, P, 2]`` float32: :func:`hard_locations`, kinks and crowded queries."""
    loc = hard_locations(rng, (B, Q, M, L, P, 2))
    h, w = EDGE_SHAPES[EDGE_KINK_LEVEL]
    for q in KINK_Q:
        loc[:, q, :, EDGE_KINK_LEVEL, :, 0] = (kink_coordinates(rng, B * M * P, w).reshape(B, M, P) + 0.5) / w
        loc[:, q, :, EDGE_KINK_LEVEL, :, 1] = (kink_coordinates(rng, B * M * P, h).reshape(B, M, P) + 0.5) / h
    loc[:, CROWD_Q, 0, 0, :] = [0.37, 0.61]
    loc = loc.astype(np.float32)
    # The premise of the kink queries: float32 pixel coordinates exactly on integers.
    px = loc[:, KINK_Q, :, EDGE_KINK_LEVEL, :, 0] * np.float32(w) - np.float32(0.5)
    py = loc[:, KINK_Q, :, EDGE_KINK_LEVEL, :, 1] * np.float32(h) - np.float32(0.5)
    assert (px == np.round(px)).all() and (py == np.round(py)).all()
    assert (px == -1).any() and (px == w).any() and (py == -1).any()
    return loc


def check_nonfinite(loc, g_loc, g_attn):
    """Non-finite locations: finite gradients everywhere, exactly zero for those points."""
    bad = ~np.isfinite(loc).all(-1)
    assert bad.sum() == 4
    for g in (g_loc, g_attn):
        assert np.isfinite(np.asarray(g, np.float32)).all()
    assert np.abs(np.asarray(g_loc, np.float32)[bad]).max() == 0.0
    assert np.abs(np.asarray(g_attn, np.float32)[bad]).max() == 0.0


def check_fixture_parity(fn, dtype):
    """``fn(value, shapes, loc, attn)`` against the float64 PyTorch fixture's output and three
    gradients in ``dtype`` (locations float32, float64 in the float64 run); dtypes kept."""
    core, shapes = fixture()
    with jax.enable_x64(dtype == "float64"):
        loc_dtype = "float64" if dtype == "float64" else "float32"
        args = (jnp.asarray(core["value"], dtype), jnp.asarray(core["sampling_locations"], loc_dtype),
                jnp.asarray(core["attention_weights"], dtype))
        out, grads = value_and_grads(lambda v, l, a: fn(v, shapes, l, a), args,
                                     jnp.asarray(core["cotangent"], dtype))
        assert out.dtype == jnp.dtype(dtype) and grads[0].dtype == jnp.dtype(dtype)
        assert grads[1].dtype == jnp.dtype(loc_dtype) and grads[2].dtype == jnp.dtype(dtype)
    close(out, core["output"], TOL[dtype], "output")
    for g, name in zip(grads, GRADS):
        close(g, core[name], TOL[dtype], name)


def check_fused_fixture_parity(fn, dtype: str = "float64", tol: float = TOL["float64"], seed: int = 5):
    """``fn(value, shapes, ref, offsets, logits)`` against the float64 PyTorch fixture: its
    weights are a softmax over L*P, so ``logits = log(weights)`` and offsets ``(loc - ref) * (W,
    H)`` reproduce it, and the expected gradients follow by the chain rule."""
    core, shapes = fixture()
    rng = np.random.default_rng(seed)
    loc, attn, g_loc, g_attn = (core[k] for k in (
        "sampling_locations", "attention_weights", "grad_sampling_locations", "grad_attention_weights"))
    b, q, m, n_l, n_p, _ = loc.shape
    norm = np.array([[w, h] for h, w in shapes], np.float64)[None, None, None, :, None]
    ref_pts = rng.uniform(size=(b, q, 2))
    offsets = (loc - ref_pts[:, :, None, None, None]) * norm
    logits = np.log(attn).reshape(b, q, m, n_l * n_p)
    a, ga = attn.reshape(b, q, m, -1), g_attn.reshape(b, q, m, -1)
    expected = {
        "value": core["grad_value"],
        "reference points": g_loc.sum(axis=(2, 3, 4)),
        "offsets": g_loc / norm,
        "logits": a * (ga - (a * ga).sum(-1, keepdims=True)),
    }
    with jax.enable_x64(dtype == "float64"):
        args = [jnp.asarray(x, dtype) for x in (core["value"], ref_pts, offsets, logits)]
        out, grads = value_and_grads(lambda v, r, o, z: fn(v, shapes, r, o, z), args,
                                     jnp.asarray(core["cotangent"], dtype))
    close(out, core["output"], tol, "output")
    for g, (name, e) in zip(grads, expected.items()):
        close(g, e, tol, f"grad {name}")


def check_edge_cases(fn, dtype):
    """``fn(value, loc, attn)`` at :data:`EDGE_SHAPES` on off-map, far, non-finite, crowded and
    kink locations: output and every gradient entry, kinks included, agree with the XLA core
    (float32 on the same rounded inputs), dtypes are kept, non-finite points get zero gradients."""
    from jax_adapter.nn.msda_xla import ms_deform_attn_xla

    rng = np.random.default_rng(0)
    value = jnp.asarray(rng.normal(size=(B, S, M, DH)), dtype)
    loc = edge_locations(rng)
    attn = jnp.asarray(rng.uniform(size=(B, Q, M, L, P)), dtype)
    ct = jnp.asarray(rng.normal(size=(B, Q, M * DH)), dtype)
    out, (g_v, g_l, g_a) = value_and_grads(fn, (value, jnp.asarray(loc), attn), ct)
    assert out.dtype == value.dtype and g_v.dtype == value.dtype and g_a.dtype == attn.dtype
    assert g_l.dtype == jnp.float32
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    ref = lambda v, l, a: ms_deform_attn_xla(v, EDGE_SHAPES, l, a)  # noqa: E731
    r_out, r_grads = value_and_grads(ref, (f32(value), jnp.asarray(loc), f32(attn)), f32(ct))
    close(out, r_out, TOL[dtype], "output")
    for g, r, name in zip((g_v, g_l, g_a), r_grads, ("value", "locations", "weights")):
        close(g, r, TOL[dtype], f"grad {name}")
    check_nonfinite(loc, g_l, g_a)


def check_fused_edge_cases(fn):
    """``fn(value, ref, offsets, logits)`` at :data:`EDGE_SHAPES`, the edge-case locations
    reproduced from reference points and offsets (kinks included), against the XLA fused core in
    float32: output and all four gradients; non-finite offsets get zero, finite gradients."""
    from jax_adapter.nn.msda import ms_deform_attn_fused

    rng = np.random.default_rng(2)
    value = jnp.asarray(rng.normal(size=(B, S, M, DH)), jnp.float32)
    ref_pts = rng.uniform(size=(B, Q, 2)).astype(np.float32)
    norm = np.array([[w, h] for h, w in EDGE_SHAPES], np.float32)[None, None, None, :, None]
    offsets = (edge_locations(rng) - ref_pts[:, :, None, None, None]) * norm
    logits = (2 * rng.normal(size=(B, Q, M, L * P))).astype(np.float32)
    ct = jnp.asarray(rng.normal(size=(B, Q, M * DH)), jnp.float32)
    args = (value, jnp.asarray(ref_pts), jnp.asarray(offsets), jnp.asarray(logits))
    out, grads = value_and_grads(fn, args, ct)
    ref = lambda v, r, o, z: ms_deform_attn_fused(v, EDGE_SHAPES, r, o, z, impl="xla")  # noqa: E731
    r_out, r_grads = value_and_grads(ref, args, ct)
    close(out, r_out, TOL["float32"], "output")
    for g, r, name in zip(grads, r_grads, ("value", "reference points", "offsets", "logits")):
        close(g, r, TOL["float32"], f"grad {name}")
    bad = ~np.isfinite(offsets).all(-1)
    assert bad.any() and np.abs(np.asarray(grads[2])[bad]).max() == 0.0
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()


def random_case(rng, shapes, b, q, m, dh, p, dtype=jnp.float32):
    """``(value, loc, attn, cotangent)`` with locations in [-0.2, 1.2]."""
    n_l, s = len(shapes), sum(h * w for h, w in shapes)
    value = jnp.asarray(rng.normal(size=(b, s, m, dh)), dtype)
    loc = jnp.asarray(rng.uniform(-0.2, 1.2, size=(b, q, m, n_l, p, 2)), jnp.float32)
    attn = jnp.asarray(rng.uniform(size=(b, q, m, n_l, p)), dtype)
    ct = jnp.asarray(rng.normal(size=(b, q, m * dh)), dtype)
    return value, loc, attn, ct


def close(actual, expected, tol, what):
    """``rel_err`` (largest error over the largest expected magnitude) below ``tol``."""
    err = rel_err(np.asarray(actual, np.float64), np.asarray(expected, np.float64))
    print(f"{what}: {err:.3g} (tolerance {tol:g})")  # shown with pytest -s
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"
    return err


# --- the kink convention, computed by hand -------------------------------------------------

KINK_LEVEL_SHAPE = (4, 8)  # H, W (powers of two: exact kinks)
KINK_POINTS = [  # (px, py): interior centres, the four borders of the support, just outside it
    (3.0, 1.25), (2.6, 2.0), (5.0, 1.0), (-1.0, 0.5), (7.0, 2.5), (3.5, -1.0), (4.5, 3.0),
    (8.0, 1.5), (2.0, 4.0), (-1.5, 1.0), (0.0, 0.0),
]


def kink_case(rng):
    """One level, head and point per query, locations on the kinks of :data:`KINK_POINTS`:
    ``(shapes, value [1, H*W, 1, 3], loc [1, n, 1, 1, 1, 2], attn, cotangent)`` in float32."""
    h, w = KINK_LEVEL_SHAPE
    n = len(KINK_POINTS)
    pts = np.asarray(KINK_POINTS)
    loc = np.stack([(pts[:, 0] + 0.5) / w, (pts[:, 1] + 0.5) / h], -1).reshape(1, n, 1, 1, 1, 2)
    value = rng.normal(size=(1, h * w, 1, 3))
    attn = rng.uniform(0.5, 1.5, size=(1, n, 1, 1, 1))
    ct = rng.normal(size=(1, n, 3))
    return ((h, w),), *(np.asarray(x, np.float32) for x in (value, loc, attn, ct))


def kink_expected_grad_loc(value, loc, attn, ct) -> np.ndarray:
    """``d <out, ct> / d loc`` with the floor convention: ``x0 = floor(px)`` picks the corners
    (so at ``px = j`` the slope is the one of ``[j, j+1)``), corners off the map read zero, and a
    location whose 2x2 support misses the map (``x0 < -1`` or ``x0 > W-1``, same for y) has zero
    gradient. Computed in float64 by hand."""
    h, w = KINK_LEVEL_SHAPE
    v = value.reshape(h, w, -1).astype(np.float64)
    out = np.zeros(loc.shape, np.float64)
    for qi in range(loc.shape[1]):
        x, y = loc[0, qi, 0, 0, 0].astype(np.float64)
        px, py = x * w - 0.5, y * h - 0.5
        x0, y0 = np.floor(px), np.floor(py)
        if not (-1 <= x0 <= w - 1 and -1 <= y0 <= h - 1):
            continue
        fx, fy = px - x0, py - y0
        g = ct[0, qi].astype(np.float64)

        def d(yy, xx):  # <g, V[yy, xx]>, zero off the map
            return float(g @ v[int(yy), int(xx)]) if (0 <= yy < h and 0 <= xx < w) else 0.0

        a = float(attn[0, qi, 0, 0, 0])
        dfx = (1 - fy) * (d(y0, x0 + 1) - d(y0, x0)) + fy * (d(y0 + 1, x0 + 1) - d(y0 + 1, x0))
        dfy = (1 - fx) * (d(y0 + 1, x0) - d(y0, x0)) + fx * (d(y0 + 1, x0 + 1) - d(y0, x0 + 1))
        out[0, qi, 0, 0, 0] = [a * dfx * w, a * dfy * h]
    return out


def check_kink_convention(fn, jit=jax.jit):
    """``fn(value, shapes, loc, attn)``'s location gradient on kinks equals the hand-computed
    floor convention (float32, 1e-5 relative) and is not the mirror (ceil) convention."""
    rng = np.random.default_rng(11)
    shapes, value, loc, attn, ct = kink_case(rng)
    h, w = KINK_LEVEL_SHAPE
    for axis, size in ((0, w), (1, h)):  # the integral coordinates are exactly on the kinks
        got = loc[0, :, 0, 0, 0, axis] * np.float32(size) - np.float32(0.5)
        want = np.asarray(KINK_POINTS)[:, axis]
        on_kink = want == np.round(want)
        assert on_kink.sum() >= 6 and (got[on_kink] == want[on_kink]).all()

    def loss(l):
        return jnp.vdot(fn(jnp.asarray(value), shapes, l, jnp.asarray(attn)), jnp.asarray(ct))

    got = np.asarray(jit(jax.grad(loss))(jnp.asarray(loc)))
    want = kink_expected_grad_loc(value, loc, attn, ct)
    close(got, want, 1e-5, "location gradient on kinks")
    # The same check with ceil() corners would differ: the test can tell the conventions apart.
    mirror = -kink_expected_grad_loc(value[:, ::-1], 1 - loc, attn, ct[:, :])  # reflect the map
    assert rel_err(mirror, want) > 1e-2
