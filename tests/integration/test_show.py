"""``jax-adapter show``: the PCA of the feature maps as a picture, for tiny models."""

import json

import numpy as np
import pytest
from PIL import Image

import jax_adapter
from jax_adapter import viz
from jax_adapter.preprocessing import preprocess, to_display

from tests.helpers import FIXTURES, run_cli, run_cli_ok


def test_pca_colours_follow_the_main_directions():
    rng = np.random.default_rng(0)
    h, w, c = 12, 16, 32
    yy, xx = np.mgrid[0:h, 0:w] / 10.0
    d1, d2 = rng.standard_normal(c), rng.standard_normal(c)
    d2 -= d2 @ d1 / (d1 @ d1) * d1
    f = 5.0 * yy[..., None] * d1 + 2.0 * xx[..., None] * d2 + 0.01 * rng.standard_normal((h, w, c))
    rgb = viz.pca_rgb(f)
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.float32
    assert rgb.min() >= 0 and rgb.max() <= 1
    # The strongest direction (rows) drives red, the second (columns) green.
    assert abs(np.corrcoef(rgb[..., 0].ravel(), yy.ravel())[0, 1]) > 0.99
    assert abs(np.corrcoef(rgb[..., 1].ravel(), xx.ravel())[0, 1]) > 0.99
    np.testing.assert_array_equal(viz.pca_rgb(f), rgb)  # deterministic signs
    # Fewer than three directions: the missing channels are grey.
    flat = viz.pca_rgb(np.zeros((4, 5, 8)))
    assert (flat == 0.5).all()
    two = viz.pca_rgb(f[..., :2])
    assert (two[..., 2] == 0.5).all() and two[..., 0].std() > 0.1
    with pytest.raises(ValueError, match=r"\[h, w, C\]"):
        viz.pca_rgb(np.zeros((4, 5)))


@pytest.fixture(scope="module")
def adapter_ckpt(tmp_path_factory):
    """The tiny adapter fixture as a checkpoint directory (converting it is much faster than a
    random initialisation, which runs eagerly)."""
    from jax_adapter.convert.pipeline import convert_file

    path = str(tmp_path_factory.mktemp("show") / "adapter")
    convert_file(str(FIXTURES / "seed_adapter_tiny.pth"), path, str(FIXTURES / "seed_adapter_tiny.json"))
    return path


def _street(h=56, w=84):
    from jax_adapter.training.synthetic import street_image

    return to_display(street_image(h, w))


def _check_tiles(path, want, tile_height):
    """The PNG at ``path`` has one tile per ``(label)`` of ``want``, of the image's aspect, in one
    row, each showing something (not the white background), with its label drawn under it."""
    img = Image.open(path)
    img.load()
    tiles = json.loads(img.text[viz.PNG_KEY])
    assert [t["label"] for t in tiles] == want
    tw = round(tiles[0]["shape"][1] * tile_height / tiles[0]["shape"][0])
    n = len(want)
    assert img.size == (viz.GAP + n * (tw + viz.GAP), viz.GAP + tile_height + viz.LABEL_HEIGHT + viz.GAP)
    a = np.asarray(img.convert("RGB")).astype(np.int32)
    for k, t in enumerate(tiles):
        left, top, right, bottom = t["box"]
        assert (left, top, right - left, bottom - top) == (viz.GAP + k * (tw + viz.GAP), viz.GAP, tw, tile_height)
        tile = a[top:bottom, left:right]
        assert tile.std() > 5, t["label"]
        label = a[bottom:bottom + viz.LABEL_HEIGHT, left:right]
        assert (label < 100).any(), f"no label under {t['label']}"
        gap = a[top:bottom, left - viz.GAP:left]
        assert (gap == 255).all()
    return img, tiles


