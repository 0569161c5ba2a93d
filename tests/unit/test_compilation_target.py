"""Dispatch follows the compilation target, not the backend JAX runs on: the choices of every site
for CPU, GPU and TPU targets, traced on this CPU (no compilation)."""

import jax
import jax.numpy as jnp
import pytest

import jax_adapter
from jax_adapter import compilation, registry
from jax_adapter.errors import ConfigError
from jax_adapter.models.build import build_model
from jax_adapter.nn import attention, conv, msda, msda_xla

TINY = "dinov2_tiny_adapter"


def _decisions(platform, dtype="float32", cc=None):
    """Trace the tiny adapter's forward for ``platform``; what each site chose, and the primitives."""
    cfg = registry.config_of(TINY).replace(dtype=dtype)
    model = build_model("dinov2_adapter", cfg)
    model.eval()
    jax.clear_caches()
    with jax_adapter.target(platform, compute_capability=cc) as t:
        jaxpr = jax.make_jaxpr(lambda x: model(x).features)(jnp.zeros((1, 32, 32, 3), jnp.float32))
    prims = {str(e.primitive) for e in jaxpr.jaxpr.eqns}
    text = str(jaxpr)
    return {k: dict(v) for k, v in t.decisions.items()}, prims, text


def test_no_target_is_the_default_backend():
    t = compilation.current()
    assert t.platform == "cpu" and t.device is jax.devices()[0] and not t.ahead_of_time
    assert msda.resolve_impl("auto") == "xla" and msda_xla.default_formulation() == "cpu"
    assert conv.use_cpu_formulations()


def test_cpu_target_choices():
    decisions, _, text = _decisions("cpu")
    calls = 2 * 4 + 2  # an injector and an extractor per interaction, two extra extractors
    assert decisions == {"msda": {"xla_cpu": calls}, "attention": {"chunked": 4}, "conv_1x1": {"dot": 4},
                         "conv_pool": {"cpu_formulations": decisions["conv_pool"]["cpu_formulations"]},
                         "resize": {"taps": 2},  # the tiny adapter's resizes that change a size
                         "conv_kernel_grad": {"patches": 6},  # the SPM's 3x3 convs, all on small maps
                         "layer_norm": {"fused_vjp": 34}}
    assert "pallas_call" not in text


def test_gpu_target_choices():
    decisions, _, text = _decisions("gpu", cc="9.0")
    assert decisions["msda"] == {"pallas_triton": 10}
    assert decisions["attention"] == {"blocked": 4}  # float32: no cuDNN
    assert set(decisions["conv_pool"]) == {"xla"} and "conv_1x1" not in decisions
    assert decisions["resize"] == {"matmul": 2}
    assert decisions["layer_norm"] == {"autodiff": 34}
    assert text.count("pallas_call") == 10  # the forward kernels, compiled (not interpreted)


def test_tpu_target_choices():
    decisions, _, text = _decisions("tpu")
    assert decisions["msda"] == {"pallas_mosaic": 10}
    assert decisions["attention"] == {"xla": 4}
    assert set(decisions["conv_pool"]) == {"xla"}
    assert decisions["resize"] == {"matmul": 2}
    assert decisions["layer_norm"] == {"autodiff": 34}
    assert "msda_tpu_forward" in text


@pytest.mark.parametrize("cc, want", [("9.0", "cudnn"), ("8.0", "cudnn"), ("7.5", "blocked"), (None, "cudnn")])
def test_gpu_bfloat16_attention_rule(cc, want):
    assert attention.choose_formulation("gpu", jnp.bfloat16, 64, cc) == want


def test_environment_override_reaches_every_target(monkeypatch):
    monkeypatch.setenv(msda.IMPL_ENV, "dense")
    for platform in ("cpu", "gpu", "tpu"):
        assert msda.resolve_impl("auto", platform) == "dense"
    monkeypatch.setenv(msda.IMPL_ENV, "xla")
    decisions, _, _ = _decisions("tpu")
    assert decisions["msda"] == {"xla_cpu": 10}  # the XLA core's per-pair formulation off GPUs


def test_target_context():
    with jax_adapter.target("tpu") as outer:
        assert compilation.current() is outer and outer.ahead_of_time  # no TPU in this process
        with jax_adapter.target("cpu") as inner:
            assert compilation.current() is inner and not inner.ahead_of_time
        assert compilation.current() is outer
    assert compilation.current().platform == "cpu"
    with jax_adapter.target(devices=jax.devices()) as local:
        assert local.platform == "cpu" and not local.ahead_of_time and local.device is jax.devices()[0]
    with jax_adapter.target("cuda") as t:
        assert t.platform == "gpu"
    with pytest.raises(ConfigError, match="platform"):
        with jax_adapter.target("npu"):
            pass
    with pytest.raises(ConfigError, match="platform or devices"):
        with jax_adapter.target():
            pass


def test_ahead_of_time_skips_the_pallas_probe(monkeypatch):
    monkeypatch.delenv(msda.IMPL_ENV, raising=False)
    monkeypatch.setattr(msda, "_probe", lambda *a: (_ for _ in ()).throw(AssertionError("probed")))
    value = jnp.zeros((1, 4, 2, 4))
    with jax_adapter.target("gpu") as t:  # ahead of time: this process has no GPU
        jax.make_jaxpr(lambda v: msda.ms_deform_attn(v, ((2, 2),), jnp.zeros((1, 3, 2, 1, 2, 2)),
                                                     jnp.zeros((1, 3, 2, 1, 2))))(value)
    assert t.decisions == {"msda": {"pallas_triton": 1}}


def test_decisions_are_recorded_only_inside_a_target():
    assert compilation.record("msda", "xla") == "xla"  # no target set: nothing to record into
    with jax_adapter.target("cpu") as t:
        compilation.record("msda", "xla")
        compilation.record("msda", "xla")
    compilation.record("msda", "dense")
    assert t.decisions == {"msda": {"xla": 2}}
