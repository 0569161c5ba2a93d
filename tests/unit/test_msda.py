"""The XLA sampling core against the PyTorch reference (float64) and against a direct formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_adapter.nn import msda as ops
from tests.helpers import load_npz, rel_err


@pytest.fixture(scope="module")
def core():
    return load_npz("msda_core_io.npz")


def _shapes(core):
    return tuple(map(tuple, core["spatial_shapes"].tolist()))


GRAD_NAMES = ("grad_value", "grad_sampling_locations", "grad_attention_weights")


def _fixture_fwd_bwd_float64(core):
    """The XLA core's output and gradients on the fixture's inputs and cotangent, in float64."""
    with jax.enable_x64(True):
        f = lambda v, l, a: ops.ms_deform_attn(v, _shapes(core), l, a, impl="xla")  # noqa: E731
        args = [jnp.asarray(core[k], jnp.float64) for k in ("value", "sampling_locations", "attention_weights")]
        out, vjp = jax.vjp(f, *args)
        return out, vjp(jnp.asarray(core["cotangent"]))


def test_fixture_parity_float64_with_gradients(core):
    # Tolerance: 1e-6 relative to each array's largest value, in float64.
    out, grads = _fixture_fwd_bwd_float64(core)
    assert out.dtype == jnp.float64
    assert rel_err(out, core["output"]) < 1e-6
    for g, name in zip(grads, GRAD_NAMES):
        assert rel_err(g, core[name]) < 1e-6, name
    # The fixture must really exercise out-of-map locations.
    loc = core["sampling_locations"]
    assert (loc < 0).any() and (loc > 1).any()


@pytest.mark.parametrize("per_scatter", [1, 5])
def test_value_gradient_in_corner_groups_float64(core, monkeypatch, per_scatter):
    # The CPU backward scatters the value gradient in groups of corners (msda_xla._SCATTER_BYTES);
    # the fixture's queries are few, so by default it is one group. One corner per scatter and
    # groups of 5 (which do not divide the corner count) against the float64 reference: 1e-6.
    from jax_adapter.nn import msda_xla

    q, dh = core["sampling_locations"].shape[1], core["value"].shape[-1]
    corners = int(np.prod(core["sampling_locations"].shape[3:5])) * 4
    assert corners % 5 != 0 and corners > per_scatter
    monkeypatch.setattr(msda_xla, "_SCATTER_BYTES", per_scatter * q * dh * 8)
    _, grads = _fixture_fwd_bwd_float64(core)
    for g, name in zip(grads, GRAD_NAMES):
        assert rel_err(g, core[name]) < 1e-6, name


def _naive(value, shapes, loc, attn):
    """Per-corner formula straight from the definition, in numpy float64."""
    b, _, m, dh = value.shape
    _, q, _, n_l, n_p, _ = loc.shape
    out = np.zeros((b, q, m, dh))
    start = 0
    for l, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].reshape(b, h, w, m, dh)
        start += h * w
        for bi in range(b):
            for qi in range(q):
                for mi in range(m):
                    for pi in range(n_p):
                        x = loc[bi, qi, mi, l, pi, 0] * w - 0.5
                        y = loc[bi, qi, mi, l, pi, 1] * h - 0.5
                        if not (np.isfinite(x) and np.isfinite(y)):
                            continue
                        x0, y0 = int(np.floor(x)), int(np.floor(y))
                        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= yy < h and 0 <= xx < w:
                                    out[bi, qi, mi] += attn[bi, qi, mi, l, pi] * wy * wx * v[bi, yy, xx, mi]
    return out.reshape(b, q, m * dh)


def test_matches_naive_formula_with_far_and_nonfinite_locations():
    rng = np.random.default_rng(0)
    shapes = ((4, 5), (2, 3))
    b, q, m, dh, n_p = 2, 7, 2, 3, 3
    value = rng.normal(size=(b, 26, m, dh)).astype(np.float32)
    loc = rng.uniform(-0.6, 1.6, size=(b, q, m, 2, n_p, 2)).astype(np.float32)
    loc[0, 0, 0, 0, 0] = [np.nan, 0.5]
    loc[0, 1, 1, 1, 2] = [np.inf, -np.inf]
    loc[1, 2, 0, 0, 1] = [1e9, -1e9]
    attn = rng.uniform(size=(b, q, m, 2, n_p)).astype(np.float32)
    out = ops.ms_deform_attn(value, shapes, loc, attn, impl="xla")
    # float32 tolerance: 1e-5 relative.
    assert rel_err(out, _naive(value, shapes, loc, attn)) < 1e-5
    grads = jax.grad(lambda v, l, a: ops.ms_deform_attn(v, shapes, l, a, impl="xla").sum(), argnums=(0, 1, 2))(
        jnp.asarray(value), jnp.asarray(loc), jnp.asarray(attn))
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    assert float(jnp.abs(grads[1][0, 0, 0, 0, 0]).max()) == 0.0


def test_fused_equals_unfused():
    rng = np.random.default_rng(1)
    shapes = ((4, 5), (2, 3))
    b, q, m, dh, n_l, n_p = 2, 6, 3, 4, 2, 2
    value = jnp.asarray(rng.normal(size=(b, 26, m, dh)), jnp.float32)
    ref = jnp.asarray(rng.uniform(size=(b, q, 2)), jnp.float32)
    off = jnp.asarray(rng.normal(size=(b, q, m, n_l, n_p, 2)), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(b, q, m, n_l * n_p)), jnp.float32)
    fused = ops.ms_deform_attn_fused(value, shapes, ref, off, logits, impl="xla")
    norm = np.array([[w, h] for h, w in shapes], np.float32)
    loc = np.asarray(ref)[:, :, None, None, None] + np.asarray(off) / norm[None, None, None, :, None]
    e = np.exp(np.asarray(logits) - np.asarray(logits).max(-1, keepdims=True))
    attn = (e / e.sum(-1, keepdims=True)).reshape(b, q, m, n_l, n_p)
    assert rel_err(fused, _naive(np.asarray(value, np.float64), shapes, loc, attn)) < 1e-5


def test_bfloat16_accumulates_in_float32():
    rng = np.random.default_rng(2)
    shapes = ((6, 7),)
    value = rng.normal(size=(1, 42, 2, 8)).astype(np.float32)
    loc = rng.uniform(size=(1, 5, 2, 1, 4, 2)).astype(np.float32)
    attn = rng.uniform(size=(1, 5, 2, 1, 4)).astype(np.float32)
    ref = ops.ms_deform_attn(value, shapes, loc, attn, impl="xla")
    out = ops.ms_deform_attn(jnp.asarray(value, jnp.bfloat16), shapes, loc, jnp.asarray(attn, jnp.bfloat16), impl="xla")
    assert out.dtype == jnp.bfloat16
    # bfloat16 tolerance: 2e-2 relative.
    assert rel_err(out, ref) < 2e-2


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {**a, "value": a["value"][0]}, "value must be"),
        (lambda a: {**a, "spatial_shapes": ((4, 4),)}, "S="),
        (lambda a: {**a, "sampling_locations": a["sampling_locations"][..., :1]}, "sampling_locations must be"),
        (lambda a: {**a, "attention_weights": a["attention_weights"][:, :2]}, "attention_weights must be"),
        (lambda a: {**a, "impl": "cuda"}, "impl must be"),
    ],
)
def test_bad_inputs_raise_value_error(change, match):
    args = dict(
        value=np.zeros((1, 6, 2, 4), np.float32),
        spatial_shapes=((2, 3),),
        sampling_locations=np.zeros((1, 3, 2, 1, 2, 2), np.float32),
        attention_weights=np.zeros((1, 3, 2, 1, 2), np.float32),
    )
    args = change(args)
    with pytest.raises(ValueError, match=match):
        ops.ms_deform_attn(**args)


def test_env_override(monkeypatch):
    monkeypatch.setenv(ops.IMPL_ENV, "xla")
    assert ops.resolve_impl("auto") == "xla"
    monkeypatch.setenv(ops.IMPL_ENV, "bogus")
    with pytest.raises(ValueError, match=ops.IMPL_ENV):
        ops.resolve_impl("auto")
    assert ops.resolve_impl("xla") == "xla"


# --- the XLA core's GPU formulation (all (batch, head) pairs at once), checked on CPU ---------


def test_gpu_formulation_fixture_parity_float64(core):
    from jax_adapter.nn.msda_xla import ms_deform_attn_xla

    shapes = _shapes(core)
    with jax.enable_x64(True):
        f = lambda v, l, a: ms_deform_attn_xla(v, shapes, l, a, formulation="gpu")
        args = [jnp.asarray(core[k], jnp.float64) for k in ("value", "sampling_locations", "attention_weights")]
        out, vjp = jax.jit(lambda *a: jax.vjp(f, *a))(*args)
        grads = vjp(jnp.asarray(core["cotangent"]))
    assert rel_err(out, core["output"]) < 1e-10
    for g, name in zip(grads, GRAD_NAMES):
        assert rel_err(g, core[name]) < 1e-10, name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_formulation_matches_cpu_formulation(dtype):
    """Far, non-finite and crowded locations (many queries on one pixel), in both dtypes."""
    from jax_adapter.nn.msda_xla import ms_deform_attn_xla

    rng = np.random.default_rng(3)
    shapes = ((4, 5), (2, 3))
    b, q, m, dh, n_p = 2, 9, 3, 5, 2
    value = jnp.asarray(rng.normal(size=(b, 26, m, dh)), dtype)
    loc = rng.uniform(-0.3, 1.3, size=(b, q, m, 2, n_p, 2)).astype(np.float32)
    loc[0, 0, 0, 0, 0] = [np.nan, 0.5]
    loc[1, 1, 2, 1, 1] = [np.inf, 0.2]
    loc[1, 2, 0, 0, 1] = [1e9, -1e9]
    loc[:, 3:, 1, 0, :] = [0.41, 0.63]
    attn = jnp.asarray(rng.uniform(size=(b, q, m, 2, n_p)), dtype)
    ct = jnp.asarray(rng.normal(size=(b, q, m * dh)), dtype)

    def run(formulation):
        f = lambda v, l, a: ms_deform_attn_xla(v, shapes, l, a, formulation=formulation)
        out, vjp = jax.vjp(f, value, jnp.asarray(loc), attn)
        return (out, *vjp(ct))

    tol = 1e-5 if dtype == "float32" else 2e-2
    for got, want, name in zip(jax.jit(lambda: run("gpu"))(), jax.jit(lambda: run("cpu"))(),
                               ("output", "grad value", "grad locations", "grad weights")):
        assert got.dtype == want.dtype, name
        assert rel_err(np.asarray(got, np.float32), np.asarray(want, np.float32)) < tol, name


def test_formulation_follows_backend():
    from jax_adapter.nn import msda_xla

    assert msda_xla.default_formulation("gpu") == "gpu"
    assert msda_xla.default_formulation("cpu") == "cpu"
    assert msda_xla.default_formulation() == ("gpu" if jax.default_backend() == "gpu" else "cpu")
    with pytest.raises(ValueError, match="formulation"):
        msda_xla.ms_deform_attn_xla(jnp.zeros((1, 4, 1, 2)), ((2, 2),), jnp.zeros((1, 1, 1, 1, 1, 2)),
                                    jnp.zeros((1, 1, 1, 1, 1)), formulation="tpu")


# --- safe dispatch: "auto" falls back to XLA when the Pallas kernels do not compile ----------


def _small_case(rng):
    shapes = ((3, 4),)
    value = jnp.asarray(rng.normal(size=(1, 12, 2, 4)), jnp.float32)
    loc = jnp.asarray(rng.uniform(size=(1, 5, 2, 1, 2, 2)), jnp.float32)
    attn = jnp.asarray(rng.uniform(size=(1, 5, 2, 1, 2)), jnp.float32)
    return shapes, value, loc, attn


@pytest.fixture
def fake_gpu(monkeypatch, gpu_target):
    """Dispatch traces for a GPU; probe results and the one-warning flag start fresh."""
    monkeypatch.delenv(ops.IMPL_ENV, raising=False)
    monkeypatch.setattr(ops, "_PROBES", {})
    monkeypatch.setattr(ops, "_WARNED", False)
    return gpu_target


def test_auto_falls_back_to_xla_with_one_warning(fake_gpu):
    """The compile check really compiles: here the Triton kernels cannot compile for the CPU
    device, which is the failure a GPU with a broken Pallas/Triton toolchain produces."""
    shapes, value, loc, attn = _small_case(np.random.default_rng(4))
    ref = ops.ms_deform_attn(value, shapes, loc, attn, impl="xla")
    with pytest.warns(ops.PallasFallbackWarning, match="falls back to the XLA") as record:
        out = jax.jit(lambda v, l, a: ops.ms_deform_attn(v, shapes, l, a))(value, loc, attn)
        again = ops.ms_deform_attn(value, shapes, loc, attn)  # cached: no second probe or warning
        b, q, m = loc.shape[:3]
        fused = ops.ms_deform_attn_fused(value, shapes, jnp.zeros((b, q, 2)), jnp.zeros(loc.shape),
                                         jnp.zeros((b, q, m, 2)))
    assert len([w for w in record if w.category is ops.PallasFallbackWarning]) == 1
    assert len(ops._PROBES) == 2 and all(e is not None for e in ops._PROBES.values())
    assert rel_err(out, ref) < 1e-6 and rel_err(again, ref) < 1e-6  # jit vs eager rounding
    assert np.isfinite(np.asarray(fused)).all()


def test_auto_uses_pallas_when_it_compiles(fake_gpu, monkeypatch):
    from jax_adapter import pallas_kernels

    probed, called = [], []
    monkeypatch.setattr(ops, "_probe", lambda *a: probed.append(a[0]))
    monkeypatch.setattr(pallas_kernels, "ms_deform_attn", lambda *a, **k: called.append(1) or "pallas")
    shapes, value, loc, attn = _small_case(np.random.default_rng(5))
    assert ops.ms_deform_attn(value, shapes, loc, attn) == "pallas"
    assert ops.ms_deform_attn(value, shapes, loc, attn) == "pallas"
    assert probed == ["ms_deform_attn"] and called == [1, 1]  # probed once per signature


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_explicit_pallas_skips_the_check_and_raises(fake_gpu, monkeypatch, how):
    from jax_adapter import pallas_kernels

    def broken(*a, **k):
        raise RuntimeError("Triton compilation failed (simulated)")

    def no_probe(*a):
        raise AssertionError("an explicit 'pallas' must not be checked")

    monkeypatch.setattr(pallas_kernels, "ms_deform_attn", broken)
    monkeypatch.setattr(ops, "_probe", no_probe)
    if how == "environment":
        monkeypatch.setenv(ops.IMPL_ENV, "pallas")
    shapes, value, loc, attn = _small_case(np.random.default_rng(6))
    with pytest.raises(RuntimeError, match="simulated"):
        ops.ms_deform_attn(value, shapes, loc, attn, impl="pallas" if how == "argument" else "auto")
