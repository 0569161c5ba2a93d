"""``jax-adapter convert`` and ``load_pretrained``: round trip, DINOv2-only sources, errors."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_adapter
from jax_adapter.convert.keys import to_state_dict
from tests.helpers import FIXTURES, load_npz, run_cli

pytestmark = pytest.mark.torch

TINY_PTH = str(FIXTURES / "seed_adapter_tiny.pth")
TINY_CFG = str(FIXTURES / "seed_adapter_tiny.json")


run = run_cli


@pytest.mark.slow
def test_convert_then_load_pretrained_matches_reference(tmp_path, capsys):
    dst = str(tmp_path / "ckpt")
    rc, out, err = run(["convert", TINY_PTH, dst, "--config", TINY_CFG], capsys)
    assert rc == 0 and err == "", err  # success is silent on stderr (no library warnings)
    prov = json.loads(out)
    assert prov["format"] == "dinoadapter" and prov["loaded"] == 301 and len(prov["sha256"]) == 64
    model = jax_adapter.load_pretrained(dst)
    assert isinstance(model, jax_adapter.DinoAdapter)
    assert model.norm1.use_running_average  # eval mode
    io = load_npz("seed_adapter_tiny_io.npz")
    out = model(jnp.asarray(io["input1"].transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(out.vit).transpose(0, 3, 1, 2), io["input1_x_out"], atol=1e-4, rtol=0)
    # Every tensor survives the trip bit for bit.
    ref = torch.load(TINY_PTH, weights_only=True)
    back = to_state_dict(model)
    assert set(back) == set(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


def test_dinov2_only_source_fills_trunk_and_keeps_fresh_adapter(tmp_path, capsys):
    cfg = dict(json.loads(open(TINY_CFG).read()), depth=3, interaction_indexes=[[0, 0], [1, 1], [2, 2]])
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    dst = str(tmp_path / "ckpt")
    rc, out, err = run(["convert", str(FIXTURES / "dinov2_tiny_noreg.pth"), dst, "--config", str(cfg_path)], capsys)
    assert rc == 0, err
    prov = json.loads(out)
    assert prov["format"] == "dinov2_hub" and prov["kept"] > 0
    model = jax_adapter.load_pretrained(dst)
    ref = torch.load(FIXTURES / "dinov2_tiny_noreg.pth", weights_only=True)
    back = to_state_dict(model)
    for k, v in ref.items():
        if k != "mask_token":
            np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
    # The adapter's MSDeformAttn keeps its PyTorch initialisation.
    assert np.all(back["interactions.0.injector.attn.sampling_offsets.weight"] == 0)


def test_detector_checkpoint_with_prefix(tmp_path, capsys):
    sd = torch.load(TINY_PTH, weights_only=True)
    wrapped = {"state_dict": {f"img_backbone.{k}": v for k, v in sd.items()},
               "optimizer": {"state": {}, "param_groups": []}, "meta": {"epoch": 3}}
    wrapped["state_dict"]["pts_bbox_head.cls.weight"] = torch.zeros(3, 3)
    src = tmp_path / "detector.pth"
    torch.save(wrapped, src)
    rc, out, err = run(["convert", str(src), str(tmp_path / "ckpt"), "--config", TINY_CFG], capsys)
    assert rc == 0, err
    assert json.loads(out)["prefix"] == "img_backbone."


def _assert_fails(argv, capsys, match, dst):
    rc, out, err = run(argv, capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and match in err, err
    assert not os.path.exists(dst)
    assert not [p for p in os.listdir(os.path.dirname(dst)) if p.startswith(".jax_adapter-")]


def test_error_wrong_config_names_the_field(tmp_path, capsys):
    cfg = dict(json.loads(open(TINY_CFG).read()), conv_inplane=32)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    dst = str(tmp_path / "out")
    _assert_fails(["convert", TINY_PTH, dst, "--config", str(cfg_path)], capsys,
                  "conv_inplane: the checkpoint has 16, --config", dst)


def test_error_mis_shaped_tensor_names_the_key(tmp_path, capsys):
    sd = torch.load(TINY_PTH, weights_only=True)
    sd["blocks.1.attn.qkv.weight"] = sd["blocks.1.attn.qkv.weight"][:-3]
    src = tmp_path / "bad.pth"
    torch.save(sd, src)
    dst = str(tmp_path / "out")
    _assert_fails(["convert", str(src), dst, "--config", TINY_CFG], capsys,
                  "mis-shaped keys: blocks.1.attn.qkv.weight (285, 96) (expected (288, 96))", dst)


def test_error_unexpected_and_missing_keys(tmp_path, capsys):
    sd = torch.load(TINY_PTH, weights_only=True)
    sd["spm.extra.weight"] = torch.zeros(2)
    del sd["level_embed"]
    src = tmp_path / "bad.pth"
    torch.save(sd, src)
    dst = str(tmp_path / "out")
    _assert_fails(["convert", str(src), dst, "--config", TINY_CFG], capsys,
                  f"{src} does not fit the model: unexpected keys: spm.extra.weight; missing keys: level_embed", dst)


def test_error_truncated_file(tmp_path, capsys):
    src = tmp_path / "trunc.pth"
    src.write_bytes(open(TINY_PTH, "rb").read()[:4096])
    dst = str(tmp_path / "out")
    _assert_fails(["convert", str(src), dst, "--config", TINY_CFG], capsys, "not a readable PyTorch checkpoint", dst)


def test_error_missing_config_and_missing_file(tmp_path, capsys):
    dst = str(tmp_path / "out")
    _assert_fails(["convert", TINY_PTH, dst], capsys, "--config", dst)
    _assert_fails(["convert", str(tmp_path / "nope.pth"), dst, "--config", TINY_CFG], capsys, "no such file", dst)


def test_existing_destination_is_refused_unless_overwrite(tmp_path, capsys):
    dst = tmp_path / "ckpt"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    rc, _, err = run(["convert", TINY_PTH, str(dst), "--config", TINY_CFG], capsys)
    assert rc == 2 and "--overwrite" in err and (dst / "keep.txt").exists()
    rc, _, err = run(["convert", TINY_PTH, str(dst), "--config", TINY_CFG, "--overwrite"], capsys)
    assert rc == 0, err
    assert not (dst / "keep.txt").exists()


def test_load_pretrained_on_a_non_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a jax-adapter checkpoint"):
        jax_adapter.load_pretrained(str(tmp_path))


def test_error_truncated_safetensors(tmp_path, capsys):
    from safetensors.torch import save_file

    full = tmp_path / "full.safetensors"
    save_file(dict(torch.load(TINY_PTH, weights_only=True)), str(full))
    src = tmp_path / "trunc.safetensors"
    src.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    dst = str(tmp_path / "out")
    _assert_fails(["convert", str(src), dst, "--config", TINY_CFG], capsys,
                  f"{src}: not a readable safetensors file (truncated: tensor", dst)
    corrupt = tmp_path / "corrupt.safetensors"
    data = bytearray(full.read_bytes())
    data[8:12] = b"!!!!"  # break the JSON header
    corrupt.write_bytes(bytes(data))
    _assert_fails(["convert", str(corrupt), dst, "--config", TINY_CFG], capsys,
                  f"{corrupt}: unknown file format", dst)


def test_error_foreign_file_and_unknown_format(tmp_path, capsys):
    dst = str(tmp_path / "out")
    junk = tmp_path / "weights.pth"
    junk.write_text("not a checkpoint\n" * 10)
    _assert_fails(["convert", str(junk), dst], capsys, f"{junk}: unknown file format", dst)
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 7, 7), "fc.weight": torch.zeros(10, 4)}, other)
    _assert_fails(["convert", str(other), dst], capsys,
                  f"{other}: unknown checkpoint format: no DINOv2 or DINOv3 backbone found", dst)
    empty = tmp_path / "hf_folder"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    _assert_fails(["convert", str(empty), dst], capsys, "no weights found (expected one of model.safetensors", dst)
    ours = tmp_path / "ours"
    assert run(["convert", TINY_PTH, str(ours), "--config", TINY_CFG], capsys)[0] == 0
    _assert_fails(["convert", str(ours), dst], capsys, "already a jax-adapter checkpoint directory", dst)


class _Exploit:
    """Unpickling this would run code; weights_only loading must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_never_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sd = dict(torch.load(TINY_PTH, weights_only=True))
    src = tmp_path / "evil.pth"
    torch.save({"state_dict": sd, "hook": _Exploit()}, src)
    dst = str(tmp_path / "out")
    _assert_fails(["convert", str(src), dst, "--config", TINY_CFG], capsys,
                  "refusing to unpickle posix.system", dst)
    assert not (tmp_path / "pwned").exists()


