"""``jax-adapter export``: back to PyTorch names, bit for bit, in .pth and .safetensors."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import jax_adapter
from tests.helpers import FIXTURES, load_npz, run_cli, run_cli_ok

pytestmark = pytest.mark.torch

TINY_PTH = str(FIXTURES / "seed_adapter_tiny.pth")
TINY_CFG = str(FIXTURES / "seed_adapter_tiny.json")
HUB_PTH = str(FIXTURES / "dinov2_tiny_reg4.pth")
HUB_CFG = str(FIXTURES / "dinov2_tiny_reg4.json")


run = run_cli
ok = run_cli_ok


def read(path):
    """A written state dict as torch tensors, whichever the format."""
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, weights_only=True)


def assert_bit_exact(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.bfloat16 else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == torch.bfloat16 else b[k]), k


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_adapter_convert_export_convert_export_is_bit_exact(tmp_path, capsys, suffix):
    ckpt, ckpt2 = str(tmp_path / "ckpt"), str(tmp_path / "ckpt2")
    out, out2 = str(tmp_path / f"out{suffix}"), str(tmp_path / f"out2{suffix}")
    ok(["convert", TINY_PTH, ckpt, "--config", TINY_CFG], capsys)
    info = ok(["export", ckpt, out], capsys)
    assert info["names"] == "dinoadapter" and info["tensors"] == 301
    # The export reproduces the seed file itself: same keys, dtypes (int64 counters) and bits.
    assert_bit_exact(read(out), torch.load(TINY_PTH, weights_only=True))
    # The exported file converts (config inferred but for the heads) and exports identically.
    ok(["convert", out, ckpt2, "--config", TINY_CFG], capsys)
    ok(["export", ckpt2, out2], capsys)
    assert_bit_exact(read(out2), read(out))


def test_dinov2_only_export_is_the_hub_trunk(tmp_path, capsys):
    ckpt, trunk = str(tmp_path / "ckpt"), str(tmp_path / "trunk")
    out, out2 = str(tmp_path / "trunk.pth"), str(tmp_path / "trunk2.safetensors")
    ok(["convert", TINY_PTH, ckpt, "--config", TINY_CFG], capsys)
    info = ok(["export", ckpt, out, "--dinov2-only"], capsys)
    assert info["names"] == "dinov2_hub"
    sd = read(out)
    seed = torch.load(TINY_PTH, weights_only=True)
    trunk_keys = {k for k in seed if not k.startswith(("spm.", "interactions.", "level_embed", "up.", "norm1.",
                                                       "norm2.", "norm3.", "norm4."))}
    assert set(sd) == trunk_keys | {"mask_token"}
    assert torch.equal(sd["mask_token"], torch.zeros(1, 96))
    for k in trunk_keys:
        assert torch.equal(sd[k], seed[k]), k
    # A hub trunk converts --trunk-only and exports the same again.
    ok(["convert", out, trunk, "--trunk-only", "--config", TINY_CFG], capsys)
    ok(["export", trunk, out2], capsys)
    assert_bit_exact(read(out2), sd)


def test_hub_trunk_round_trip_keeps_registers_and_mask_token_shape(tmp_path, capsys):
    trunk, out = str(tmp_path / "trunk"), str(tmp_path / "hub.pth")
    ok(["convert", HUB_PTH, trunk, "--trunk-only", "--config", HUB_CFG], capsys)
    ok(["export", trunk, out], capsys)
    ref = torch.load(HUB_PTH, weights_only=True)
    sd = read(out)
    assert set(sd) == set(ref)
    for k in ref:
        if k != "mask_token":  # unused by the forward, exported as zeros
            assert torch.equal(sd[k], ref[k]), k
    assert sd["mask_token"].shape == ref["mask_token"].shape


def test_bfloat16_storage_and_export_round_trip(tmp_path, capsys):
    ckpt, ckpt2 = str(tmp_path / "ckpt"), str(tmp_path / "ckpt2")
    out, out2 = str(tmp_path / "bf16.safetensors"), str(tmp_path / "bf16_2.pth")
    prov = ok(["convert", TINY_PTH, ckpt, "--config", TINY_CFG, "--dtype", "bfloat16"], capsys)
    assert prov["dtype"] == "bfloat16"
    info = ok(["inspect", ckpt, "--json"], capsys)
    assert info["dtypes"] == ["bfloat16", "int32"]
    ok(["export", ckpt, out], capsys)
    sd = read(out)
    seed = torch.load(TINY_PTH, weights_only=True)
    assert sd["pos_embed"].dtype == torch.bfloat16 and sd["spm.stem.1.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(sd["pos_embed"], seed["pos_embed"].bfloat16())
    ok(["convert", out, ckpt2, "--config", TINY_CFG, "--dtype", "bfloat16"], capsys)
    ok(["export", ckpt2, out2], capsys)
    assert_bit_exact(read(out2), sd)
    # Export can widen again; bfloat16 -> float32 is exact.
    out3 = str(tmp_path / "f32.pth")
    ok(["export", ckpt2, out3, "--dtype", "float32"], capsys)
    assert torch.equal(read(out3)["pos_embed"], sd["pos_embed"].float())


def test_exported_adapter_reproduces_the_reference_outputs(tmp_path, capsys):
    """Convert -> export -> convert: the model still matches the PyTorch reference."""
    import jax.numpy as jnp

    ckpt, ckpt2, out = str(tmp_path / "ckpt"), str(tmp_path / "ckpt2"), str(tmp_path / "out.safetensors")
    ok(["convert", TINY_PTH, ckpt, "--config", TINY_CFG], capsys)
    ok(["export", ckpt, out], capsys)
    ok(["convert", out, ckpt2, "--config", TINY_CFG], capsys)
    io = load_npz("seed_adapter_tiny_io.npz")
    model = jax_adapter.load_pretrained(ckpt2)
    vit = model(jnp.asarray(io["input1"].transpose(0, 2, 3, 1))).vit
    np.testing.assert_allclose(np.asarray(vit).transpose(0, 3, 1, 2), io["input1_x_out"], atol=1e-4, rtol=0)


def test_export_refuses_existing_output_and_unknown_suffix(tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    ok(["convert", TINY_PTH, ckpt, "--config", TINY_CFG], capsys)
    out = tmp_path / "out.pth"
    out.write_bytes(b"keep")
    rc, _, err = run(["export", ckpt, str(out)], capsys)
    assert rc == 2 and "--overwrite" in err and out.read_bytes() == b"keep"
    assert len(err.strip().splitlines()) == 1
    rc, _, err = run(["export", ckpt, str(out), "--overwrite"], capsys)
    assert rc == 0, err
    assert "pos_embed" in read(str(out))
    bad = tmp_path / "out.npz"
    rc, _, err = run(["export", ckpt, str(bad)], capsys)
    assert rc == 2 and "unknown output format" in err and not bad.exists()
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".jax_adapter-")]
    assert not leftovers


def test_export_of_a_damaged_checkpoint_writes_nothing(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ok(["convert", TINY_PTH, str(ckpt), "--config", TINY_CFG], capsys)
    record = json.loads((ckpt / "jax_adapter.json").read_text())
    record["config"]["conv_inplane"] = 32  # config no longer fits the stored arrays
    (ckpt / "jax_adapter.json").write_text(json.dumps(record))
    out = tmp_path / "out.pth"
    rc, _, err = run(["export", str(ckpt), str(out)], capsys)
    assert rc == 2 and "mis-shaped arrays: spm." in err and str(ckpt) in err, err
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".jax_adapter-")]


def test_a_model_in_memory_saves_and_exports(tmp_path, capsys):
    """After training in JAX: ``save_pretrained(model, dst, provenance=...)`` then ``export``."""
    from jax_adapter.convert.keys import to_state_dict

    ckpt = str(tmp_path / "ckpt")
    ok(["convert", TINY_PTH, ckpt, "--config", TINY_CFG], capsys)
    model = jax_adapter.load_pretrained(ckpt)
    model.level_embed[...] = model.level_embed[...] + 1.0  # "trained"
    model.norm1.num_batches_tracked[...] = 41
    trained = str(tmp_path / "trained")
    jax_adapter.save_pretrained(model, trained, provenance={"note": "fine-tuned"})
    out = str(tmp_path / "trained.pth")
    ok(["export", trained, out], capsys)
    sd, ref = read(out), to_state_dict(model)
    assert set(sd) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(sd[k].numpy(), ref[k], err_msg=k)
    assert sd["norm1.num_batches_tracked"].dtype == torch.int64 and int(sd["norm1.num_batches_tracked"]) == 41
