"""A new user's first hour (the README's examples are run by test_readme.py): extending a finished
training run, the trained model in eval mode and saved, a script named ``convert.py`` beside the
user's code, the trunk's size rule, the command line's help and errors, torch-free use."""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_adapter
from jax_adapter import errors, training
from jax_adapter.cli import CliError, build_parser, main
from jax_adapter.cli import train as train_cli
from jax_adapter.training import synthetic

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _tiny(**changes) -> jax_adapter.AdapterConfig:
    return jax_adapter.AdapterConfig.preset("tiny").replace(**changes)


# --- extending a finished run (issue item 1) ---------------------------------------------------

def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", *argv])


def _record(total_steps: int) -> dict:
    return {"optimizer": {"learning_rate": 2e-4, "total_steps": total_steps}}


def _opt(args, old) -> training.OptimizerConfig:
    return training.OptimizerConfig(learning_rate=args.lr, warmup_steps=args.warmup,
                                    total_steps=train_cli._schedule_steps(args, old))


def test_resume_keeps_the_recorded_schedule_and_refuses_steps_at_learning_rate_zero():
    args = _args("--steps", "400", "--resume", "--workdir", "w")
    opt = _opt(args, _record(200))
    assert opt.total_steps == 200  # kept, not reset to --steps
    with pytest.raises(CliError, match=r"steps 201-400 would run at learning rate 0.*--schedule-steps 400"):
        train_cli._check_schedule(opt, args.steps, recorded=True)
    # Resuming within the recorded schedule is fine and says so.
    within = _opt(_args("--steps", "150", "--resume", "--workdir", "w"), _record(200))
    train_cli._check_schedule(within, 150, recorded=True)
    assert "schedule of 200 steps kept" in train_cli._schedule_note(within, _record(200), 100,
                                                                      training.lr_schedule)


def test_a_longer_schedule_on_resume_is_accepted_and_continues_at_a_nonzero_rate():
    args = _args("--steps", "400", "--resume", "--workdir", "w", "--schedule-steps", "400")
    opt = _opt(args, _record(200))
    train_cli._check_schedule(opt, args.steps, recorded=False)
    note = train_cli._schedule_note(opt, _record(200), 200, training.lr_schedule)
    # The 400-step cosine at step 200 is half the peak; the old schedule had ended at 0.
    assert "changed from 200 to 400 steps: step 201 runs at 0.0001 (was 0)" in note, note
    # The schedule's length is no option a resumed run must repeat; everything else still is.
    old = {"model": {"depth": 4}, "batch": 8, "optimizer": {"learning_rate": 2e-4, "total_steps": 200}}
    train_cli._check_run_record("w", {**old, "optimizer": {"learning_rate": 2e-4, "total_steps": 400}}, old)
    with pytest.raises(CliError, match="differ from the run in w: batch"):
        train_cli._check_run_record("w", {**old, "batch": 4}, old)
    # A fresh run whose schedule ends before --steps is refused the same way.
    with pytest.raises(CliError, match="steps 101-200 would run at learning rate 0"):
        train_cli._check_schedule(_opt(_args("--steps", "200", "--schedule-steps", "100"), None), 200,
                                  recorded=False)


# --- the trained model (items 3 and 4) ---------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    cfg = _tiny(drop_path_rate=0.3)
    model = synthetic.SegmentationModel(cfg, hidden=8, rngs=nnx.Rngs(0))
    model.train()
    step = training.TrainStep(
        model, synthetic.segmentation_loss,
        lambda p: training.make_optimizer(training.OptimizerConfig(total_steps=1), p, depth=cfg.depth),
        mesh=training.make_mesh(jax.devices()[:1]),
    )
    return step, step.init(0)


def _modes(model) -> set:
    """``{(layer type, flag, value)}`` of the mode flags that ``.train()`` / ``.eval()`` set."""
    found = set()
    for _, m in nnx.iter_graph(model):
        for flag in ("deterministic", "use_running_average"):
            if isinstance(getattr(m, flag, None), bool):
                found.add((type(m).__name__, flag, getattr(m, flag)))
    return found


def test_step_model_is_in_eval_mode(trained):
    step, state = trained
    # The tiny model with drop path has both kinds of mode-dependent layers.
    assert _modes(step.model(state)) == {("Dropout", "deterministic", True),
                                         ("BatchNorm2d", "use_running_average", True)}
    assert _modes(step.model(state, train=True)) == {("Dropout", "deterministic", False),
                                                     ("BatchNorm2d", "use_running_average", False)}
    # As the issue saw it: two calls on one input agree (they differed by 4e-3 in train mode).
    forward = nnx.jit(lambda m, x: m(x))
    model = step.model(state)
    images = jnp.asarray(synthetic.synthetic_batch(1, 0, range(2), 28, 28)["images"])
    np.testing.assert_array_equal(np.asarray(forward(model, images)), np.asarray(forward(model, images)))


