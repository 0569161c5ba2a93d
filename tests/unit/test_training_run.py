"""Training as a library: the schedule and resume rules of ``training.run`` and a whole run of the
tiny adapter through :class:`Trainer` (resume, extend, stop, the trained model in eval mode and
saved)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_adapter
from jax_adapter import errors, training
from jax_adapter.training import run, synthetic

H, W, BATCH = 28, 28, 2


def _record(total_steps: int) -> dict:
    return {"optimizer": {"learning_rate": 2e-4, "total_steps": total_steps}}


def _opt(cfg: training.TrainConfig, old) -> training.OptimizerConfig:
    return training.OptimizerConfig(learning_rate=2e-4, total_steps=run.schedule_length(cfg, old))


def test_resume_keeps_the_recorded_schedule_and_refuses_steps_at_learning_rate_zero():
    cfg = training.TrainConfig(steps=400, resume=True, workdir="w")
    opt = _opt(cfg, _record(200))
    assert opt.total_steps == 200  # kept, not reset to steps
    with pytest.raises(errors.ConfigError,
                       match=r"steps 201-400 would run at learning rate 0.*schedule_steps=400 \(--schedule-steps 400\)"):
        run.check_schedule(opt, cfg.steps, recorded=True)
    # Resuming within the recorded schedule is fine and says so.
    within = _opt(cfg.replace(steps=150), _record(200))
    run.check_schedule(within, 150, recorded=True)
    assert "schedule of 200 steps kept" in run.schedule_note(within, _record(200), 100)


def test_a_longer_schedule_on_resume_is_accepted_and_continues_at_a_nonzero_rate():
    cfg = training.TrainConfig(steps=400, resume=True, workdir="w", schedule_steps=400)
    opt = _opt(cfg, _record(200))
    run.check_schedule(opt, cfg.steps, recorded=False)
    note = run.schedule_note(opt, _record(200), 200)
    # The 400-step cosine at step 200 is half the peak; the old schedule had ended at 0.
    assert "changed from 200 to 400 steps: step 201 runs at 0.0001 (was 0)" in note, note
    # The schedule's length is no option a resumed run must repeat; everything else still is.
    old = {"model": {"depth": 4}, "batch": 8, "optimizer": {"learning_rate": 2e-4, "total_steps": 200}}
    run.check_run_record("w", {**old, "optimizer": {"learning_rate": 2e-4, "total_steps": 400}}, old)
    with pytest.raises(errors.ConfigError, match="differ from the run in w: batch"):
        run.check_run_record("w", {**old, "batch": 4}, old)
    # A fresh run whose schedule ends before its steps is refused the same way.
    fresh = training.TrainConfig(steps=200, schedule_steps=100)
    with pytest.raises(errors.ConfigError, match="steps 101-200 would run at learning rate 0"):
        run.check_schedule(_opt(fresh, None), 200, recorded=False)


@pytest.mark.parametrize("changes, match", [
    (dict(steps=-1), "steps must be >= 0"), (dict(batch=0), "batch >= 1"),
    (dict(resume=True), "resume needs a workdir"), (dict(schedule_steps=0), "schedule_steps"),
])
def test_train_config_refuses_what_cannot_run(changes, match):
    with pytest.raises(errors.ConfigError, match=match):
        training.TrainConfig(**changes)


def _trainer(tmp_path, log, **changes) -> training.Trainer:
    cfg = jax_adapter.DinoV2AdapterConfig.preset("tiny").replace(drop_path_rate=0.3)
    model = synthetic.SegmentationModel(cfg, hidden=8, rngs=nnx.Rngs(0))
    model.train()
    train_cfg = training.TrainConfig(**{"steps": 3, "batch": BATCH, "workdir": str(tmp_path / "run"), **changes})
    return training.Trainer(model, synthetic.segmentation_loss, train_cfg, mesh=training.make_mesh(jax.devices()[:1]),
                            task={"image_size": [H, W]}, log=log.append)


def _batch(step):
    return synthetic.synthetic_batch(0, step, range(BATCH), H, W)


def _modes(model) -> set:
    """``{(layer type, flag, value)}`` of the mode flags that ``.train()`` / ``.eval()`` set."""
    found = set()
    for _, m in nnx.iter_graph(model):
        for flag in ("deterministic", "use_running_average"):
            if isinstance(getattr(m, flag, None), bool):
                found.add((type(m).__name__, flag, getattr(m, flag)))
    return found


@pytest.mark.slow
def test_a_run_resumes_extends_and_gives_the_trained_model(tmp_path):
    log, seen = [], []
    trainer = _trainer(tmp_path, log, stop_after=2)
    trainer.fit(_batch, on_step=lambda step, metrics, dt: seen.append((step, metrics["loss"])))
    assert [s for s, _ in seen] == [1, 2] and all(np.isfinite(v) for _, v in seen)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["task"] == {"image_size": [H, W]}
    # Without resume, a workdir that holds a run is refused.
    with pytest.raises(errors.ConfigError, match="already holds checkpoints"):
        _trainer(tmp_path, log)
    # Resumed, it continues from step 2 to 3; a different batch would be refused.
    resumed = _trainer(tmp_path, log, resume=True)
    assert resumed.start == 2 and "resumed from step 2" in log[-1]
    resumed.fit(_batch, on_step=lambda step, metrics, dt: seen.append((step, metrics["loss"])))
    assert seen[-1][0] == 3 and int(resumed.state.step) == 3
    with pytest.raises(errors.ConfigError, match="schedule_steps=5"):
        _trainer(tmp_path, log, resume=True, steps=5)
    # The trained model comes back in eval mode (deterministic: two calls agree) and saves as
    # its backbone; the segmentation model as a whole has no checkpoint kind.
    model = resumed.model()
    assert _modes(model) == {("Dropout", "deterministic", True), ("BatchNorm2d", "use_running_average", True)}
    assert _modes(resumed.model(train=True)) == {("Dropout", "deterministic", False),
                                                 ("BatchNorm2d", "use_running_average", False)}
    forward = nnx.jit(lambda m, x: m(x))
    images = jnp.asarray(_batch(9)["images"])
    np.testing.assert_array_equal(np.asarray(forward(model, images)), np.asarray(forward(model, images)))
    with pytest.raises(errors.CheckpointError,
                       match=r"SegmentationModel: save its backbone, a DinoV2Adapter: save_pretrained\(model.backbone"):
        jax_adapter.save_pretrained(model, str(tmp_path / "whole"))
    assert not (tmp_path / "whole").exists()
    jax_adapter.save_pretrained(model.backbone, str(tmp_path / "backbone"))
    loaded = jax_adapter.load_pretrained(str(tmp_path / "backbone"))
    assert type(loaded) is jax_adapter.DinoV2Adapter and loaded.cfg == model.backbone.cfg
    ours = jax.tree_util.tree_leaves_with_path(nnx.state(model.backbone, nnx.Param, nnx.BatchStat))
    theirs = dict(jax.tree_util.tree_leaves_with_path(nnx.state(loaded, nnx.Param, nnx.BatchStat)))
    assert len(ours) == len(theirs) > 100
    for path, x in ours:
        np.testing.assert_array_equal(np.asarray(theirs[path]), np.asarray(x), err_msg=str(path))
