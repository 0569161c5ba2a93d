"""Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` -> DinoV2, against transformers.

Small random models are built with transformers itself, saved with ``save_pretrained``
(safetensors and ``pytorch_model.bin``), converted with the CLI and compared on the final
hidden state. transformers is in the ``test`` extra: these tests fail, not skip, without it.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (Dinov2Config, Dinov2ForImageClassification, Dinov2Model,
                          Dinov2WithRegistersConfig, Dinov2WithRegistersModel)

import jax_adapter
from jax_adapter.convert.keys import to_state_dict
from jax_adapter.cli import main
from tests.helpers import convert_without_torch

pytestmark = [pytest.mark.torch, pytest.mark.hf]

# last_hidden_state is LayerNorm-ed, O(1); float32 ports agree to ~1e-6, the resize included.
ATOL = 1e-4
# 56 = the 4x4 pretraining grid (no resize); 70x98 (5x7) and 42x112 (3x8) resize up and down.
SIZES = ((56, 56), (70, 98), (42, 112))
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter (LayerScale, registers, mask token included) random values, so
    that no mapping mistake hides behind an init of ones or zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if "norm" in name or "lambda" in name else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("norm1.weight") else 0.0))


def _build(kind: str, folder, seed: int = 0, safe: bool = True, **overrides):
    kw = {**SMALL, **overrides}
    if kind == "registers":
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**kw, num_register_tokens=4))
    elif kind == "classifier":
        model = Dinov2ForImageClassification(Dinov2Config(**kw, num_labels=5))
    else:
        model = Dinov2Model(Dinov2Config(**kw))
    _randomize(model, seed)
    model.eval()
    model.save_pretrained(str(folder))
    if not safe:
        # transformers 5 writes safetensors only; older releases' pytorch_model.bin holds the
        # same names, torch.save'd.
        from safetensors.torch import load_file

        path = os.path.join(str(folder), "model.safetensors")
        torch.save(load_file(path), os.path.join(str(folder), "pytorch_model.bin"))
        os.remove(path)
    return model


def run(argv, capsys):
    capsys.readouterr()  # drop what building the models printed
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _hf_tokens(model, images_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2)))
    return out.last_hidden_state.numpy()


def _our_tokens(model, images_nhwc: np.ndarray) -> np.ndarray:
    out = model(jnp.asarray(images_nhwc))
    return np.concatenate([np.asarray(out.cls)[:, None], np.asarray(out.registers), np.asarray(out.patches)], 1)


def _compare(hf_model, ours, seed=0):
    rng = np.random.default_rng(seed)
    errs = []
    for h, w in SIZES:
        x = rng.standard_normal((2, h, w, 3)).astype(np.float32)
        ref = _hf_tokens(hf_model, x)
        got = _our_tokens(ours, x)
        assert got.shape == ref.shape, (h, w, got.shape, ref.shape)
        err = float(np.abs(got - ref).max())
        errs.append(err)
        assert err < ATOL, f"{h}x{w}: max error {err}"
    return max(errs)


@pytest.mark.parametrize("kind, safe, mode", [
    ("plain", True, "bicubic_size"),
    ("plain_swiglu", False, "bicubic_size"),
    ("registers", True, "bicubic_size_antialias"),
    ("registers_swiglu", False, "bicubic_size_antialias"),
])
def test_hf_models_convert_and_match_transformers(tmp_path, capsys, kind, safe, mode):
    extra = {"use_swiglu_ffn": True} if kind.endswith("swiglu") else {}
    hf = _build(kind.split("_")[0], tmp_path / "hf", safe=safe, **extra)
    weights = "model.safetensors" if safe else "pytorch_model.bin"
    assert os.path.isfile(tmp_path / "hf" / weights)
    dst = str(tmp_path / "ckpt")
    rc, out, err = run(["convert", str(tmp_path / "hf"), dst, "--trunk-only"], capsys)
    assert rc == 0, err
    prov = json.loads(out)
    assert prov["format"] == ("hf_dinov2_with_registers" if kind.startswith("registers") else "hf_dinov2")
    assert prov["source_files"][0]["name"] == weights
    model = jax_adapter.load_pretrained(dst)
    assert isinstance(model, jax_adapter.DinoV2)
    cfg = model.cfg
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (64, 2, 4)  # heads from config.json
    assert cfg.pos_embed_resize == mode
    assert cfg.ffn_layer == ("swiglu" if extra else "mlp")
    assert cfg.num_register_tokens == (4 if kind.startswith("registers") else 0)
    err = _compare(hf, model)
    print(f"{kind}: max |ours - transformers| = {err:.2e}")


def test_transformers_module_names_convert_like_saved_files(tmp_path, capsys):
    """transformers 5 modules name q/k/v ``q_proj``... and split SwiGLU into gate/up; their
    own ``state_dict()`` (torch.save'd) converts to the same arrays as the saved file."""
    hf = _build("plain", tmp_path / "hf", use_swiglu_ffn=True)
    sd = hf.state_dict()
    assert any(".q_proj." in k for k in sd) and any(".gate_proj." in k for k in sd)
    torch.save(sd, tmp_path / "hf_modules.pth")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run(["convert", str(tmp_path / "hf"), a, "--trunk-only"], capsys)[0] == 0
    rc, _, err = run(["convert", str(tmp_path / "hf_modules.pth"), b, "--trunk-only",
                      "--config", str(tmp_path / "hf" / "config.json")], capsys)
    assert rc == 0, err
    sa = to_state_dict(jax_adapter.load_pretrained(a))
    sb = to_state_dict(jax_adapter.load_pretrained(b))
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def test_classifier_checkpoint_prefix_detected(tmp_path, capsys):
    hf = _build("classifier", tmp_path / "hf")
    dst = str(tmp_path / "ckpt")
    rc, out, err = run(["convert", str(tmp_path / "hf"), dst, "--trunk-only"], capsys)
    assert rc == 0, err
    prov = json.loads(out)
    assert prov["prefix"] == "dinov2." and prov["other_tensors"] == 2  # classifier weight, bias
    _compare(hf.dinov2, jax_adapter.load_pretrained(dst))


def test_bare_safetensors_needs_heads_or_config(tmp_path, capsys):
    """Without config.json, heads of a non-variant width cannot be inferred; the HF
    config.json itself is accepted as --config."""
    _build("plain", tmp_path / "hf")
    bare = tmp_path / "bare"
    bare.mkdir()
    os.replace(tmp_path / "hf" / "model.safetensors", bare / "weights.safetensors")
    dst = str(tmp_path / "ckpt")
    rc, _, err = run(["convert", str(bare / "weights.safetensors"), dst, "--trunk-only"], capsys)
    assert rc == 2 and "cannot infer num_heads" in err and "--config" in err, err
    assert not os.path.exists(dst)
    rc, _, err = run(["convert", str(bare / "weights.safetensors"), dst, "--trunk-only", "--config",
                      str(tmp_path / "hf" / "config.json")], capsys)
    assert rc == 0, err
    # The HF Dinov2Model's resize, not the hub's, though no config.json lay beside the file.
    assert jax_adapter.load_pretrained(dst).cfg.pos_embed_resize == "bicubic_size"


@pytest.mark.slow
def test_hf_trunk_into_fresh_adapter(tmp_path, capsys):
    """Without --trunk-only an HF trunk becomes a DinoAdapter whose adapter is fresh."""
    _build("registers", tmp_path / "hf", num_hidden_layers=4)
    dst = str(tmp_path / "ckpt")
    rc, out, err = run(["convert", str(tmp_path / "hf"), dst], capsys)
    assert rc == 0, err
    prov = json.loads(out)
    assert prov["kept"] > 0 and prov["dropped"] == 1  # mask_token
    model = jax_adapter.load_pretrained(dst)
    assert isinstance(model, jax_adapter.DinoAdapter)
    cfg = model.cfg
    assert cfg.pos_embed_resize == "bicubic_size"  # the adapter's own resize
    assert cfg.interaction_indexes == ((0, 0), (1, 1), (2, 2), (3, 3))  # 4 blocks, split evenly
    assert cfg.deform_num_heads == 4  # the seed's 6 does not divide 64; the largest that does
    out = model(jnp.zeros((1, 56, 56, 3)))
    assert all(np.isfinite(np.asarray(f)).all() for f in out.features)


def test_unsupported_hf_config_names_the_setting(tmp_path, capsys):
    _build("plain", tmp_path / "hf", layer_norm_eps=1e-5, hidden_act="gelu_new")
    dst = str(tmp_path / "ckpt")
    rc, _, err = run(["convert", str(tmp_path / "hf"), dst, "--trunk-only"], capsys)
    assert rc == 2 and "layer_norm_eps 1e-05" in err and "hidden_act 'gelu_new'" in err, err
    assert len(err.strip().splitlines()) == 1 and not os.path.exists(dst)


# An incomplete q/k/v group, and a whole missing tensor: both named in Hugging Face's names.
@pytest.mark.parametrize("key", ["encoder.layer.1.attention.attention.value.weight",
                                 "encoder.layer.0.layer_scale2.lambda1"])
def test_missing_hf_tensors_are_named_as_hf_names_them(tmp_path, capsys, key):
    from safetensors.torch import load_file, save_file

    _build("plain", tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    sd = load_file(str(path))
    del sd[key]
    save_file(sd, str(path))
    dst = str(tmp_path / "ckpt")
    rc, _, err = run(["convert", str(tmp_path / "hf"), dst, "--trunk-only"], capsys)
    assert rc == 2 and f"missing keys: {key}" in err and "hf" in err, err
    assert not os.path.exists(dst)


def test_bfloat16_safetensors_read_without_torch_upcast(tmp_path, capsys):
    """A bfloat16 HF file converts bit-exactly (numpy reader, no float32 detour)."""
    from safetensors.torch import load_file, save_file

    _build("plain", tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    sd = {k: v.bfloat16() for k, v in load_file(str(path)).items()}
    save_file(sd, str(path))
    dst = str(tmp_path / "ckpt")
    rc, out, err = run(["convert", str(tmp_path / "hf"), dst, "--trunk-only", "--dtype", "bfloat16"], capsys)
    assert rc == 0, err
    assert json.loads(out)["source_dtypes"] == ["bfloat16"]
    back = to_state_dict(jax_adapter.load_pretrained(dst))
    np.testing.assert_array_equal(back["norm.weight"], sd["layernorm.weight"].float().numpy())
    q = sd["encoder.layer.0.attention.attention.query.weight"].float().numpy()
    np.testing.assert_array_equal(back["blocks.0.attn.qkv.weight"][:64], q)


def test_sharded_safetensors_folder(tmp_path, capsys):
    """``model.safetensors.index.json`` with two shards reads like the single file."""
    from safetensors.torch import load_file, save_file

    hf = _build("plain", tmp_path / "hf")
    folder = tmp_path / "hf"
    sd = load_file(str(folder / "model.safetensors"))
    os.remove(folder / "model.safetensors")
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(folder / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    dst = str(tmp_path / "ckpt")
    rc, out, err = run(["convert", str(folder), dst, "--trunk-only"], capsys)
    assert rc == 0, err
    prov = json.loads(out)
    assert [f["name"] for f in prov["source_files"]] == sorted(shards) and "sha256" not in prov
    assert all(len(f["sha256"]) == 64 for f in prov["source_files"])
    _compare(hf, jax_adapter.load_pretrained(dst))


def test_safetensors_conversion_needs_no_torch(tmp_path):
    """Reading safetensors and writing the checkpoint never import torch."""
    _build("registers", tmp_path / "hf")
    assert convert_without_torch(tmp_path / "hf", tmp_path / "ckpt")["format"] == "hf_dinov2_with_registers"
    assert (tmp_path / "ckpt" / "jax_adapter.json").is_file()


def test_inspect_hf_folder(tmp_path, capsys):
    _build("registers", tmp_path / "hf", use_swiglu_ffn=True)
    rc, out, err = run(["inspect", str(tmp_path / "hf"), "--json"], capsys)
    assert rc == 0, err
    info = json.loads(out)
    # --json says what the text says for a shape that is no named variant.
    assert (info["format"], info["kind"], info["variant"]) == ("hf_dinov2_with_registers", "dinov2", "custom")
    assert info["source_pos_embed_resize"] == "bicubic_size_antialias"
    cfg = info["config"]
    assert (cfg["num_heads"], cfg["num_register_tokens"], cfg["ffn_layer"]) == (4, 4, "swiglu")
    assert cfg["pos_embed_resize"] == "bicubic_size_antialias" and "unresolved" not in info
