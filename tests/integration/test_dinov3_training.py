"""``jax-adapter train`` on the tiny DINOv3 adapter: the loss falls, the trunk is frozen (no
optimizer state, bit-identical after training) whatever ``--freeze-trunk`` says."""

import pytest
import json
import os

import numpy as np
import optax
from flax import nnx

from jax_adapter import DinoV3AdapterConfig
from jax_adapter.convert.keys import dotted
from jax_adapter.training import (
    Checkpoints, TrainStep, frozen_paths, is_trunk, layer_id, trainable_filter,
)
from jax_adapter.training.synthetic import SegmentationModel, segmentation_loss
from tests.helpers import run_cli


@pytest.mark.slow
def test_train_cli_tiny_dinov3_adapter(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    rc, out, err = run_cli(["train", "--preset", "dinov3_tiny_adapter", "--batch", "2", "--image-size", "64x64",
                            "--steps", "4", "--lr", "1e-3", "--seed", "1", "--workdir", workdir], capsys)
    assert rc == 0, err
    losses = [json.loads(line)["loss"] for line in out.splitlines() if line.startswith("{")]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses
    with open(os.path.join(workdir, "run.json")) as f:
        assert json.load(f)["freeze_trunk"] is True  # without --freeze-trunk

    arrays = Checkpoints(workdir).read()
    trunk = "backbone.backbone."
    assert not [k for k in arrays if k.startswith(("params.", "opt_state.")) and trunk in k]
    stored = {k[len("frozen."):-len(".value")]: v for k, v in arrays.items()
              if k.startswith("frozen." + trunk)}
    # The same seed builds the same initial weights: the trunk must be exactly those.
    initial = SegmentationModel(DinoV3AdapterConfig.preset("dinov3_tiny_adapter"), hidden=64, rngs=nnx.Rngs(1))
    expected = {dotted(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(initial, nnx.Param))
                if dotted(p).startswith(trunk)}
    assert len(expected) > 50 and set(stored) == set(expected)
    for k, v in expected.items():
        assert np.array_equal(stored[k], v), k
    # ... while the adapter did train.
    k = "backbone.level_embed"
    assert not np.array_equal(arrays[f"params.{k}.value"], np.asarray(initial.backbone.level_embed[...]))


def test_python_api_never_trains_the_trunk():
    # TrainStep leaves the always-frozen trunk out of the trained parameters even when asked
    # to train every parameter.
    model = SegmentationModel(DinoV3AdapterConfig.preset("dinov3_tiny_adapter"), hidden=8, rngs=nnx.Rngs(0))
    assert frozen_paths(model) == (("backbone", "backbone"),)
    step = TrainStep(model, segmentation_loss, optax.sgd(0.1),
                     trainable=trainable_filter(False, ("backbone",)))
    params, frozen = step._init_parts[:2]
    trained = {dotted(p) for p, _ in nnx.to_flat_state(params)}
    kept = {dotted(p) for p, _ in nnx.to_flat_state(frozen)}
    assert trained and not [n for n in trained if n.startswith("backbone.backbone.")]
    assert kept and all(n.startswith("backbone.backbone.") for n in kept)


def test_train_cli_refuses_a_trunk_config(tmp_path, capsys, fixtures_dir):
    # A trunk's name means its adapter (as dinov2_vitb14 always did); a trunk's config file
    # holds no adapter to train.
    rc, _, err = run_cli(["train", "--preset", str(fixtures_dir / "dinov3_tiny_mlp.json"), "--steps", "1"], capsys)
    assert rc == 2 and "trunk alone" in err


def test_trunk_names_and_layer_ids_of_a_dinov3_adapter():
    # The trunk sits one level down (``backbone.backbone.*`` inside the segmentation model):
    # it is trunk for freezing and gets the ViT layer ids; every adapter parameter gets depth+1.
    cfg = DinoV3AdapterConfig.preset("dinov3_tiny_adapter")
    model = nnx.eval_shape(lambda: SegmentationModel(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    depth = cfg.depth
    ids = {dotted(p): layer_id(tuple(p), depth, ("backbone",)) for p, _ in nnx.to_flat_state(params)}
    for name, i in ids.items():
        inside = name.startswith("backbone.backbone.")
        assert is_trunk(tuple(name.split(".")), ("backbone",)) == inside, name
        if not inside:
            assert i == depth + 1, name
    assert ids["backbone.backbone.cls_token"] == ids["backbone.backbone.storage_tokens"] == 0
    assert ids["backbone.backbone.patch_embed.proj.kernel"] == 0
    assert ids["backbone.backbone.blocks.2.attn.qkv.kernel"] == 3
    assert ids["backbone.backbone.norm.scale"] == depth + 1
