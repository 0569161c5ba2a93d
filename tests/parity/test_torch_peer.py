"""The PyTorch peer (``benchmarks.torch_peer``) against the seed DinoAdapter's reference fixtures.

All float32 on CPU. The peer must be faithful for the benchmarks that compare against it to mean
anything: eval forward, one train step (loss, every gradient, BatchNorm running statistics), the
two sampling cores, and the ViT-S parameter layout of the JAX model.
"""

import json

import numpy as np
import pytest
import torch

from benchmarks import torch_peer
from tests.helpers import FIXTURES, ZERO_GRADIENT as ZERO_GRAD_BIASES, load_npz

pytestmark = pytest.mark.torch

OUTPUTS = ("f1", "f2", "f3", "f4", "x_out")


def tiny(msda: str = "pytorch") -> "torch_peer.DinoAdapter":
    cfg = json.loads((FIXTURES / "seed_adapter_tiny.json").read_text())
    model = torch_peer.DinoAdapter(**cfg, msda=msda)
    state = torch.load(FIXTURES / "seed_adapter_tiny.pth", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_eval_forward_matches_reference():
    io = load_npz("seed_adapter_tiny_io.npz")
    model = tiny().eval()
    for k in ("input0", "input1"):
        with torch.no_grad():
            outs = model(torch.from_numpy(io[k]))
        for name, out in zip(OUTPUTS, outs):
            ref = io[f"{k}_{name}"]
            assert tuple(out.shape) == ref.shape, (k, name)
            err = max_abs(out, ref)
            assert err < 1e-4, (k, name, err)  # measured about 5e-6


def test_train_step_matches_reference():
    step = load_npz("seed_adapter_tiny_train_step.npz")
    model = tiny().train()
    outs = model(torch.from_numpy(step["input"]))
    loss = sum((o * torch.from_numpy(step[f"cotangent_{n}"])).sum() for n, o in zip(OUTPUTS, outs))
    loss.backward()

    ref_loss = float(step["loss"])
    assert abs(loss.item() - ref_loss) <= 1e-4 * abs(ref_loss), (loss.item(), ref_loss)

    grads = {n: p.grad for n, p in model.named_parameters()}
    names = [k[len("grad/"):] for k in step if k.startswith("grad/")]
    assert sorted(names) == sorted(grads)
    scale = max(np.abs(step[f"grad/{n}"]).max() for n in names)
    for n in names:
        ref = step[f"grad/{n}"]
        got = np.zeros_like(ref) if grads[n] is None else grads[n].numpy()  # None: unused (norm.*)
        if n in ZERO_GRAD_BIASES or not np.abs(ref).max():
            assert np.abs(got).max() < 1e-6 * scale, n  # zero up to rounding
            continue
        err = max_abs(got, ref) / np.abs(ref).max()
        assert err < 1e-3, (n, err)  # relative to the array's largest value; measured < 2e-6

    buffers = dict(model.named_buffers())
    stats = [k for k in step if k.startswith("batch_stats_after/")]
    assert len(stats) == 20
    for k in stats:
        err = max_abs(buffers[k[len("batch_stats_after/"):]], step[k])
        assert err < 1e-5, (k, err)  # running var updated with the unbiased batch variance


def test_geometry_follows_reference():
    # The small sizes of the geometry fixture (ceil-halved SPM levels, crop only when padded).
    geometry = json.loads((FIXTURES / "seed_adapter_geometry.json").read_text())
    model = tiny().eval()
    for size in ("37x53", "64x64", "14x14", "224x224"):
        h, w = map(int, size.split("x"))
        with torch.no_grad():
            outs = model(torch.zeros(1, 3, h, w))
        want = [tuple(s) for s in geometry[size]["outputs"]] + [tuple(geometry[size]["x_out"])]
        assert [tuple(o.shape[-2:]) for o in outs] == want, size
    with pytest.raises(ValueError, match="too small"):
        model(torch.zeros(1, 3, 15, 29))


def test_cpp_core_matches_pytorch_core():
    pytest.importorskip("torch_ms_deform_attn", reason="optional C++ sampling core not installed")
    x = torch.from_numpy(load_npz("seed_adapter_tiny_io.npz")["input1"])
    a, b = tiny("pytorch").eval(), tiny("cpp").eval()
    with torch.no_grad():
        for name, oa, ob in zip(OUTPUTS, a(x), b(x)):
            err = max_abs(oa, ob)
            assert err < 1e-5, (name, err)  # measured 4.8e-6 (float32 rounding)


def test_vit_s_layout_matches_jax_model():
    from flax import nnx

    import jax_adapter
    from jax_adapter.convert.keys import to_state_dict

    peer = torch_peer.build("vit_s", msda="pytorch")
    n_params = sum(p.numel() for p in peer.parameters())
    assert n_params == 27_886_352  # the seed ViT-S DinoAdapter: trunk 22_056_192 + adapter

    jax_model = jax_adapter.DinoAdapter(jax_adapter.DinoV2AdapterConfig.preset("dinov2_vits14"), rngs=nnx.Rngs(0))
    state = to_state_dict(jax_model)
    ours = peer.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    peer.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    np.testing.assert_array_equal(peer.blocks[0].attn.qkv.weight.detach().numpy(), state["blocks.0.attn.qkv.weight"])

    trainable = torch_peer.freeze_trunk(peer)
    frozen = {n for n, p in trainable.named_parameters() if not p.requires_grad}
    assert "norm.weight" in frozen and "blocks.11.ls2.gamma" in frozen and "pos_embed" in frozen
    assert not any(n.startswith(("spm.", "interactions.", "norm1.", "up.", "level_embed")) for n in frozen)
