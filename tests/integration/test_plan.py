"""``jax-adapter plan`` compiles the tiny adapter for an H100 and a TPU v5e on this CPU, and its
figures agree with themselves and with the dispatch rules (needs the plan compilers of the test
extra)."""

import pytest

from tests.helpers import run_cli, run_cli_ok

pytestmark = [pytest.mark.aot, pytest.mark.slow]

CALLS = 10  # sampling-core calls of the tiny adapter: 4 interactions x 2, two extra extractors
BLOCKS = 4


def _check_memory(program, device_memory):
    m = program["memory"]
    assert all(isinstance(m[k], int) and m[k] >= 0 for k in ("arguments", "outputs", "aliased", "temporaries"))
    assert m["peak"] >= m["arguments"] > 0
    assert program["fits"]["device"] and program["fits"]["headroom"] == device_memory - m["peak"]
    assert program["compile_s"] > 0 and program["lower_s"] > 0


def test_h100_train_step(capsys):
    r = run_cli_ok(["plan", "--target", "h100", "--preset", "dinov2_tiny_adapter", "--batch", "2",
                    "--image-size", "64x64", "--json"], capsys)
    assert r["target"]["device"] == "NVIDIA H100 80GB HBM3" and r["target"]["memory"] == 84942979072
    p = r["programs"]["train"]
    _check_memory(p, r["target"]["memory"])
    m = p["memory"]
    # the buffers never all live at once; the state is donated (outputs alias the arguments)
    assert m["arguments"] < m["peak"] <= m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]
    assert m["aliased"] > 0 and p["fits"]["default_pool"]
    assert p["dispatch"]["msda"] == {"pallas_triton": CALLS}
    assert p["dispatch"]["attention"] == {"blocked": BLOCKS}  # float32: cuDNN has no flash path
    k = p["kernels"]
    assert k["pallas_kernels"] == {"msda_forward": CALLS, "msda_grad_inputs": CALLS, "msda_grad_value": CALLS}
    assert k["families"]["pallas_triton"] == 3 * CALLS and k["families"]["cublas"] > 0
    assert p["cost"]["flops"] > 0


def test_v5e_forward_and_train_step(capsys):
    r = run_cli_ok(["plan", "--target", "v5e", "--preset", "dinov2_tiny_adapter", "--program", "both",
                    "--batch", "2", "--image-size", "64x64", "--json"], capsys)
    assert r["target"]["memory"] == int(15.75 * (1 << 30))
    fwd, train = r["programs"]["forward"], r["programs"]["train"]
    for p in (fwd, train):
        _check_memory(p, r["target"]["memory"])
        assert p["dispatch"]["msda"] == {"pallas_mosaic": CALLS}
        assert p["dispatch"]["attention"] == {"xla": BLOCKS}
        assert p["memory"]["generated_code"] > 0
    assert fwd["kernels"]["pallas_kernels"] == {"msda_tpu_forward": CALLS}
    assert train["kernels"]["pallas_kernels"] == {"msda_tpu_backward": CALLS, "msda_tpu_forward": CALLS}
    # the TPU sampling core gathers nothing: the forward has no gather or scatter at all
    assert fwd["kernels"]["gathers"] == {"standalone": 0, "fused": 0}
    assert fwd["kernels"]["scatters"] == {"standalone": 0, "fused": 0}
    assert train["memory"]["generated_code"] > fwd["memory"]["generated_code"]


def test_text_report_and_bad_options(capsys):
    rc, out, err = run_cli(["plan", "--target", "v5e", "--preset", "dinov2_tiny_adapter", "--program", "forward",
                            "--batch", "1", "--image-size", "32x32"], capsys)
    assert rc == 0, err
    assert "forward: peak" in out and ": fits" in out and "msda: pallas_mosaic 10" in out
    rc, _, err = run_cli(["plan", "--target", "v5e", "--batch", "3", "--topology", "2x2"], capsys)
    assert rc == 2 and "does not split over the 4 devices" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(["plan", "--target", "v5e", "--topology", "3x3x3"], capsys)
    assert rc == 2 and "topology" in err
    rc, _, err = run_cli(["plan", "--target", "h100", "--topology", "two"], capsys)
    assert rc == 2 and "GPU topology is a device count" in err
