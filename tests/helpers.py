"""What the tests share: the golden fixtures and the models loaded from them, error measures, the
command line in-process.

The fixture loaders here are independent of the converter under test (they go through the key
table of ``convert.keys`` only), so parity tests do not depend on the conversion pipeline.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Dict

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
# Biases that feed a training-mode BatchNorm directly (c1 = fc1(stem) + up(c2) -> norm1) have a
# mathematically zero gradient: the batch mean removes them, and the reference's stored values
# are rounding noise. Relative error is meaningless there.
ZERO_GRADIENT = ("spm.fc1.bias", "up.bias")


# What native libraries log to stderr when a fresh process imports JAX, outside the program's
# control: with JAX's CUDA plugin installed on a machine without a GPU (the test extra installs it
# for the plan tests), the plugin's CUDA stub logs "Could not find cuda drivers" through absl.
_NATIVE_LOG = re.compile(r"^([IWEF]\d{4} [\d:.]+ +\d+ [^ ]+:\d+\] |WARNING: All log messages before absl::InitializeLog\(\))")


def program_stderr(stderr: str) -> list:
    """The lines a fresh process wrote to stderr itself: absl-formatted lines of native libraries
    (``I0000 00:00:...``) and absl's preamble removed."""
    return [ln for ln in stderr.strip().splitlines() if not _NATIVE_LOG.match(ln)]


def load_npz(name: str) -> dict:
    with np.load(FIXTURES / name) as d:
        return {k: d[k] for k in d.files}


def rel_err(actual, expected) -> float:
    """Largest absolute error relative to the largest magnitude of ``expected``."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def nhwc(a):
    """A reference's NCHW array as NHWC."""
    return np.asarray(a).transpose(0, 2, 3, 1)


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def run_cli(argv, capsys):
    """``jax-adapter argv`` in-process -> ``(exit code, stdout, stderr)`` of that call alone."""
    from jax_adapter.cli import main

    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def run_cli_ok(argv, capsys):
    """Like :func:`run_cli` for a call that must succeed and print one JSON record."""
    rc, out, err = run_cli(argv, capsys)
    assert rc == 0, err
    return json.loads(out)


def run_python(code: str, *, cwd=None, without_torch: bool = False, repository: bool = True,
               timeout: float = 300):
    """``python -c code`` in a fresh process on CPU JAX, in ``cwd`` (default: the repository,
    importable as with the tests when ``repository``); with ``without_torch`` every ``import
    torch`` in it fails. Returns the completed process."""
    import os
    import subprocess
    import sys

    if without_torch:
        code = "import sys; sys.modules['torch'] = None  # any import of torch fails\n" + code
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if repository:
        env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd or ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