def test_error_bad_config_file(tmp_path, capsys):
    dst = str(tmp_path / "out")
    bad = tmp_path / "cfg.json"
    bad.write_text("{not json")
    _assert_fails(["convert", TINY_PTH, dst, "--config", str(bad)], capsys, "not valid JSON", dst)
    bad.write_text(json.dumps({"num_heads": 3, "embeddim": 96}))
    _assert_fails(["convert", TINY_PTH, dst, "--config", str(bad)], capsys, "unknown config fields", dst)
    _assert_fails(["convert", TINY_PTH, dst, "--config", TINY_CFG, "--preset", "tiny"], capsys,
                  "not both", dst)


def test_inspect_sources_and_checkpoints(tmp_path, capsys):
    rc, out, err = run(["inspect", str(FIXTURES / "dinov2_tiny_reg4.pth"), "--json"], capsys)
    assert rc == 0, err
    info = json.loads(out)
    ref = torch.load(FIXTURES / "dinov2_tiny_reg4.pth", weights_only=True)
    assert (info["format"], info["kind"], info["tensors"]) == ("dinov2_hub", "dinov2", len(ref))
    assert info["parameters"] == sum(v.numel() for v in ref.values())
    assert "cannot infer num_heads" in info["unresolved"] and info["config"]["num_register_tokens"] == 4
    # inspect takes no --config/--preset: its hint names the command that does.
    assert "jax-adapter convert needs --config or --preset" in info["unresolved"], info["unresolved"]
    dst = str(tmp_path / "ckpt")
    assert run(["convert", TINY_PTH, dst, "--config", TINY_CFG], capsys)[0] == 0
    rc, out, err = run(["inspect", dst], capsys)
    assert rc == 0, err
    assert "format:       jax-adapter" in out and "parameters:   1,104," in out and '"conv_inplane": 16' in out
    info = json.loads(run(["inspect", dst, "--json"], capsys)[1])
    assert info["kind"] == "dinov2_adapter" and info["provenance"]["format"] == "dinoadapter"
    assert info["parameters"] == sum(v.numel() for k, v in torch.load(TINY_PTH, weights_only=True).items()
                                     if "running_" not in k and "num_batches" not in k)


