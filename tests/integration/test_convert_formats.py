"""Source formats through the command line: DINOv2 hub .pth (plain, registers, chunked), detector
checkpoints, and the config inferred from tensor shapes."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_adapter
from jax_adapter import AdapterConfig
from jax_adapter.convert.keys import slots, to_state_dict
from jax_adapter.models.build import abstract_model
from tests.helpers import FIXTURES, load_npz, run_cli, run_cli_ok

pytestmark = pytest.mark.torch

TINY_PTH = str(FIXTURES / "seed_adapter_tiny.pth")
TINY_CFG = str(FIXTURES / "seed_adapter_tiny.json")
# Trunk outputs are LayerNorm-ed tokens, O(1): a float32 port lands within 1e-4 absolute.
ATOL = 1e-4


run = run_cli
ok = run_cli_ok


def chunked(sd, chunks=2):
    """The hub's block-chunked layout: ``blocks.<chunk>.<N>.`` with global block indices."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    per = -(-depth // chunks)
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            n = int(k.split(".")[1])
            k = f"blocks.{n // per}.{k[len('blocks.'):]}"
        out[k] = v
    return out


@pytest.mark.parametrize("name, mode", [("dinov2_tiny_noreg", "bicubic_scale_offset"),
                                        ("dinov2_tiny_reg4", "bicubic_size_antialias")])
@pytest.mark.parametrize("chunks", [0, 2])
def test_hub_pth_trunk_matches_reference(tmp_path, capsys, name, mode, chunks):
    src = str(FIXTURES / f"{name}.pth")
    if chunks:
        sd = torch.load(src, weights_only=True)
        src = str(tmp_path / "chunked.pth")
        torch.save(chunked(sd, chunks), src)
        assert any(k.startswith("blocks.1.2.") for k in torch.load(src, weights_only=True))
    dst = str(tmp_path / "trunk")
    # The fixture's JSON holds the hub vit_* constructor arguments (heads of a 96-wide model).
    prov = ok(["convert", src, dst, "--trunk-only", "--config", str(FIXTURES / f"{name}.json")], capsys)
    assert prov["format"] == "dinov2_hub" and prov["dropped_keys"] == ["mask_token"]
    model = jax_adapter.load_pretrained(dst)
    assert isinstance(model, jax_adapter.DinoV2) and model.cfg.pos_embed_resize == mode
    io = load_npz(f"{name}_io.npz")
    for k in (0, 1):
        out = model(jnp.asarray(io[f"input{k}"].transpose(0, 2, 3, 1)))
        np.testing.assert_allclose(out.cls, io[f"input{k}_x_norm_clstoken"], rtol=0, atol=ATOL)
        np.testing.assert_allclose(out.patches, io[f"input{k}_x_norm_patchtokens"], rtol=0, atol=ATOL)
        if model.cfg.num_register_tokens:
            np.testing.assert_allclose(out.registers, io[f"input{k}_x_norm_regtokens"], rtol=0, atol=ATOL)


def test_hub_trunk_with_own_config_fields(tmp_path, capsys):
    """A config of our own field names (here just the heads) completes the inference."""
    cfg = tmp_path / "heads.json"
    cfg.write_text(json.dumps({"num_heads": 3}))
    dst = str(tmp_path / "trunk")
    ok(["convert", str(FIXTURES / "dinov2_tiny_reg4.pth"), dst, "--trunk-only", "--config", str(cfg)], capsys)
    c = jax_adapter.load_pretrained(dst).cfg
    assert (c.embed_dim, c.depth, c.num_heads, c.num_register_tokens) == (96, 3, 3, 4)
    assert c.pos_embed_resize == "bicubic_size_antialias"


