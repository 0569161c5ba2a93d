"""Training helpers: the optimizer recipe, the jitted train step against the PyTorch fixture, a
frozen trunk, activation checkpointing and bfloat16 (in process, one device).

``jax-adapter train`` on 1 and 8 virtual devices, checkpoints and resume are in
``test_training_cli.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jax_adapter import AdapterConfig, training
from jax_adapter.convert.keys import key_table
from jax_adapter.training import synthetic
from tests.helpers import ZERO_GRADIENT, load_npz, rel_err, seed_adapter

TINY = AdapterConfig.preset("tiny")
BACKBONE = ("backbone",)


def _names(state) -> dict:
    """``{"backbone.blocks.0.attn.qkv.kernel": leaf value}``."""
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}


# --------------------------------------------------------------------------- recipe (no compile)

@pytest.fixture(scope="module")
def abstract_params():
    model = nnx.eval_shape(lambda: synthetic.SegmentationModel(TINY, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


def test_layer_ids_follow_the_vit_adapter_recipe(abstract_params):
    depth, decay = TINY.depth, 0.5
    scales = _names(training.lr_scales(abstract_params, depth, decay, BACKBONE))
    expect = {
        "backbone.pos_embed": 0, "backbone.cls_token": 0, "backbone.patch_embed.proj.kernel": 0,
        "backbone.blocks.0.attn.qkv.kernel": 1, "backbone.blocks.3.mlp.fc2.bias": 4,
        "backbone.level_embed": 5, "backbone.spm.stem.0.kernel": 5,
        "backbone.interactions.0.injector.attn.value_proj.kernel": 5, "backbone.up.kernel": 5,
        "backbone.norm1.scale": 5, "head.cls.kernel": 5,
    }
    for name, layer in expect.items():
        assert scales[name] == pytest.approx(decay ** (depth + 1 - layer)), name
    assert set(scales.values()) == {decay ** k for k in range(depth + 2)}


def test_weight_decay_only_on_matrices_and_kernels(abstract_params):
    mask = _names(training.weight_decay_mask(abstract_params))
    assert mask["backbone.blocks.0.attn.qkv.kernel"] and mask["backbone.spm.stem.0.kernel"]
    assert mask["backbone.up.kernel"] and mask["head.cls.kernel"]
    for name in ("backbone.blocks.0.attn.qkv.bias", "backbone.blocks.0.ls1.gamma",
                 "backbone.pos_embed", "backbone.cls_token", "backbone.level_embed",
                 "backbone.interactions.0.injector.gamma", "backbone.norm1.scale"):
        assert not mask[name], name


def test_trainable_filter_freezes_exactly_the_trunk(abstract_params):
    model = nnx.eval_shape(lambda: synthetic.SegmentationModel(TINY, rngs=nnx.Rngs(0)))
    _, trained, frozen, _ = nnx.split(
        model, training.trainable_filter(True, BACKBONE), nnx.Param, ...
    )
    trunk = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm")
    assert frozen and all(k.split(".")[1] in trunk for k in _names(frozen))
    assert not any(k.startswith("backbone.") and k.split(".")[1] in trunk for k in _names(trained))
    assert len(_names(trained)) + len(_names(frozen)) == len(_names(abstract_params))


def test_schedule_warmup_then_cosine():
    cfg = training.OptimizerConfig(learning_rate=1e-3, warmup_steps=10, total_steps=110,
                                   end_lr_ratio=0.1)
    lr = training.lr_schedule(cfg)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(60)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-5)  # cosine midpoint
    assert float(lr(110)) == pytest.approx(1e-4)


def test_optimizer_scales_updates_per_layer_like_adamw_param_groups():
    # First AdamW step with bias correction: update = -lr * scale * (g / (|g| + eps) + wd * p).
    # Tolerance 1e-4: Adam's float32 bias correction (1 - 0.999) is inexact at 1e-5.
    params = {"blocks": {0: {"w": jnp.full((2, 2), 2.0)}, 1: {"w": jnp.full((2, 2), 2.0)}},
              "pos_embed": jnp.full((1, 3, 2), 2.0), "head": {"b": jnp.full((2,), 2.0)}}
    cfg = training.OptimizerConfig(learning_rate=0.1, weight_decay=0.5, layer_decay=0.5,
                                   total_steps=100, eps=0.0)
    tx = training.make_optimizer(cfg, params, depth=2)
    grads = jax.tree.map(lambda p: -jnp.ones_like(p), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    lr = 0.1
    np.testing.assert_allclose(updates["pos_embed"], lr * 0.5 ** 3 * 1.0, rtol=1e-4)  # no decay
    np.testing.assert_allclose(updates["blocks"][0]["w"], lr * 0.5 ** 2 * (1.0 - 0.5 * 2), atol=1e-6)
    np.testing.assert_allclose(updates["blocks"][1]["w"], lr * 0.5 * (1.0 - 0.5 * 2), atol=1e-6)
    np.testing.assert_allclose(updates["head"]["b"], lr * 1.0, rtol=1e-4)  # vector: no decay


# --------------------------------------------------------------------------- fixture parity

def _recorder() -> optax.GradientTransformation:
    """An 'optimizer' that leaves the parameters alone and keeps the last gradients as its
    state, so that the train step's gradients can be read back."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )


