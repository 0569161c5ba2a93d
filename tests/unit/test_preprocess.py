"""``jax_adapter.preprocess``: image files and arrays -> normalised ``[1, H, W, 3]`` float32."""

import numpy as np
import pytest
from PIL import Image

import jax_adapter
from jax_adapter.errors import InputError
from jax_adapter.preprocessing import STATS, fit_size, load_image, preprocess, stats_for, to_display


def _picture(h=30, w=50, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_normalises_with_the_named_statistics():
    a = _picture()
    x = jax_adapter.preprocess(a)
    assert x.shape == (1, 30, 50, 3) and x.dtype == np.float32
    mean, std = (np.array(v, np.float32) for v in STATS["imagenet"])
    np.testing.assert_allclose(x[0], (a / 255.0 - mean) / std, rtol=1e-6, atol=1e-6)
    sat = preprocess(a, stats="sat")
    mean, std = (np.array(v, np.float32) for v in STATS["sat"])
    np.testing.assert_allclose(sat[0], (a / 255.0 - mean) / std, rtol=1e-6, atol=1e-6)
    assert not np.allclose(sat, x)
    custom = preprocess(a, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    np.testing.assert_allclose(custom[0], a / 127.5 - 1.0, atol=1e-6)
    # Floating arrays are pixel values in [0, 1].
    np.testing.assert_allclose(preprocess(a.astype(np.float32) / 255.0), x, atol=1e-6)


def test_stats_follow_the_weights_name():
    assert stats_for("dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth") == "sat"
    assert stats_for("https://x/dinov3_vit7b16_pretrain_SAT493M-a6675841.pth?sig=1") == "sat"
    assert stats_for("hf-hub:facebook/dinov3-vitl16-pretrain-sat493m") == "sat"
    assert stats_for("dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth") == "imagenet"
    assert stats_for("dinov2_vits14") == "imagenet"
    assert stats_for(None) == "imagenet"


def test_files_read_like_arrays(tmp_path):
    a = _picture()
    Image.fromarray(a).save(tmp_path / "p.png")
    Image.fromarray(a[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.concatenate([a, np.full(a.shape[:2] + (1,), 7, np.uint8)], -1), "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(preprocess(str(tmp_path / "p.png")), preprocess(a))
    np.testing.assert_array_equal(preprocess(tmp_path / "a.png"), preprocess(a))  # alpha dropped
    gray = load_image(tmp_path / "gray.png")
    assert gray.shape == (30, 50, 3) and (gray == a[..., :1]).all()
    np.testing.assert_array_equal(preprocess(Image.fromarray(a)), preprocess(a))


def test_resize_and_pad():
    a = _picture(30, 50)
    r = preprocess(a, (28, 42))
    assert r.shape == (1, 28, 42, 3)
    # Resize matches Pillow's bicubic resize of the uint8 image, then normalisation.
    want = preprocess(np.asarray(Image.fromarray(a).resize((42, 28), Image.Resampling.BICUBIC)))
    np.testing.assert_array_equal(r, want)
    assert preprocess(a, 32).shape == (1, 32, 32, 3)
    # Pad: fit inside (56, 56) keeping 30:50, i.e. 34x56, then zeros (the mean colour) below.
    assert fit_size(30, 50, (56, 56)) == (34, 56)
    p = preprocess(a, (56, 56), mode="pad")
    assert p.shape == (1, 56, 56, 3)
    np.testing.assert_array_equal(p[:, :34], preprocess(a, (34, 56)))
    assert (p[:, 34:] == 0).all()
    # A tall image pads on the right.
    t = preprocess(_picture(50, 30), (28, 28), mode="pad")
    assert (t[:, :, fit_size(50, 30, (28, 28))[1]:] == 0).all() and t[:, :, :16].std() > 0
    # Floating images are resized without rounding to 8 bits.
    f = np.linspace(0, 1, 30 * 50 * 3, dtype=np.float32).reshape(30, 50, 3)
    assert preprocess(f, (15, 25)).shape == (1, 15, 25, 3)


def test_display_undoes_the_normalisation():
    a = _picture()
    for stats in STATS:
        np.testing.assert_array_equal(to_display(preprocess(a, stats=stats), stats), a)


@pytest.mark.parametrize("image, kwargs, match", [
    (np.zeros((3, 30, 50), np.uint8), {}, "CHW"),
    (np.zeros((30, 50, 3), np.int32), {}, "uint8"),
    (np.zeros((30, 50, 3), np.uint8), {"mode": "crop"}, "unknown mode"),
    (np.zeros((30, 50, 3), np.uint8), {"size": (0, 5)}, "size"),
    (np.zeros((30, 50, 3), np.uint8), {"stats": "coco"}, "unknown stats"),
    (np.zeros((30, 50, 3), np.uint8), {"std": (1.0, 0.0, 1.0)}, "std"),
])
def test_bad_input_is_named(image, kwargs, match):
    with pytest.raises(InputError, match=match):
        preprocess(image, **kwargs)


def test_not_an_image_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"no picture")
    with pytest.raises(InputError, match="not an image"):
        preprocess(str(tmp_path / "x.png"))
    with pytest.raises(FileNotFoundError):
        preprocess(str(tmp_path / "missing.png"))