def test_save_pretrained_takes_the_backbone_and_names_it_for_a_segmentation_model(trained, tmp_path):
    step, state = trained
    model = step.model(state)
    with pytest.raises(errors.CheckpointError,
                       match=r"SegmentationModel: save its backbone, a DinoAdapter: save_pretrained\(model.backbone"):
        jax_adapter.save_pretrained(model, str(tmp_path / "whole"))
    assert not (tmp_path / "whole").exists()
    jax_adapter.save_pretrained(model.backbone, str(tmp_path / "backbone"))
    loaded = jax_adapter.load_pretrained(str(tmp_path / "backbone"))
    assert type(loaded) is jax_adapter.DinoAdapter and loaded.cfg == model.backbone.cfg
    ours = jax.tree_util.tree_leaves_with_path(nnx.state(model.backbone, nnx.Param, nnx.BatchStat))
    theirs = dict(jax.tree_util.tree_leaves_with_path(nnx.state(loaded, nnx.Param, nnx.BatchStat)))
    assert len(ours) == len(theirs) > 100
    for path, x in ours:
        np.testing.assert_array_equal(np.asarray(theirs[path]), np.asarray(x), err_msg=str(path))


# --- a user script named convert.py (item 5) --------------------------------------------------

def test_a_user_script_named_convert_py_does_not_shadow_the_package(tmp_path):
    (tmp_path / "convert.py").write_text("raise SystemExit('the user script convert.py was imported')\n")
    (tmp_path / "pallas_kernels.py").write_text("raise SystemExit('the user script pallas_kernels.py was imported')\n")
    code = (
        "import jax_adapter, jax_adapter.convert.pipeline\n"
        "try:\n    jax_adapter.load_pretrained('missing')\n"
        "except jax_adapter.JaxAdapterError as e:\n    print('refused:', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: missing" in proc.stdout


# --- the trunk's size rule (item 6) ------------------------------------------------------------

def test_dinov2_refuses_sizes_off_the_patch_grid_and_names_the_padding():
    cfg = _tiny().trunk_config()
    trunk = jax_adapter.DinoV2(cfg, rngs=nnx.Rngs(0))
    images = jnp.zeros((1, 20, 50, 3))
    with pytest.raises(errors.InputError, match=r"20x50 is not a multiple of the patch size 14: pad it to "
                                                 r"28x56 \(jax_adapter.nn.images.pad_bottom_right"):
        trunk(images)
    from jax_adapter.nn.images import pad_bottom_right

    assert trunk(pad_bottom_right(images, (28, 56))).patches.shape == (1, 8, cfg.embed_dim)


# --- the command line (items 7, 8 and the error types) -----------------------------------------

def _help_texts():
    parser = build_parser()
    yield "jax-adapter", parser.format_help()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        yield name, p.format_help()


def test_help_has_no_markup_and_demo_says_how_long_it_takes():
    texts = dict(_help_texts())
    for name, text in texts.items():
        assert "``" not in text, (name, text)
    assert "2 minutes on 2 CPU cores" in " ".join(texts["demo"].split())
    train_help = " ".join(texts["train"].split())
    assert "give it to extend a finished run" in train_help


def test_library_errors_are_one_line_and_exit_code_2(monkeypatch, capsys):
    from jax_adapter.convert import pipeline

    def refuse(*a, **k):
        raise errors.ConversionError("x.pth: no tensors found")

    monkeypatch.setattr(pipeline, "inspect_path", refuse)
    assert main(["inspect", "x.pth"]) == 2
    err = capsys.readouterr().err
    assert err == "jax-adapter inspect: error: x.pth: no tensors found\n"
    assert issubclass(CliError, errors.JaxAdapterError) and issubclass(errors.JaxAdapterError, ValueError)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyError("boom"), ValueError("boom"),
                                 TypeError("boom")])
def test_other_exceptions_are_bugs_and_keep_their_traceback(monkeypatch, exc):
    # A plain ValueError comes from numpy/JAX or a missed conversion: a bug, not bad input.
    from jax_adapter.convert import pipeline

    def broken(*a, **k):
        raise exc

    monkeypatch.setattr(pipeline, "inspect_path", broken)
    with pytest.raises(type(exc)):
        main(["inspect", "x.pth"])


def test_library_code_raises_its_own_error_types_for_bad_input():
    # pallas_kernels/ imports nothing of the project (tests/test_layout.py), so its few checks
    # raise plain ValueError; the model's calls reach it through jax_adapter.nn.msda.
    offenders = []
    for folder in ("jax_adapter", "convert"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\bValueError\(", line):  # raised or built to be raised
                    offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert not offenders, "raise a jax_adapter.errors type instead: " + ", ".join(offenders)


# --- torch-free use (item 2) -------------------------------------------------------------------

def test_the_library_and_its_command_line_import_without_torch(tmp_path):
    code = (
        "import sys\nsys.modules['torch'] = None  # any import of torch fails\n"
        "import jax_adapter, jax_adapter.training, jax_adapter.convert.pipeline\n"
        "from jax_adapter.cli import build_parser\nbuild_parser()\nprint('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_train_memory_benchmark_takes_the_train_options_and_writes_only_with_out():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_memory.py"), "--help"],
                          capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--image-size" in proc.stdout and "--size " not in proc.stdout
    assert "default: print only" in " ".join(proc.stdout.split())
