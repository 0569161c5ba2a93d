"""DINOv3 conversion both ways: Meta hub ``.pth`` trunks, the ``DINOv3_Adapter`` ``state_dict``
and its segmentor checkpoint, and Hugging Face ``DINOv3ViTModel`` folders -> checkpoint
directories -> ``load_pretrained``, checked against the upstream outputs; ``export`` writes
Meta's names back bit for bit; damaged sources (hash in the name, bias mask, RoPE periods) are
refused with one line, exit 2 and nothing written."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

import jax_adapter
from jax_adapter import checkpoint
from jax_adapter.models.dinov3 import DinoV3
from jax_adapter import DinoV3Adapter
from tests.helpers import FIXTURES, convert_without_torch, load_npz, run_cli, run_cli_ok
from tests.helpers import write_segmentor

pytestmark = [pytest.mark.torch, pytest.mark.hf]

MLP = FIXTURES / "dinov3_tiny_mlp.pth"
SWIGLU = FIXTURES / "dinov3_tiny_swiglu64.pth"
ADAPTER = FIXTURES / "dinov3_adapter_tiny.pth"
ATOL = 1e-4  # final-normed tokens and BatchNorm-ed features are O(1); float32 ports agree to ~1e-6


@pytest.fixture(scope="module")
def segmentor(tmp_path_factory):
    """The adapter fixture inside a segmentor checkpoint (``model`` / ``segmentation_model.0.``)."""
    path = tmp_path_factory.mktemp("segmentor") / "dinov3_segmentor_tiny.pth"
    write_segmentor(path)
    return path


def _nhwc(x: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so -0.0 vs 0.0 or a NaN payload would count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    if a.is_floating_point():
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def _assert_same_state_dict(got_path, ref: dict) -> None:
    got = torch.load(got_path, weights_only=True)
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))
    bad = [k for k in ref if not _bits_equal(got[k], ref[k])]
    assert not bad, bad


# --- Meta trunks -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, heads, ffn", [("dinov3_tiny_mlp", 6, "mlp"), ("dinov3_tiny_swiglu64", 4, "swiglu")])
def test_hub_trunk_converts_and_matches_reference(tmp_path, capsys, name, heads, ffn):
    dst = str(tmp_path / "ckpt")
    prov = run_cli_ok(["convert", str(FIXTURES / f"{name}.pth"), dst, "--trunk-only"], capsys)
    assert prov["format"] == "dinov3_hub"
    assert "rope_embed.periods" in prov["dropped_keys"]
    model = jax_adapter.load_pretrained(dst)
    assert isinstance(model, DinoV3)
    cfg = model.cfg
    ref_kwargs = json.loads((FIXTURES / f"{name}.json").read_text())
    # Read off the tensors: heads from the periods buffer, FFN kind and width, storage tokens, norms.
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (ref_kwargs["embed_dim"], ref_kwargs["depth"], heads)
    assert cfg.ffn_layer.startswith(ffn) and cfg.qkv_bias == ref_kwargs["qkv_bias"]
    assert cfg.n_storage_tokens == 4
    assert cfg.untie_global_and_local_cls_norm == ref_kwargs.get("untie_global_and_local_cls_norm", False)
    io = load_npz(f"{name}_io.npz")
    for i in range(3):
        out = model(_nhwc(io[f"input{i}"]))
        np.testing.assert_allclose(np.asarray(out.cls), io[f"input{i}_x_norm_clstoken"], atol=ATOL, rtol=0)
        np.testing.assert_allclose(np.asarray(out.registers), io[f"input{i}_x_storage_tokens"], atol=ATOL, rtol=0)
        np.testing.assert_allclose(np.asarray(out.patches), io[f"input{i}_x_norm_patchtokens"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["dinov3_tiny_mlp", "dinov3_tiny_swiglu64"])
def test_hub_trunk_export_round_trips_bit_for_bit(tmp_path, capsys, name):
    """convert -> export gives Meta's state_dict back: every key (periods, bias masks and the
    masked key third of qkv.bias included), dtype and bit."""
    src = FIXTURES / f"{name}.pth"
    dst, out = str(tmp_path / "ckpt"), str(tmp_path / "back.pth")
    run_cli_ok(["convert", str(src), dst, "--trunk-only"], capsys)
    rec = run_cli_ok(["export", dst, out], capsys)
    assert (rec["kind"], rec["names"]) == ("dinov3", "dinov3_hub")
    _assert_same_state_dict(out, torch.load(src, weights_only=True))


def test_trunk_source_gives_adapter_with_fresh_adapter(tmp_path, capsys):
    dst = str(tmp_path / "ckpt")
    prov = run_cli_ok(["convert", str(MLP), dst], capsys)
    assert prov["kept"] > 0  # the adapter's parameters, freshly initialised
    model = jax_adapter.load_pretrained(dst)
    assert isinstance(model, DinoV3Adapter)
    assert model.cfg.interaction_indexes == (0, 1, 2, 3)  # upstream's four even intervals of depth 4
    # The trunk is the source's, bit for bit, in Meta's names under backbone.
    out = str(tmp_path / "trunk.pth")
    run_cli_ok(["export", dst, out, "--trunk-only"], capsys)
    _assert_same_state_dict(out, torch.load(MLP, weights_only=True))


# --- adapter and segmentor -------------------------------------------------------------------


def _check_adapter_outputs(model) -> None:
    io = load_npz("dinov3_adapter_tiny_io.npz")
    for i in range(2):
        out = model(_nhwc(io[f"input{i}"]))
        for j, f in enumerate(out.features):
            np.testing.assert_allclose(np.asarray(f).transpose(0, 3, 1, 2), io[f"input{i}_f{j + 1}"],
                                       atol=ATOL, rtol=0, err_msg=f"input{i} f{j + 1}")


@pytest.mark.slow
def test_adapter_and_segmentor_convert_and_match_reference(tmp_path, capsys, segmentor):
    a, b = str(tmp_path / "adapter"), str(tmp_path / "segmentor")
    prov = run_cli_ok(["convert", str(ADAPTER), a], capsys)
    assert (prov["format"], prov["prefix"], prov["other_tensors"]) == ("dinov3_adapter", "", 0)
    prov = run_cli_ok(["convert", str(segmentor), b], capsys)
    # The adapter is found inside "model" under segmentation_model.0.; the M2F head is not ours.
    assert prov["format"] == "dinov3_adapter"
    assert (prov["container"], prov["prefix"], prov["other_tensors"]) == ("model", "segmentation_model.0.", 1)
    model = jax_adapter.load_pretrained(b)
    assert isinstance(model, DinoV3Adapter)
    ref = json.loads((FIXTURES / "dinov3_adapter_tiny.json").read_text())
    cfg = model.cfg
    # Read off the tensors: SPM width, 16 heads x 4 points, extra extractors, trunk heads (periods).
    assert (cfg.conv_inplane, cfg.deform_num_heads, cfg.n_points) == (16, 16, 4)
    assert cfg.interaction_indexes == tuple(ref["interaction_indexes"]) and cfg.use_extra_extractor
    assert cfg.backbone.embed_dim == 96 and cfg.backbone.num_heads == 6
    # Both sources hold the same weights: the same stored arrays, so one forward check covers both.
    sa, sb = checkpoint.read_arrays(a), checkpoint.read_arrays(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    _check_adapter_outputs(model)


def test_adapter_export_round_trips_bit_for_bit(tmp_path, capsys, segmentor):
    dst, out = str(tmp_path / "ckpt"), str(tmp_path / "back.pth")
    run_cli_ok(["convert", str(segmentor), dst], capsys)
    rec = run_cli_ok(["export", dst, out], capsys)
    assert (rec["kind"], rec["names"]) == ("dinov3_adapter", "dinov3_adapter")
    # BatchNorm counters (int64), buffers and the trunk under backbone.: Meta's adapter state_dict.
    _assert_same_state_dict(out, torch.load(ADAPTER, weights_only=True))
    # The trunk alone, in hub names.
    trunk_out = str(tmp_path / "trunk.pth")
    rec = run_cli_ok(["export", dst, trunk_out, "--trunk-only"], capsys)
    assert rec["names"] == "dinov3_hub"
    ref = torch.load(ADAPTER, weights_only=True)
    _assert_same_state_dict(trunk_out, {k[len("backbone."):]: v for k, v in ref.items() if k.startswith("backbone.")})


def test_adapter_source_trunk_only(tmp_path, capsys):
    dst = str(tmp_path / "ckpt")
    run_cli_ok(["convert", str(ADAPTER), dst, "--trunk-only"], capsys)
    model = jax_adapter.load_pretrained(dst)
    assert isinstance(model, DinoV3) and model.cfg.embed_dim == 96


def test_config_and_preset(tmp_path, capsys):
    """--config takes the adapter JSON (with "backbone"); a contradiction names the field."""
    dst = str(tmp_path / "ckpt")
    run_cli_ok(["convert", str(ADAPTER), dst, "--config", str(FIXTURES / "dinov3_adapter_tiny.json")], capsys)
    rc, out, err = run_cli(["convert", str(MLP), str(tmp_path / "b"), "--trunk-only",
                            "--preset", "dinov3_vits16"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "embed_dim: the checkpoint has 96" in err, err
    assert not os.path.exists(tmp_path / "b")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(json.loads((FIXTURES / "dinov3_tiny_mlp.json").read_text()), num_heads=3)))
    rc, _, err = run_cli(["convert", str(MLP), str(tmp_path / "c"), "--trunk-only", "--config", str(bad)], capsys)
    assert rc == 2 and "num_heads: the checkpoint has 6" in err, err


# --- refusals --------------------------------------------------------------------------------


def _refused(argv, capsys, dst, *needles):
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1, (rc, out, err)
    for n in needles:
        assert n in err, err
    assert not os.path.exists(dst)
    assert not [p for p in os.listdir(os.path.dirname(dst)) if p.startswith(".jax_adapter")]


def test_hash_in_file_name_is_checked(tmp_path, capsys):
    import hashlib

    digest = hashlib.sha256(MLP.read_bytes()).hexdigest()
    good = tmp_path / f"dinov3_vits16_pretrain_lvd1689m-{digest[:8]}.pth"
    shutil.copy(MLP, good)
    run_cli_ok(["convert", str(good), str(tmp_path / "ok"), "--trunk-only"], capsys)
    wrong = "00000000" if digest[:8] != "00000000" else "11111111"
    bad = tmp_path / f"dinov3_vits16_pretrain_lvd1689m-{wrong}.pth"
    shutil.copy(MLP, bad)
    _refused(["convert", str(bad), str(tmp_path / "ckpt"), "--trunk-only"], capsys, str(tmp_path / "ckpt"),
             f"sha256 {wrong}", digest[:8])


def test_tampered_bias_mask_is_refused(tmp_path, capsys):
    sd = torch.load(MLP, weights_only=True)
    sd["blocks.2.attn.qkv.bias_mask"][96 + 5] = 1.0  # one key-bias entry switched on
    path = tmp_path / "tampered.pth"
    torch.save(sd, path)
    _refused(["convert", str(path), str(tmp_path / "ckpt"), "--trunk-only"], capsys, str(tmp_path / "ckpt"),
             "blocks.2.attn.qkv.bias_mask", "1 of 288 entries differ")


def test_rope_periods_mismatch_is_refused(tmp_path, capsys):
    sd = torch.load(MLP, weights_only=True)
    sd["rope_embed.periods"] = sd["rope_embed.periods"] * 1.01  # another base
    path = tmp_path / "periods.pth"
    torch.save(sd, path)
    _refused(["convert", str(path), str(tmp_path / "ckpt"), "--trunk-only"], capsys, str(tmp_path / "ckpt"),
             "rope_embed.periods")


def test_inspect_names_the_formats(tmp_path, capsys, segmentor):
    for src, fmt, kind in [(MLP, "dinov3_hub", "dinov3"), (segmentor, "dinov3_adapter", "dinov3_adapter")]:
        rc, out, err = run_cli(["inspect", str(src), "--json"], capsys)
        assert rc == 0, err
        info = json.loads(out)
        assert (info["format"], info["kind"]) == (fmt, kind) and "unresolved" not in info
    rc, out, _ = run_cli(["inspect", str(segmentor)], capsys)
    assert "dinov3_adapter (backbone under model:segmentation_model.0.)" in out


# --- Hugging Face ----------------------------------------------------------------------------

HF_CONFIGS = {
    # ViT-S/B/L-like: GELU MLP, q and v biases, 4 registers.
    "mlp": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_register_tokens=4),
    # ViT-S+/H+-like: gated SwiGLU (gate_proj = w1, up_proj = w2).
    "swiglu": dict(hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_register_tokens=4, use_gated_mlp=True, hidden_act="silu"),
    # 7B-like: gated, no query/value bias, no registers, 32-wide heads.
    "swiglu_nobias": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                          num_register_tokens=0, use_gated_mlp=True, hidden_act="silu",
                          query_bias=False, value_bias=False),
}
HF_SIZES = ((32, 32), (48, 80), (70, 100))  # the last is not a multiple of 16: both drop the remainder


def _build_hf(kind: str, folder, seed: int = 0) -> DINOv3ViTModel:
    model = DINOv3ViTModel(DINOv3ViTConfig(**HF_CONFIGS[kind]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every parameter random, so that no mapping error hides behind 1s or 0s
        for name, p in model.named_parameters():
            scale = 0.5 if "norm" in name or "lambda" in name else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("norm1.weight") else 0.0))
    model.eval()
    model.save_pretrained(str(folder))
    return model


def _compare_hf(hf: DINOv3ViTModel, model) -> float:
    rng = np.random.default_rng(0)
    worst = 0.0
    for h, w in HF_SIZES:
        x = rng.standard_normal((2, h, w, 3)).astype(np.float32)
        with torch.no_grad():
            ref = hf(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
        out = model(jnp.asarray(x))
        got = np.concatenate([np.asarray(out.cls)[:, None], np.asarray(out.registers), np.asarray(out.patches)], 1)
        assert got.shape == ref.shape, (h, w, got.shape, ref.shape)
        err = float(np.abs(got - ref).max())
        assert err < ATOL, f"{h}x{w}: max |ours - transformers| = {err}"
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("kind", list(HF_CONFIGS))
def test_hf_dinov3_converts_and_matches_transformers(tmp_path, capsys, kind):
    hf = _build_hf(kind, tmp_path / "hf")
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors")
    dst = str(tmp_path / "ckpt")
    prov = run_cli_ok(["convert", str(tmp_path / "hf"), dst, "--trunk-only"], capsys)
    assert prov["format"] == "hf_dinov3" and prov["source_files"][0]["name"] == "model.safetensors"
    model = jax_adapter.load_pretrained(dst)
    assert isinstance(model, DinoV3)
    c = HF_CONFIGS[kind]
    assert (model.cfg.embed_dim, model.cfg.depth, model.cfg.num_heads) == (
        c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"])
    assert model.cfg.ffn_hidden == c["intermediate_size"]
    assert (model.cfg.ffn_layer != "mlp") == c.get("use_gated_mlp", False)
    err = _compare_hf(hf, model)
    print(f"{kind}: max |ours - transformers| = {err:.2e}")


def test_hf_module_names_convert_like_saved_files(tmp_path, capsys):
    """transformers' in-memory names (``model.layer.N``), torch.save'd, give the same arrays as
    the saved safetensors (``layer.N``)."""
    from jax_adapter.convert.keys import to_state_dict

    hf = _build_hf("swiglu", tmp_path / "hf")
    torch.save(hf.state_dict(), tmp_path / "modules.pth")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_cli_ok(["convert", str(tmp_path / "hf"), a, "--trunk-only"], capsys)
    run_cli_ok(["convert", str(tmp_path / "modules.pth"), b, "--trunk-only",
                "--config", str(tmp_path / "hf" / "config.json")], capsys)
    sa, sb = to_state_dict(jax_adapter.load_pretrained(a)), to_state_dict(jax_adapter.load_pretrained(b))
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def test_hf_export_gives_meta_names(tmp_path, capsys):
    """An HF model exported in Meta's names: fused qkv with a zero key bias and its mask, w1 from
    gate_proj and w2 from up_proj, periods recomputed."""
    hf = _build_hf("swiglu", tmp_path / "hf")
    dst, out = str(tmp_path / "ckpt"), str(tmp_path / "meta.pth")
    run_cli_ok(["convert", str(tmp_path / "hf"), dst, "--trunk-only"], capsys)
    run_cli_ok(["export", dst, out], capsys)
    sd = torch.load(out, weights_only=True)
    hsd = hf.state_dict()
    d = 96
    assert torch.equal(sd["blocks.1.attn.qkv.weight"], torch.cat(
        [hsd[f"model.layer.1.attention.{x}_proj.weight"] for x in "qkv"]))
    assert torch.equal(sd["blocks.1.attn.qkv.bias"][d:2 * d], torch.zeros(d))
    assert torch.equal(sd["blocks.1.attn.qkv.bias"][2 * d:], hsd["model.layer.1.attention.v_proj.bias"])
    assert torch.equal(sd["blocks.1.attn.qkv.bias_mask"], torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)]))
    assert torch.equal(sd["blocks.0.mlp.w1.weight"], hsd["model.layer.0.mlp.gate_proj.weight"])
    assert torch.equal(sd["blocks.0.mlp.w2.weight"], hsd["model.layer.0.mlp.up_proj.weight"])
    assert torch.equal(sd["storage_tokens"], hsd["embeddings.register_tokens"])
    assert sd["mask_token"].shape == (1, d) and sd["rope_embed.periods"].shape == (d // 4 // 4,)


def test_hf_mlp_up_proj_is_fc1(tmp_path, capsys):
    """The trap: a GELU MLP's up_proj is fc1 (not a SwiGLU's w2)."""
    _build_hf("mlp", tmp_path / "hf")
    rc, out, err = run_cli(["inspect", str(tmp_path / "hf"), "--json"], capsys)
    assert rc == 0, err
    info = json.loads(out)
    assert (info["format"], info["kind"]) == ("hf_dinov3", "dinov3")
    assert info["config"]["ffn_layer"] == "mlp" and info["config"]["ffn_ratio"] == 2.0


def test_hf_safetensors_conversion_needs_no_torch(tmp_path):
    _build_hf("mlp", tmp_path / "hf")
    assert convert_without_torch(tmp_path / "hf", tmp_path / "ckpt")["format"] == "hf_dinov3"
    assert (tmp_path / "ckpt" / "jax_adapter.json").is_file()


def test_bare_hf_safetensors_needs_heads(tmp_path, capsys):
    """Without config.json (and with no periods buffer, which HF lacks) the heads of a non-hub
    width are not guessed; the folder's config.json given as --config decides them."""
    _build_hf("mlp", tmp_path / "hf")
    bare = tmp_path / "bare"
    bare.mkdir()
    os.replace(tmp_path / "hf" / "model.safetensors", bare / "weights.safetensors")
    dst = str(tmp_path / "ckpt")
    _refused(["convert", str(bare / "weights.safetensors"), dst, "--trunk-only"], capsys, dst,
             "cannot infer num_heads")
    run_cli_ok(["convert", str(bare / "weights.safetensors"), dst, "--trunk-only",
                "--config", str(tmp_path / "hf" / "config.json")], capsys)
    assert jax_adapter.load_pretrained(dst).cfg.num_heads == 4