def test_progress_bar_on_a_terminal(tmp_path, capsys, monkeypatch):
    import io

    from jax_adapter import progress
    from jax_adapter.convert.pipeline import convert_file

    class Tty(io.StringIO):
        def isatty(self):
            return True

    quiet, tty = io.StringIO(), Tty()
    convert_file(TINY_PTH, str(tmp_path / "a"), TINY_CFG, progress=tty)
    assert tty.getvalue() == ""  # a 4 MB checkpoint converts in well under a second: no bar
    monkeypatch.setattr(progress, "MIN_BYTES", 0)
    convert_file(TINY_PTH, str(tmp_path / "b"), TINY_CFG, progress=quiet)
    assert quiet.getvalue() == ""  # not a terminal
    convert_file(TINY_PTH, str(tmp_path / "c"), TINY_CFG, progress=tty)
    lines = tty.getvalue().split("\n")
    assert lines[0].startswith("\rhashing") and "100%" in lines[0]
    assert lines[1].startswith("\rconverting") and "100%" in lines[1].split("\r")[-1]
    assert lines[2].startswith("\rwriting") and "100%" in lines[2].split("\r")[-1] and lines[3] == ""


def test_legacy_torch_save_format(tmp_path, capsys):
    """Pre-1.6 (non-zip) torch.save files cannot be memory-mapped; they still load, weights-only."""
    src = tmp_path / "legacy.pth"
    torch.save(torch.load(TINY_PTH, weights_only=True), src, _use_new_zipfile_serialization=False)
    rc, out, err = run(["convert", str(src), str(tmp_path / "ckpt"), "--config", TINY_CFG], capsys)
    assert rc == 0, err
    assert json.loads(out)["loaded"] == 301
