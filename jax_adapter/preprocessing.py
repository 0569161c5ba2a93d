"""Images in, model input out: ``model(jax_adapter.preprocess("street.jpg"))``.

:func:`preprocess` reads an image (a file, a Pillow image or an array), resizes it or fits and
pads it to a size, and normalises it with the statistics the weights were trained with:
ImageNet's for DINOv2 and most DINOv3 weights, the satellite statistics for DINOv3's SAT493M
weights. Reading files and resizing use Pillow (``pip install 'jax-adapter[images]'``); an array
at its own size needs nothing but numpy.

(The module is ``preprocessing`` so that ``jax_adapter.preprocess`` can be the function.)
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from jax_adapter import registry
from jax_adapter.errors import InputError, JaxAdapterError
from jax_adapter.models.base import IMAGENET_MEAN, IMAGENET_STD
from jax_adapter.models.dinov3.presets import SAT_MEAN, SAT_STD

# name -> (mean, std) per RGB channel, for pixel values in [0, 1]: the statistics of the
# registered weights, by the names the command line takes.
STATS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "sat": (SAT_MEAN, SAT_STD),  # DINOv3's SAT-493M weights
}
MODES = ("resize", "pad")
Size = Union[int, Tuple[int, int], None]


def stats_for(source: Optional[str]) -> str:
    """The statistics name (a key of :data:`STATS`) of the weights ``source`` names or points
    at: registered weights, or a URL or file of registered weights (their entry says; see
    :func:`jax_adapter.registry.find_weights`), or a file whose name carries a registered
    weights' pretraining tag (``..._sat493m...`` for DINOv3's satellite weights, however the
    file was renamed or converted); ``"imagenet"`` for anything else."""
    if not source:
        return "imagenet"
    w = registry.find_weights(source)
    candidates = [w] if w is not None else []
    base = os.path.basename(str(source).rstrip("/")).lower()
    for name in registry.list_pretrained():
        tag = name.partition(".")[2]
        if tag and tag in base:
            candidates.append(registry.weights(name))
    for w in candidates:
        for stats, (mean, std) in STATS.items():
            if stats != "imagenet" and tuple(mean) == tuple(w.mean) and tuple(std) == tuple(w.std):
                return stats
    return "imagenet"


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise JaxAdapterError("reading and resizing images needs Pillow "
                              "(pip install 'jax-adapter[images]')") from None
    return Image


def load_image(image) -> np.ndarray:
    """``image`` as ``[H, W, 3]``: uint8 from a file or Pillow image, float32 in [0, 1] from a
    floating array, uint8 from a uint8 array. Grayscale is repeated to RGB, alpha dropped."""
    if isinstance(image, (str, os.PathLike)):
        Image = _pillow()
        from PIL import ImageOps, UnidentifiedImageError

        try:
            with Image.open(image) as im:
                # Photos store their orientation in EXIF: show them as a viewer would.
                return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        except UnidentifiedImageError:
            raise InputError(f"{image}: not an image file Pillow can read") from None
    if hasattr(image, "convert") and hasattr(image, "size"):  # a Pillow image
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        hint = " (CHW? transpose to HWC)" if a.ndim == 3 and a.shape[0] in (3, 4) else ""
        raise InputError(f"an image array must be [H, W, 3] (RGB, channels last), got shape {a.shape}{hint}")
    a = a[..., :3]
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        return a.astype(np.float32)
    raise InputError(f"an image array must be uint8 (0..255) or floating (0..1), got {a.dtype}")


def _size(size: Size) -> Optional[Tuple[int, int]]:
    if size is None:
        return None
    hw = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(hw) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in hw):
        raise InputError(f"size must be a positive int or (height, width), got {size!r}")
    return int(hw[0]), int(hw[1])


def _resize(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """``[H, W, 3]`` to ``[h, w, 3]``, bicubic, antialiased when shrinking (Pillow's resize)."""
    if a.shape[:2] == (h, w):
        return a
    Image = _pillow()
    if a.dtype == np.uint8:
        return np.asarray(Image.fromarray(a, "RGB").resize((w, h), Image.Resampling.BICUBIC))
    # Floating images per channel in Pillow's 32-bit float mode: no rounding to 8 bits.
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c]), "F")
                                .resize((w, h), Image.Resampling.BICUBIC)) for c in range(3)], -1)


def fit_size(height: int, width: int, size: Tuple[int, int]) -> Tuple[int, int]:
    """The largest ``(h, w)`` with the aspect of ``height x width`` inside ``size``."""
    scale = min(size[0] / height, size[1] / width)
    return max(1, min(size[0], round(height * scale))), max(1, min(size[1], round(width * scale)))


def _mean_std(stats: str, mean, std, weights: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    if weights is not None:
        w = registry.find_weights(weights)
        if w is None:
            raise InputError(f"unknown weights {weights!r}: expected one of "
                             f"{', '.join(registry.list_pretrained())}")
        default = (w.mean, w.std)
    elif stats not in STATS:
        raise InputError(f"unknown stats {stats!r}: expected one of {', '.join(STATS)}")
    else:
        default = STATS[stats]
    m = np.asarray(default[0] if mean is None else mean, np.float32).reshape(-1)
    s = np.asarray(default[1] if std is None else std, np.float32).reshape(-1)
    if m.shape != (3,) or s.shape != (3,) or not (s > 0).all():
        raise InputError(f"mean and std must be 3 values each, std positive; got {m.tolist()}, {s.tolist()}")
    return m, s


def preprocess(
    image, size: Size = None, *, mode: str = "resize", stats: str = "imagenet",
    mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
    weights: Optional[str] = None,
) -> np.ndarray:
    """One image as model input: ``[1, H, W, 3]`` float32, NHWC, normalised.

    ``image``: a file path, a Pillow image, or an array ``[H, W, 3]`` (uint8 0..255, or floating
    0..1). ``size``: ``(H, W)`` or one int for a square; ``None`` keeps the image's size.
    ``mode="resize"`` resizes to exactly ``size`` (bicubic, antialiased); ``mode="pad"`` keeps
    the aspect ratio, fits the image inside ``size`` and pads the bottom and right with the mean
    colour (zero after normalisation; the model pads the same way). Normalisation: the statistics
    of registered ``weights`` (``"dinov3_vitl16_sat.sat493m"``: their entry's mean and std), else
    ``stats`` (``"imagenet"`` or ``"sat"``), or explicit ``mean`` / ``std`` for pixel values in
    [0, 1].
    """
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
    m, s = _mean_std(stats, mean, std, weights)
    a = load_image(image)
    target = _size(size)
    inner = None
    if target is not None:
        inner = target if mode == "resize" else fit_size(a.shape[0], a.shape[1], target)
        a = _resize(a, *inner)
    x = a.astype(np.float32)
    if a.dtype == np.uint8:
        x /= 255.0
    x = (x - m) / s
    if target is not None and inner != target:
        x = np.pad(x, ((0, target[0] - inner[0]), (0, target[1] - inner[1]), (0, 0)))
    return x[None].astype(np.float32)


def to_display(images: np.ndarray, stats: str = "imagenet", *, mean=None, std=None) -> np.ndarray:
    """Undo :func:`preprocess`'s normalisation: ``[1, H, W, 3]`` or ``[H, W, 3]`` -> ``[H, W, 3]``
    uint8, for showing what the model saw."""
    m, s = _mean_std(stats, mean, std)
    x = np.asarray(images, np.float32)
    x = x[0] if x.ndim == 4 else x
    return np.clip(np.rint((x * s + m) * 255.0), 0, 255).astype(np.uint8)