def test_preset_mismatch_names_the_fields(tmp_path, capsys):
    dst = str(tmp_path / "trunk")
    rc, _, err = run(["convert", str(FIXTURES / "dinov2_tiny_reg4.pth"), dst, "--trunk-only",
                      "--preset", "dinov2_vits14"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "embed_dim: the checkpoint has 96, --preset dinov2_vits14 gives 384" in err
    assert "depth: the checkpoint has 3" in err and "num_register_tokens: the checkpoint has 4" in err
    assert not os.path.exists(dst)


def _detector(sd, prefix="img_backbone."):
    """A detector-style training checkpoint: backbone under a prefix beside a head, optimizer
    state with a tensor per parameter, and metadata."""
    model = {f"{prefix}{k}": v for k, v in sd.items()}
    model["pts_bbox_head.cls.weight"] = torch.zeros(3, 3)
    model["pts_bbox_head.transformer.query_pos_embed"] = torch.zeros(10, 8)
    optim = {"state": {i: {"exp_avg": torch.ones(2), "step": torch.tensor(3.0)} for i in range(5)},
             "param_groups": [{"lr": 1e-4, "params": list(range(5))}]}
    return {"meta": {"epoch": 3, "iter": 1200}, "state_dict": model, "optimizer": optim}


def test_detector_checkpoint_converts_with_detected_prefix(tmp_path, capsys):
    sd = torch.load(TINY_PTH, weights_only=True)
    src = tmp_path / "epoch_3.pth"
    torch.save(_detector(sd, "module.dinov2_adapter."), src)
    dst = str(tmp_path / "ckpt")
    prov = ok(["convert", str(src), dst, "--config", TINY_CFG], capsys)
    assert (prov["container"], prov["prefix"], prov["loaded"]) == ("state_dict", "module.dinov2_adapter.", 301)
    assert prov["other_tensors"] == 2 + 10  # head tensors and optimizer state
    back = to_state_dict(jax_adapter.load_pretrained(dst))
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


def test_two_backbones_need_a_prefix(tmp_path, capsys):
    sd = torch.load(TINY_PTH, weights_only=True)
    ckpt = _detector(sd)
    ckpt["state_dict"].update({f"ema.img_backbone.{k}": v for k, v in sd.items()})
    src = tmp_path / "ema.pth"
    torch.save(ckpt, src)
    dst = str(tmp_path / "ckpt")
    rc, _, err = run(["convert", str(src), dst, "--config", TINY_CFG], capsys)
    assert rc == 2 and "several backbones" in err and "state_dict.ema.img_backbone." in err
    assert "--prefix" in err and not os.path.exists(dst)
    # Either spelling of the prefix picks one: with or without the nesting.
    prov = ok(["convert", str(src), dst, "--config", TINY_CFG, "--prefix", "ema.img_backbone"], capsys)
    assert prov["prefix"] == "ema.img_backbone."
    prov = ok(["convert", str(src), dst, "--config", TINY_CFG, "--prefix", "state_dict.img_backbone.",
               "--overwrite"], capsys)
    assert prov["prefix"] == "img_backbone."
    rc, _, err = run(["convert", str(src), str(tmp_path / "x"), "--config", TINY_CFG, "--prefix", "nope."], capsys)
    assert rc == 2 and "no keys start with prefix 'nope.'" in err


def test_adapter_config_inferred_without_config_for_a_known_width(tmp_path, capsys):
    """A ViT-S-wide adapter (random weights) converts with no --config at all."""
    cfg = AdapterConfig.preset("dinov2_vits14").replace(
        depth=4, interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3)), conv_inplane=8,
        cffn_ratio=0.5, deform_ratio=0.5, use_extra_extractor=False, num_register_tokens=4)
    expected = slots(abstract_model("dinov2_adapter", cfg))
    rng = np.random.default_rng(0)
    sd = {k: torch.from_numpy(rng.standard_normal(s.torch_shape).astype(np.float32)) if "num_batches" not in k
          else torch.tensor(7) for k, s in expected.items()}
    src = tmp_path / "vits_adapter.pth"
    torch.save({"model": {f"backbone.{k}": v for k, v in sd.items()}}, src)
    dst = str(tmp_path / "ckpt")
    ok(["convert", str(src), dst], capsys)
    # Everything is read off the shapes (heads: the ViT-S variant's; deformable attention:
    # 24 = 6 heads * the default 4 points).
    assert jax_adapter.load_pretrained(dst).cfg == cfg
