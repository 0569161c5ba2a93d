"""Pictures of what a backbone sees: the PCA of its feature maps as colours.

Each map ``[h, w, C]`` is reduced to its first three principal components, fitted on that map's
own patch features, and shown as RGB (the usual check of a DINO backbone: parts of one object
share a colour). :func:`render` runs a model on one image and lays out the image beside the PCA
of the ViT map and of f1..f4 (an adapter) or of the patch tokens (a trunk), one tile each,
labelled with its shape. Drawing uses Pillow (``pip install 'jax-adapter[images]'``).
"""

from __future__ import annotations

import json
from typing import List, Sequence, Tuple

import numpy as np

from jax_adapter.errors import InputError
from jax_adapter.preprocessing import _pillow

GAP = 6  # pixels between tiles and around them
LABEL_HEIGHT = 16  # the label strip under each tile (Pillow's default bitmap font is 11 px)
PNG_KEY = "jax-adapter:tiles"  # PNG text chunk: the tiles' labels, shapes and boxes as JSON


def pca_rgb(features: np.ndarray, *, clip: float = 1.0) -> np.ndarray:
    """``[h, w, C]`` -> ``[h, w, 3]`` float32 in [0, 1]: the first three principal components.

    Components come from the covariance of the ``h * w`` feature vectors (float64 eigen-
    decomposition of ``C x C``); each is signed so that its largest loading is positive
    (deterministic colours) and scaled to [0, 1] between its ``clip`` and ``100 - clip``
    percentiles, so that a few outlier tokens do not wash out the rest. Fewer than three
    components (``C < 3`` or a rank-deficient map) leave the missing channels at 0.5.
    """
    f = np.asarray(features, np.float64)
    if f.ndim != 3:
        raise InputError(f"features must be [h, w, C], got shape {f.shape}")
    h, w, c = f.shape
    x = f.reshape(-1, c)
    x = x - x.mean(0)
    cov = x.T @ x / max(len(x) - 1, 1)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1][:3]
    out = np.full((h * w, 3), 0.5)
    scale = max(float(evals.max()), 0.0)
    for k, i in enumerate(order):
        if evals[i] <= 1e-12 * max(scale, 1e-30):
            break
        v = evecs[:, i]
        v = v if v[np.argmax(np.abs(v))] > 0 else -v
        p = x @ v
        lo, hi = np.percentile(p, [clip, 100 - clip])
        out[:, k] = np.clip((p - lo) / (hi - lo), 0, 1) if hi > lo else 0.5
    return out.reshape(h, w, 3).astype(np.float32)


def feature_maps(model, images) -> List[Tuple[str, np.ndarray]]:
    """Run ``model`` on ``images [1, H, W, 3]``; its maps as ``[(name, [h, w, C])]``.

    An adapter (output with ``features`` and ``vit``) gives ``vit, f1, f2, f3, f4``; a trunk
    (output with ``patches [1, N, D]``) gives ``vit``, its patch tokens on the
    ``(H // patch, W // patch)`` grid.
    """
    import jax
    from flax import nnx

    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[0] != 1:
        raise InputError(f"expected one image [1, H, W, 3], got shape {images.shape}")
    graph, state = nnx.split(model)
    out = jax.jit(lambda s, x: nnx.merge(graph, s)(x))(state, images)
    if hasattr(out, "features") and hasattr(out, "vit"):
        maps = [("vit", out.vit)] + [(f"f{i + 1}", f) for i, f in enumerate(out.features)]
        return [(name, np.asarray(m[0], np.float32)) for name, m in maps]
    if hasattr(out, "patches"):
        p = model.cfg.patch_size
        gh, gw = images.shape[1] // p, images.shape[2] // p
        patches = np.asarray(out.patches[0], np.float32)
        if patches.shape[0] != gh * gw:
            raise InputError(f"{patches.shape[0]} patch tokens do not fill the {gh}x{gw} grid")
        return [("vit", patches.reshape(gh, gw, -1))]
    raise InputError(f"cannot show the output of a {type(model).__name__} ({type(out).__name__})")


def _shape_label(name: str, shape: Sequence[int]) -> str:
    return f"{name} {'x'.join(str(int(v)) for v in shape)}"


def layout(image_hw: Tuple[int, int], n_tiles: int, tile_height: int = 224):
    """``(canvas (W, H), tile (w, h), boxes [(left, top, right, bottom)])`` of one row of
    ``n_tiles`` tiles, each ``tile_height`` high with the image's aspect ratio."""
    h, w = image_hw
    tw = max(1, round(w * tile_height / h))
    boxes = [(GAP + k * (tw + GAP), GAP, GAP + k * (tw + GAP) + tw, GAP + tile_height) for k in range(n_tiles)]
    canvas = (GAP + n_tiles * (tw + GAP), GAP + tile_height + LABEL_HEIGHT + GAP)
    return canvas, (tw, tile_height), boxes


def picture(image: np.ndarray, maps: Sequence[Tuple[str, np.ndarray]], *, tile_height: int = 224):
    """A Pillow image: ``image [H, W, 3]`` uint8 and the PCA of each ``(name, [h, w, C])`` map
    (nearest-neighbour upsampled, so that each token stays a visible square), one row of tiles
    with their shapes written under them. The tiles' labels, shapes and boxes are stored in the
    PNG text chunk :data:`PNG_KEY`, as ``image.info[PNG_KEY]`` (JSON)."""
    Image = _pillow()
    from PIL import ImageDraw

    image = np.asarray(image)
    canvas, (tw, th), boxes = layout(image.shape[:2], 1 + len(maps), tile_height)
    out = Image.new("RGB", canvas, "white")
    draw = ImageDraw.Draw(out)
    tiles = [("image", image.shape, Image.fromarray(image, "RGB").resize((tw, th), Image.Resampling.BICUBIC))]
    for name, m in maps:
        rgb = np.rint(pca_rgb(m) * 255).astype(np.uint8)
        tiles.append((name, np.shape(m), Image.fromarray(rgb, "RGB").resize((tw, th), Image.Resampling.NEAREST)))
    record = []
    for (name, shape, tile), box in zip(tiles, boxes, strict=True):
        out.paste(tile, box[:2])
        label = _shape_label(name, shape)
        draw.text((box[0], box[3] + 3), label, fill="black")
        record.append({"label": label, "name": name, "shape": [int(v) for v in shape], "box": list(box)})
    out.info[PNG_KEY] = json.dumps(record)
    return out


def save_png(img, path: str) -> None:
    """Write a :func:`picture` to ``path`` atomically, with its tile record as PNG text."""
    from PIL.PngImagePlugin import PngInfo

    from jax_adapter.files import write_file

    meta = PngInfo()
    if PNG_KEY in img.info:
        meta.add_text(PNG_KEY, img.info[PNG_KEY])
    write_file(path, lambda tmp: img.save(tmp, format="PNG", pnginfo=meta, optimize=True), overwrite=True)


def render(model, images: np.ndarray, display: np.ndarray, *, tile_height: int = 224):
    """:func:`picture` of ``model`` run on ``images [1, H, W, 3]`` (normalised), shown beside
    ``display [H, W, 3]`` uint8 (the same image as a person sees it)."""
    return picture(display, feature_maps(model, images), tile_height=tile_height)