def convert_without_torch(src, dst):
    """``jax-adapter convert SRC DST --trunk-only`` in a process where torch cannot be imported;
    returns its JSON record (the command must succeed)."""
    proc = run_python("from jax_adapter.cli import main\n"
                      f"sys.exit(main(['convert', {str(src)!r}, {str(dst)!r}, '--trunk-only']))\n",
                      without_torch=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


# --- fixture models ----------------------------------------------------------------------------


def read_state_dict(name: str) -> Dict[str, np.ndarray]:
    """A fixture ``.pth`` (a ``state_dict``, possibly nested) as numpy arrays."""
    from jax_adapter.convert.torch_io import find_state_dict, read_pth, to_numpy

    return to_numpy(find_state_dict(read_pth(str(FIXTURES / f"{name}.pth"))))


def fixture_json(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def seed_adapter(**changes):
    """The seed DinoAdapter fixture (``seed_adapter_tiny``), weights loaded, in eval mode."""
    from flax import nnx

    from jax_adapter import DinoV2Adapter, DinoV2AdapterConfig
    from jax_adapter.convert.keys import load_state_dict

    cfg = DinoV2AdapterConfig(**fixture_json("seed_adapter_tiny")).replace(**changes)
    model = DinoV2Adapter(cfg, rngs=nnx.Rngs(0))
    load_state_dict(model, read_state_dict("seed_adapter_tiny"))
    model.eval()
    return model


def dinov2_trunk(name: str):
    """A DINOv2 trunk fixture (``dinov2_tiny_reg4``, ``dinov2_tiny_noreg``), weights loaded."""
    from flax import nnx

    from jax_adapter import DinoV2
    from jax_adapter.convert.formats.dinov2.infer import dinov2_config_from_hub
    from jax_adapter.convert.formats.dinov2.keys import from_dinov2_hub
    from jax_adapter.convert.keys import load_state_dict

    model = DinoV2(dinov2_config_from_hub(fixture_json(name)), rngs=nnx.Rngs(0))
    load_state_dict(model, from_dinov2_hub(read_state_dict(name)))
    return model


def drop_meta_buffers(sd: Dict[str, np.ndarray], cfg, prefix: str = "") -> Dict[str, np.ndarray]:
    """``sd`` without the DINOv3 trunk's buffers (under ``prefix``), after checking them:
    ``ValueError`` for stored RoPE periods that differ from the config's or a ``bias_mask``
    other than ``[1, 0, 1]`` thirds."""
    sd = dict(sd)
    periods = sd.pop(prefix + "rope_embed.periods", None)
    if periods is not None and not np.allclose(periods, cfg.rope_periods(), rtol=1e-6, atol=0):
        raise ValueError(f"stored rope_embed.periods {periods} differ from the config's {cfg.rope_periods()}")
    for key in [k for k in sd if k.startswith(prefix) and k.endswith("attn.qkv.bias_mask")]:
        mask = sd.pop(key)
        d = mask.shape[0] // 3
        if not np.array_equal(mask, np.repeat(np.array([1.0, 0.0, 1.0], mask.dtype), d)):
            raise ValueError(f"{key} is not the [1, 0, 1] key mask")
    return sd


def load_meta_trunk(model, sd: Dict[str, np.ndarray]):
    """Copy Meta's trunk ``state_dict`` (numpy) into ``model`` (concrete or abstract)."""
    import jax.numpy as jnp
    from flax import nnx

    from jax_adapter.convert.keys import check_fit, convert_tensors, slots

    sd = drop_meta_buffers(sd, model.cfg)
    expected = slots(model)
    check_fit(expected, {k: v.shape for k, v in sd.items()}, source="DINOv3 state_dict")
    arrays = convert_tensors(expected, sd)
    # set_value works on concrete and abstract (nnx.eval_shape) models alike.
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(arrays[".".join(map(str, path))]))
    nnx.update(model, state)
    return model


def dinov3_config(name: str, **overrides):
    from jax_adapter import DinoV3Config

    return DinoV3Config.from_dict({**fixture_json(name), **overrides})


def new_dinov3_trunk(cfg):
    """A trunk to be filled by :func:`load_meta_trunk`: abstract (no random init, which is slow
    op by op on CPU) unless it holds RNG state that loading would not fill."""
    from flax import nnx

    from jax_adapter import DinoV3

    if cfg.rope_augment:
        return DinoV3(cfg, rngs=nnx.Rngs(0))
    return nnx.eval_shape(lambda: DinoV3(cfg, rngs=nnx.Rngs(0)))


def dinov3_trunk(name: str, **overrides):
    """A DINOv3 trunk fixture (``dinov3_tiny_mlp``, ``dinov3_tiny_swiglu64``), weights loaded."""
    return load_meta_trunk(new_dinov3_trunk(dinov3_config(name, **overrides)), read_state_dict(name))


def dinov3_adapter_config(**changes):
    """The tiny ``DINOv3_Adapter`` fixture's config (``changes``: config fields)."""
    from jax_adapter import DinoV3AdapterConfig

    return DinoV3AdapterConfig.from_dict(fixture_json("dinov3_adapter_tiny")).replace(**changes)


def dinov3_adapter(**changes):
    """The DINOv3 adapter fixture in eval mode (``changes``: config fields, e.g. ``with_cp``)."""
    from flax import nnx

    from jax_adapter import DinoV3Adapter
    from jax_adapter.convert.keys import load_state_dict

    cfg = dinov3_adapter_config(**changes)
    model = DinoV3Adapter(cfg, rngs=nnx.Rngs(0))
    load_state_dict(model, drop_meta_buffers(read_state_dict("dinov3_adapter_tiny"), cfg.backbone,
                                             prefix="backbone."))
    model.eval()
    return model


def write_segmentor(path) -> None:
    """The tiny DINOv3 adapter as a segmentor checkpoint, in the reference's container: the adapter
    under ``segmentation_model.0.`` in ``model`` beside an M2F head tensor, and optimizer state."""
    import torch

    adapter = torch.load(str(FIXTURES / "dinov3_adapter_tiny.pth"), map_location="cpu", weights_only=True)
    model = {f"segmentation_model.0.{k}": v for k, v in adapter.items()}
    model["segmentation_model.1.query_embed.weight"] = torch.randn(10, 96, generator=torch.Generator().manual_seed(0))
    torch.save({"model": model, "optimizer": {"step": 12}}, str(path))
