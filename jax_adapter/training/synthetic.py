"""Synthetic data for the examples: the demo's street picture, and a dense-prediction task for
smoke-testing training: shapes on noisy backgrounds,
their masks as the target, and a small segmentation head on the backbone.

Every sample is a pure function of ``(seed, step, index in the global batch)``, so a resumed or
re-sharded run sees exactly the same data.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_adapter import registry
from jax_adapter.errors import ConfigError
from jax_adapter.models.base import IMAGENET_MEAN, IMAGENET_STD
from jax_adapter.nn.layers import linear

CLASSES = ("background", "rectangle", "ellipse")


def street_image(h: int, w: int) -> np.ndarray:
    """A deterministic street-like picture (sky, road, boxes), ImageNet-normalised:
    ``[1, h, w, 3]`` float32. The demo's input."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    horizon = 0.45 * h
    img[..., 0] = np.where(y < horizon, 0.5 + 0.3 * y / h, 0.35)
    img[..., 1] = np.where(y < horizon, 0.7 + 0.2 * y / h, 0.35)
    img[..., 2] = np.where(y < horizon, 0.95, 0.38 + 0.05 * np.sin(x / 7.0))
    for k, (cx, cy, bw, bh) in enumerate(((0.2, 0.6, 0.12, 0.15), (0.55, 0.58, 0.08, 0.1), (0.8, 0.65, 0.15, 0.2))):
        box = (np.abs(x / w - cx) < bw / 2) & (np.abs(y / h - cy) < bh / 2)
        img[box] = ((0.8, 0.1, 0.1), (0.1, 0.3, 0.8), (0.9, 0.9, 0.9))[k]
    mean = np.array(IMAGENET_MEAN, np.float32)
    std = np.array(IMAGENET_STD, np.float32)
    return ((img - mean) / std)[None]


def synthetic_sample(seed: int, step: int, index: int, h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """One image ``[h, w, 3]`` float32 (roughly zero-mean, unit-scale) and its mask ``[h, w]``
    int32 (0 background, 1 rectangle, 2 ellipse; later shapes cover earlier ones)."""
    rng = np.random.default_rng((seed, step, index))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    # A smooth coloured background with noise, so that colour alone does not give the class.
    base = rng.uniform(-1, 1, 3).astype(np.float32)
    tilt = rng.uniform(-1, 1, (2, 3)).astype(np.float32)
    img = base + (y[..., None] / h) * tilt[0] + (x[..., None] / w) * tilt[1]
    img += 0.2 * rng.standard_normal((h, w, 3)).astype(np.float32)
    mask = np.zeros((h, w), np.int32)
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.integers(1, 3))
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        ry, rx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
        if cls == 1:
            inside = (np.abs(y - cy) <= ry) & (np.abs(x - cx) <= rx)
        else:
            inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
        img[inside] = rng.uniform(-1.5, 1.5, 3).astype(np.float32)
        mask[inside] = cls
    return img, mask


def synthetic_batch(
    seed: int, step: int, indices: Sequence[int], h: int, w: int
) -> Dict[str, np.ndarray]:
    """``{"images": [n, h, w, 3] float32, "masks": [n, h, w] int32}`` for the given global
    batch indices (a process builds only its own part of the global batch)."""
    samples = [synthetic_sample(seed, step, i, h, w) for i in indices]
    return {
        "images": np.stack([s[0] for s in samples]),
        "masks": np.stack([s[1] for s in samples]),
    }


class DenseHead(nnx.Module):
    """Per-level 1x1 projections of ``f1..f4``, upsampled to ``f1``'s size and summed, ReLU,
    then a 1x1 classifier: ``[B, h_i, w_i, D]`` x 4 -> logits ``[B, h_1, w_1, K]`` float32."""

    def __init__(self, dim: int, hidden: int, classes: int, *, dtype: str = "float32",
                 param_dtype: str = "float32", rngs: nnx.Rngs):
        dt = dict(dtype=dtype, param_dtype=param_dtype)
        self.proj = nnx.List([linear(dim, hidden, rngs=rngs, **dt) for _ in range(4)])
        self.cls = linear(hidden, classes, rngs=rngs, **dt)

    def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
        b, h, w, _ = features[0].shape
        x = None
        for proj, f in zip(self.proj, features):
            y = proj(f)
            if y.shape[1:3] != (h, w):
                y = jax.image.resize(y, (b, h, w, y.shape[-1]), "bilinear")
            x = y if x is None else x + y
        return self.cls(jax.nn.relu(x)).astype(jnp.float32)


class SegmentationModel(nnx.Module):
    """An adapter backbone (the registered adapter of the config's type: ``DinoV2Adapter``,
    ``DinoV3Adapter``) + :class:`DenseHead`: images ``[B, H, W, 3]`` -> logits at stride 4."""

    def __init__(self, cfg: Any, *, hidden: int = 64, rngs: nnx.Rngs):
        kind = registry.kind_of_config(cfg)
        if kind is None or kind.role != "adapter":
            raise ConfigError(f"SegmentationModel needs an adapter config, got {type(cfg).__name__}")
        self.backbone = kind.model(cfg, rngs=rngs)
        self.head = DenseHead(cfg.embed_dim, hidden, len(CLASSES), dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.backbone(images).features)


def _nearest_rows(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each output pixel centre when sampling ``n_in`` pixels at ``n_out``."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def segmentation_loss(model: nnx.Module, batch: Dict[str, jax.Array]):
    """Mean softmax cross-entropy (float32) of the logits against the masks sampled at the
    logits' pixel centres; also returns the pixel accuracy."""
    logits = model(batch["images"])
    masks = batch["masks"]
    h, w = logits.shape[1:3]
    target = masks[:, _nearest_rows(h, masks.shape[1])][:, :, _nearest_rows(w, masks.shape[2])]
    loss = jnp.mean(
        -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), target[..., None], -1)
    )
    accuracy = jnp.mean((jnp.argmax(logits, -1) == target).astype(jnp.float32))
    return loss, {"accuracy": accuracy}
