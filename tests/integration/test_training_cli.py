"""``jax-adapter train``: 1 vs 8 virtual CPU devices (same losses, same BatchNorm statistics),
stop-and-resume equal to an uninterrupted run, bfloat16 training, and its errors.

Every run is a subprocess: the 8 virtual devices must be configured before JAX starts, and the
rest of the test session keeps its single device. The runs share a persistent compilation
cache, so the runs of one program compile it once.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jax_adapter.training import Checkpoints
from tests.helpers import program_stderr

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Small and quick: tiny preset, 8 samples of 56x84 (one per device on 8 devices), drop path on
# so that the random streams are exercised by resume and by sharding.
COMMON = ["--preset", "tiny", "--batch", "8", "--image-size", "56x84", "--steps", "5",
          "--drop-path", "0.1", "--seed", "3"]


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    done = {}

    def run(name, *args, workdir_of=None, expect_rc=0):
        """Run ``jax-adapter train *args`` once per name, in workdir ``run_<name>`` (or that of
        the run ``workdir_of``); returns (per-step records, stderr, workdir)."""
        if name in done:
            return done[name]
        workdir = str(tmp_path_factory.getbasetemp() / f"run_{workdir_of or name}")
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        env.pop("XLA_FLAGS", None)
        cmd = [sys.executable, "-m", "jax_adapter.cli", "train", "--workdir", workdir, *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == expect_rc, proc.stderr[-3000:]
        records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        done[name] = (records, proc.stderr, workdir)
        return done[name]

    return run


def _losses(records):
    return {r["step"]: r["loss"] for r in records}


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_losses_and_batchnorm_statistics(train):
    one, _, wd1 = train("one", *COMMON, "--devices", "1")
    eight, _, wd8 = train("eight", *COMMON, "--devices", "8")
    l1, l8 = _losses(one), _losses(eight)
    assert sorted(l1) == sorted(l8) == [1, 2, 3, 4, 5]
    # Same global batch, different reduction order: 1e-5 relative.
    np.testing.assert_allclose([l8[s] for s in l8], [l1[s] for s in l8], rtol=1e-5)
    a, b = Checkpoints(wd1).read(), Checkpoints(wd8).read()
    assert int(a["step"]) == int(b["step"]) == 5
    stats = [k for k in a if k.startswith("batch_stats.")]
    assert len(stats) == 3 * 10  # mean, var, count of the 10 BatchNorms (6 in the SPM, norm1..4)
    for k in stats:
        # Global (SyncBatchNorm) statistics: the 8-device run normalises each sample with the
        # statistics of all 8, as the single device does. Tolerance 1e-4 of the array's largest
        # value: spm.fc1.bias and up.bias, which feed norm1 and have a mathematically zero
        # gradient, drift with the rounding noise that Adam normalises, and norm1's running mean
        # follows them (about 1e-5 after 5 steps); all other statistics agree to about 1e-7.
        assert a[k].dtype == b[k].dtype, k
        assert rel_max(a[k], b[k]) < 1e-4, (k, rel_max(a[k], b[k]))


def rel_max(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-30))


@pytest.mark.slow
def test_stop_and_resume_repeats_the_uninterrupted_losses(train):
    full, _, wd_full = train("one", *COMMON, "--devices", "1")
    first, _, wd = train("first_part", *COMMON, "--devices", "1", "--stop-after", "2")
    assert [r["step"] for r in first] == [1, 2]
    assert Checkpoints(wd).all_steps() == [2]
    rest, err, _ = train("resumed", *COMMON, "--devices", "1", "--resume", workdir_of="first_part")
    assert "resumed from step 2" in err
    assert [r["step"] for r in rest] == [3, 4, 5]
    # Same program, same state, same data: bit-identical losses and final state.
    assert _losses(first) == {s: l for s, l in _losses(full).items() if s <= 2}
    assert _losses(rest) == {s: l for s, l in _losses(full).items() if s > 2}
    a, b = Checkpoints(wd_full).read(), Checkpoints(wd).read()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_bfloat16_training_runs_50_steps_with_falling_loss(train):
    records, _, wd = train("bf16", "--preset", "tiny", "--bf16", "--steps", "50", "--batch", "4",
                           "--image-size", "56x84", "--lr", "5e-4", "--devices", "1")
    losses = np.array([r["loss"] for r in records])
    assert len(losses) == 50 and np.isfinite(losses).all()
    assert losses[-10:].mean() < 0.9 * losses[:10].mean(), losses
    assert all(r["step_time_s"] > 0 for r in records)
    # float32 parameters and optimizer state; bfloat16 is the compute dtype only.
    arrays = Checkpoints(wd).read()
    floats = [v for k, v in arrays.items() if k.startswith(("params.", "opt_state.")) and v.dtype.kind == "f"]
    assert floats and all(v.dtype == np.float32 for v in floats)


@pytest.mark.parametrize("args, message", [
    (["--image-size", "56"], "bad --image-size"),
    (["--devices", "4", "--batch", "6"], "not divisible by the 4 devices"),
    (["--preset", "no_such_preset"], "neither a registered model"),
    (["--resume"], "--resume needs --workdir"),
])
def test_bad_options_fail_with_one_line_and_exit_code_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "jax_adapter.cli", "train", *args], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = program_stderr(proc.stderr)
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


@pytest.mark.slow
def test_workdir_with_checkpoints_needs_resume_and_the_same_options(train):
    _, _, wd = train("one", *COMMON, "--devices", "1")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    base = [sys.executable, "-m", "jax_adapter.cli", "train", "--workdir", wd]
    proc = subprocess.run(base + COMMON, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr and "--resume" in proc.stderr, \
        proc.stderr[-2000:]
    changed = [a if a != "3" else "4" for a in COMMON]  # another --seed
    proc = subprocess.run(base + changed + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "differ from the run" in proc.stderr and "seed" in proc.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_give_the_same_losses_as_one(train, tmp_path):
    # Multi-host data parallelism, emulated by two CPU processes on this machine (one device
    # each, collectives over gloo): each process generates its half of the global batch.
    import socket

    one, _, _ = train("one", *COMMON, "--devices", "1")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jax_adapter.cli", "train", *COMMON, "--workdir", str(tmp_path),
             "--distributed", "--coordinator-address", f"localhost:{port}", "--num-processes", "2",
             "--process-id", str(i)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    records = [json.loads(line) for line in outs[0][0].splitlines() if line.startswith("{")]
    assert not [line for line in outs[1][0].splitlines() if line.startswith("{")]  # only process 0
    # Tolerance as for 8 devices: 1e-5 relative.
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in one], rtol=1e-5)
    assert int(Checkpoints(str(tmp_path)).read()["step"]) == 5