def test_adapter_picture_has_the_image_and_five_maps(tmp_path, adapter_ckpt):
    model = jax_adapter.load_pretrained(adapter_ckpt)
    display = _street()
    images = preprocess(display)
    maps = viz.feature_maps(model, images)
    img = viz.picture(display, maps, tile_height=112)  # what viz.render(model, images, display) draws
    out = str(tmp_path / "features.png")
    viz.save_png(img, out)
    # 56x84, patch 14: ViT grid 4x6; f1..f4 at strides 4..32 (ceil-halvings: 11, 6, 3 wide).
    want = ["image 56x84x3", "vit 4x6x96", "f1 14x21x96", "f2 7x11x96", "f3 4x6x96", "f4 2x3x96"]
    png, tiles = _check_tiles(out, want, 112)
    # The image tile is the picture itself, resized.
    left, top, right, bottom = tiles[0]["box"]
    shown = np.asarray(png.convert("RGB"))[top:bottom, left:right]
    expected = np.asarray(Image.fromarray(display).resize((right - left, bottom - top), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(shown, expected)
    # Each PCA tile is its map's PCA, each token a block of pixels.
    maps = dict(maps)
    left, top, right, bottom = tiles[2]["box"]
    f1 = np.rint(viz.pca_rgb(maps["f1"]) * 255).astype(np.uint8)
    got = np.asarray(png.convert("RGB"))[top:bottom, left:right]
    np.testing.assert_array_equal(got[::8, ::8], np.asarray(
        Image.fromarray(f1).resize((right - left, bottom - top), Image.Resampling.NEAREST))[::8, ::8])


def test_cli_show_for_a_trunk_checkpoint(tmp_path, capsys):
    ckpt = str(tmp_path / "trunk")
    run_cli_ok(["convert", str(FIXTURES / "dinov2_tiny_noreg.pth"), ckpt, "--trunk-only",
                "--config", str(FIXTURES / "dinov2_tiny_noreg.json")], capsys)
    photo = tmp_path / "street.jpg"
    Image.fromarray(_street(120, 200)).save(photo, quality=95)
    out = tmp_path / "f.png"
    res = run_cli_ok(["show", ckpt, str(photo), "-o", str(out), "--size", "56x98", "--tile-height", "64"], capsys)
    assert res["tiles"] == ["image 56x98x3", "vit 4x7x96"] and res["stats"] == "imagenet"
    _check_tiles(out, res["tiles"], 64)
    # Default size: shorter side 448 (--short-side), sides multiples of the patch.
    res = run_cli_ok(["show", ckpt, str(photo), "-o", str(out), "--short-side", "112", "--mode", "pad"], capsys)
    assert res["input"] == [112, 182] and res["tiles"] == ["image 112x182x3", "vit 8x13x96"]
    # Bad input: one line, exit code 2, nothing written.
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rc, _, err = run_cli(["show", ckpt, str(tmp_path / "bad.png"), "-o", str(tmp_path / "g.png")], capsys)
    assert rc == 2 and "not an image" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g.png").exists()


def test_cli_demo_runs_on_an_image(tmp_path, capsys, adapter_ckpt):
    photo = tmp_path / "street.png"
    Image.fromarray(_street(42, 70)).save(photo)
    rc, out, err = run_cli(["demo", "--checkpoint", adapter_ckpt, "--image", str(photo)], capsys)
    assert rc == 0, err
    assert "42x70" in out and "f1=(11, 18)" in out, out


def test_cli_show_for_a_dinov3_adapter_with_satellite_statistics(tmp_path, capsys):
    # A file named like Meta's satellite weights: show normalises with the SAT493M statistics.
    src = tmp_path / "dinov3_adapter_tiny_pretrain_sat493m.pth"
    src.write_bytes((FIXTURES / "dinov3_adapter_tiny.pth").read_bytes())
    ckpt = str(tmp_path / "v3")
    run_cli_ok(["convert", str(src), ckpt, "--config", str(FIXTURES / "dinov3_adapter_tiny.json")], capsys)
    photo = tmp_path / "street.png"
    Image.fromarray(_street(64, 96)).save(photo)
    out = tmp_path / "v3.png"
    res = run_cli_ok(["show", ckpt, str(photo), "-o", str(out), "--size", "64x96", "--tile-height", "64"], capsys)
    assert res["stats"] == "sat"
    # Patch 16: ViT grid 4x6; f1..f4 at strides 4..32.
    want = ["image 64x96x3", "vit 4x6x96", "f1 16x24x96", "f2 8x12x96", "f3 4x6x96", "f4 2x3x96"]
    assert res["tiles"] == want
    _check_tiles(out, want, 64)
