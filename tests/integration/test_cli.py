"""The command line and the package as a user meets them (the README's examples are run by
test_readme.py): the help texts, one-line errors with exit code 2 and tracebacks for bugs, a
script named ``convert.py`` beside the user's code, torch-free use, the trunk's size rule."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import pytest
from flax import nnx

import jax_adapter
from jax_adapter import errors
from jax_adapter.cli import CliError, build_parser, main
from tests.helpers import ROOT, run_python


def _tiny(**changes) -> jax_adapter.DinoV2AdapterConfig:
    return jax_adapter.AdapterConfig.preset("tiny").replace(**changes)


# --- a user script named convert.py ------------------------------------------------------------

def test_a_user_script_named_convert_py_does_not_shadow_the_package(tmp_path):
    (tmp_path / "convert.py").write_text("raise SystemExit('the user script convert.py was imported')\n")
    (tmp_path / "pallas_kernels.py").write_text("raise SystemExit('the user script pallas_kernels.py was imported')\n")
    proc = run_python("import jax_adapter, jax_adapter.convert.pipeline\n"
                      "try:\n    jax_adapter.load_pretrained('missing')\n"
                      "except jax_adapter.JaxAdapterError as e:\n    print('refused:', e)\n",
                      cwd=tmp_path, repository=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: missing" in proc.stdout


# --- the trunk's size rule ---------------------------------------------------------------------

def test_dinov2_refuses_sizes_off_the_patch_grid_and_names_the_padding():
    cfg = _tiny().trunk_config()
    trunk = jax_adapter.DinoV2(cfg, rngs=nnx.Rngs(0))
    images = jnp.zeros((1, 20, 50, 3))
    with pytest.raises(errors.InputError, match=r"20x50 is not a multiple of the patch size 14: pad it to "
                                                 r"28x56 \(jax_adapter.nn.images.pad_bottom_right"):
        trunk(images)
    from jax_adapter.nn.images import pad_bottom_right

    assert trunk(pad_bottom_right(images, (28, 56))).patches.shape == (1, 8, cfg.embed_dim)


# --- the command line and the error types -------------------------------------------------------

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
    # pallas_kernels/ imports nothing of the project (tests/unit/test_layout.py), so its few checks
    # raise plain ValueError; the model's calls reach it through jax_adapter.nn.msda.
    offenders = []
    for folder in ("jax_adapter", "convert"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\bValueError\(", line):  # raised or built to be raised
                    offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert not offenders, "raise a jax_adapter.errors type instead: " + ", ".join(offenders)


# --- torch-free use ----------------------------------------------------------------------------

def test_the_library_and_its_command_line_import_without_torch(tmp_path):
    proc = run_python("import jax_adapter, jax_adapter.training, jax_adapter.convert.pipeline\n"
                      "from jax_adapter.cli import build_parser\nbuild_parser()\nprint('ok')\n",
                      cwd=tmp_path, without_torch=True, repository=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_train_memory_benchmark_takes_the_train_options_and_writes_only_with_out():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cpu.train_memory", "--help"], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--image-size" in proc.stdout and "--size " not in proc.stdout
    assert "default: print only" in " ".join(proc.stdout.split())