@pytest.fixture(scope="module")
def fixture_step():
    model = seed_adapter()
    model.train()
    table = key_table(model)
    io = load_npz("seed_adapter_tiny_train_step.npz")
    batch = {"images": io["input"].transpose(0, 2, 3, 1)}
    batch.update({f"cot{i}": io[f"cotangent_f{i}"].transpose(0, 2, 3, 1) for i in range(1, 5)})
    batch["cot_vit"] = io["cotangent_x_out"].transpose(0, 2, 3, 1)

    def loss_fn(m, b):
        out = m(b["images"])
        cots = [b[f"cot{i}"] for i in range(1, 5)] + [b["cot_vit"]]
        return sum((o * c).sum() for o, c in zip(out.features + (out.vit,), cots)), {}

    step = training.TrainStep(model, loss_fn, _recorder(), mesh=training.make_mesh(jax.devices()[:1]))
    state, metrics = step(step.init(0), step.shard_batch(batch))
    return table, io, state, metrics


@pytest.mark.slow
def test_train_step_loss_gradients_and_batchnorm_match_the_fixture(fixture_step):
    # Tolerances as in tests/parity/test_train_step.py: loss 1e-4 relative; every gradient 1e-3 relative
    # to its array's largest value; BatchNorm running statistics rtol 1e-5, atol 1e-6.
    table, io, state, metrics = fixture_step
    assert abs(float(metrics["loss"]) - float(io["loss"])) <= 1e-4 * abs(float(io["loss"]))
    grads = {table[tuple(p)].torch_key: table[tuple(p)].to_torch(np.asarray(v[...]))
             for p, v in nnx.to_flat_state(state.opt_state)}
    expected = {k[len("grad/"):]: v for k, v in io.items() if k.startswith("grad/")}
    assert set(grads) == set(expected)
    # Biases feeding a training-mode BatchNorm have a mathematically zero gradient (see
    # tests/parity/test_train_step.py); both sides are rounding noise there.
    bad = {k: e for k in expected if k not in ZERO_GRADIENT
           for e in [rel_err(grads[k], expected[k])] if not e < 1e-3}
    assert not bad, bad
    for k in ZERO_GRADIENT:
        assert np.abs(grads[k]).max() < 1e-5 * np.abs(expected[k.replace(".bias", ".weight")]).max()
    stats = {table[tuple(p)].torch_key: np.asarray(v[...])
             for p, v in nnx.to_flat_state(state.batch_stats)}
    after = {k[len("batch_stats_after/"):]: v for k, v in io.items() if k.startswith("batch_stats_after/")}
    assert after and set(after) <= set(stats)
    for k, v in after.items():
        np.testing.assert_allclose(stats[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert int(state.step) == 1


# --------------------------------------------------------------------------- frozen trunk, remat

def _train(cfg: AdapterConfig, steps: int, *, freeze: bool, size=(56, 84), batch_size=2, lr=1e-3):
    """``steps`` steps of the synthetic task; returns (losses, initial params, final state, step)."""
    model = synthetic.SegmentationModel(cfg, rngs=nnx.Rngs(0))
    model.train()
    initial = {k: np.array(v) for k, v in _names(nnx.state(model, nnx.Param)).items()}
    opt = training.OptimizerConfig(learning_rate=lr, total_steps=steps)
    step = training.adapter_step(model, synthetic.segmentation_loss, opt, freeze_trunk=freeze,
                                 mesh=training.make_mesh(jax.devices()[:1]))
    state = step.init(0)
    losses = []
    for t in range(steps):
        batch = step.shard_batch(synthetic.synthetic_batch(0, t, range(batch_size), *size))
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, initial, state, step


@pytest.fixture(scope="module")
def frozen_runs():
    # With drop path, so that remat must also recompute the same stochastic-depth masks.
    cfg = TINY.replace(drop_path_rate=0.2)
    return {remat: _train(cfg.replace(with_cp=remat), 3, freeze=True) for remat in (False, True)}


def _mentions_trunk(names) -> bool:
    """Whether a key path (at any depth, e.g. inside Adam's ``mu``) reaches into the trunk."""
    return any(a == "backbone" and b in training.TRUNK_NAMES for a, b in zip(names, names[1:]))


@pytest.mark.slow
def test_frozen_trunk_is_bit_identical_and_has_no_optimizer_state(frozen_runs):
    _, initial, state, step = frozen_runs[False]
    model = step.model(state)
    final = {k: np.asarray(v) for k, v in _names(nnx.state(model, nnx.Param)).items()}
    trunk = [k for k in final if training.is_trunk(tuple(k.split(".")), BACKBONE)]
    assert len(trunk) > 10
    for k in trunk:
        np.testing.assert_array_equal(final[k], initial[k], err_msg=k)
    # The adapter and the head did train.
    assert not np.array_equal(final["backbone.spm.stem.0.kernel"], initial["backbone.spm.stem.0.kernel"])
    assert not np.array_equal(final["head.cls.kernel"], initial["head.cls.kernel"])
    # Neither the trained parameters nor the optimizer state (Adam's mu and nu) hold the trunk.
    for tree in (state.params, state.opt_state):
        paths = [training.path_names(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
        assert paths and not any(_mentions_trunk(p) for p in paths)
    frozen = [training.path_names(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(state.frozen)[0]]
    assert frozen and all(_mentions_trunk(p) for p in frozen)
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    n_trained = len(jax.tree.leaves(state.params))
    assert adam and len(jax.tree.leaves(adam[0].mu)) == n_trained
    assert len(jax.tree.leaves(state.frozen)) == len(trunk)


def test_remat_gives_the_same_losses(frozen_runs):
    # Activation checkpointing recomputes the same float32 operations: 1e-6 relative.
    plain, remat = frozen_runs[False][0], frozen_runs[True][0]
    np.testing.assert_allclose(remat, plain, rtol=1e-6)
    assert plain[-1] < plain[0]


def test_drop_path_masks_come_from_the_step_key():
    # Every random stream gets a key derived from fold_in(rng, step): the same key gives the
    # same masks, another key other masks, and each drop-path layer its own stream.
    from jax_adapter.nn.layers import drop_path

    class Two(nnx.Module):
        def __init__(self):
            self.a = drop_path(0.5, rngs=nnx.Rngs(0))
            self.b = drop_path(0.5, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.a(x)[:, 0, 0], self.b(x)[:, 0, 0]

    two = Two()
    two.train()
    x = jnp.ones((64, 2, 3))
    key = jax.random.key(7)
    training.reseed_streams(two, key)
    a1, b1 = two(x)
    training.reseed_streams(two, key)
    a2, b2 = two(x)
    training.reseed_streams(two, jax.random.fold_in(key, 1))
    a3, _ = two(x)
    assert np.array_equal(a1, a2) and np.array_equal(b1, b2)
    assert not np.array_equal(a1, b1) and not np.array_equal(a1, a3)
    assert set(np.unique(np.asarray(a1))) == {0.0, 2.0}


# --------------------------------------------------------------------------- bfloat16

def test_bfloat16_compute_stays_close_to_the_reference():
    # bfloat16 matmuls and convolutions with float32 parameters, statistics, softmax and
    # sampling locations: every output within 3e-2 of the PyTorch float32 reference, relative to
    # its largest value (measured: about 1.5e-2; bfloat16 has an 8-bit mantissa).
    model = seed_adapter(dtype="bfloat16")
    model.eval()
    assert {np.dtype(v.dtype).name for v in jax.tree.leaves(nnx.state(model))} == {"float32", "int32"}
    io = load_npz("seed_adapter_tiny_io.npz")
    graph, state = nnx.split(model)
    out = jax.jit(lambda s, x: nnx.merge(graph, s)(x))(state, io["input0"].transpose(0, 2, 3, 1))
    for i, f in enumerate(out.features, 1):
        assert f.dtype == jnp.bfloat16
        err = rel_err(np.asarray(f, np.float32), io[f"input0_f{i}"].transpose(0, 2, 3, 1))
        assert err < 3e-2, (i, err)
    assert rel_err(np.asarray(out.vit, np.float32), io["input0_x_out"].transpose(0, 2, 3, 1)) < 3e-2
