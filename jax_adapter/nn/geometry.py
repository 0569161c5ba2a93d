"""Static geometry of the DinoAdapter for one input size.

Everything here is plain Python ints and numpy arrays, computed once from ``(h, w)`` and the
patch size. Every module reads its shapes from an :class:`AdapterGeometry`; nothing re-derives a
shape from a token count. Under ``jax.jit`` the whole object is a trace-time constant.

The Spatial Prior Module's stride-2 ops (conv k3 s2 p1 and max-pool k3 s2 p1) map ``n`` to
``ceil(n / 2)``; the level sizes are therefore a chain of ceil-halvings of the padded size, not
``Hp // 8, Hp // 16, Hp // 32`` (which is what the PyTorch original assumes, and why it fails at
256x704).

Two padding policies: the DINOv2 adapter pads to a multiple of its patch size (14); the DINOv3
adapter (patch 16) pads to a multiple of 32 (``pad_multiple=32``), where every SPM level is an
exact halving, the ViT grid equals c3 and all of the upstream module's floor-derived sizes are
the true ones (see :func:`dinov3_geometry`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import numpy as np

from jax_adapter.errors import InputError

Shape2 = Tuple[int, int]


def ceil_half(n: int) -> int:
    """Output length of a k3 s2 p1 conv or max-pool on an input of length ``n``."""
    return (n + 1) // 2


def reference_points(shapes: Tuple[Shape2, ...]) -> np.ndarray:
    """Pixel-centre reference points, normalised to [0, 1], for grids concatenated in order.

    Returns ``[sum(H*W), 2]`` float32 with (x, y) on the last axis, row-major (y outer).
    """
    pts = []
    for (h, w) in shapes:
        ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
        pts.append(np.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1))
    return np.concatenate(pts, axis=0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class AdapterGeometry:
    """Shapes of every tensor in the DinoAdapter for an input of ``image_size = (h, w)``.

    Attributes:
      image_size: ``(h, w)`` of the caller's images.
      patch_size: ViT patch size ``p``.
      padded: ``(Hp, Wp)``, the size after zero-padding bottom/right to a multiple of
        ``pad_multiple`` (``p`` for DINOv2, 32 for DINOv3).
      vit_grid: ``(Hv, Wv) = (Hp/p, Wp/p)``, the ViT token grid.
      spm_shapes: the four SPM map sizes ``(c1, c2, c3, c4)`` (strides 4, 8, 16, 32 of ``padded``).
      output_sizes: sizes of ``f1..f4`` after cropping.
      vit_output_size: size of the ViT map after cropping.
    """

    image_size: Shape2
    patch_size: int
    padded: Shape2
    vit_grid: Shape2
    spm_shapes: Tuple[Shape2, Shape2, Shape2, Shape2]
    output_sizes: Tuple[Shape2, Shape2, Shape2, Shape2]
    vit_output_size: Shape2
    pad_multiple: int = 0  # 0: the patch size

    @property
    def pad_to(self) -> int:
        """The multiple the input is padded to (``patch_size`` unless set otherwise)."""
        return self.pad_multiple or self.patch_size

    @property
    def pad(self) -> Shape2:
        """Rows and columns of zeros added at the bottom and right."""
        return (self.padded[0] - self.image_size[0], self.padded[1] - self.image_size[1])

    @property
    def needs_crop(self) -> bool:
        """The reference crops the outputs only when padding was added."""
        return self.pad != (0, 0)

    @property
    def level_shapes(self) -> Tuple[Shape2, Shape2, Shape2]:
        """``(c2, c3, c4)``: the value levels of the injector and the queries of the extractor."""
        return self.spm_shapes[1:]

    @property
    def level_lengths(self) -> Tuple[int, int, int]:
        return tuple(h * w for h, w in self.level_shapes)

    @property
    def level_starts(self) -> Tuple[int, int, int]:
        return tuple(int(s) for s in np.cumsum((0,) + self.level_lengths[:-1]))

    @property
    def num_spm_tokens(self) -> int:
        return sum(self.level_lengths)

    @property
    def num_vit_tokens(self) -> int:
        return self.vit_grid[0] * self.vit_grid[1]

    @functools.cached_property
    def injector_reference_points(self) -> np.ndarray:
        """``[Hv*Wv, 2]``: one point per ViT token (queries of the injector)."""
        return reference_points((self.vit_grid,))

    @functools.cached_property
    def extractor_reference_points(self) -> np.ndarray:
        """``[c2+c3+c4 tokens, 2]``: one point per SPM token (queries of the extractor)."""
        return reference_points(self.level_shapes)

    def describe(self) -> str:
        lines = [
            f"input {self.image_size[0]}x{self.image_size[1]} -> padded {self.padded[0]}x{self.padded[1]}"
            + (f" (multiple of {self.pad_to})" if self.pad_to != self.patch_size else ""),
            f"vit grid {self.vit_grid[0]}x{self.vit_grid[1]} ({self.num_vit_tokens} tokens)",
        ]
        for i, (s, o) in enumerate(zip(self.spm_shapes, self.output_sizes)):
            lines.append(f"c{i + 1} {s[0]}x{s[1]} -> f{i + 1} {o[0]}x{o[1]}")
        lines.append(f"vit map -> {self.vit_output_size[0]}x{self.vit_output_size[1]}")
        return "\n".join(lines)


# typed: 32.0 and True must not hit the cache entries of 32 and 1 (they are refused below).
@functools.lru_cache(maxsize=256, typed=True)
def compute_geometry(h: int, w: int, patch_size: int = 14, pad_multiple: Optional[int] = None
                     ) -> AdapterGeometry:
    """Geometry for an ``h x w`` input padded to a multiple of ``pad_multiple`` (default: the
    patch size; it must be a multiple of it); raises ``InputError`` (a ``ValueError``) if any
    output would be empty."""
    m = patch_size if pad_multiple is None else pad_multiple
    for name, v in (("height", h), ("width", w), ("patch_size", patch_size), ("pad_multiple", m)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise InputError(f"{name} must be a positive int, got {v!r}")
    h, w, p, m = int(h), int(w), int(patch_size), int(m)
    if m % p:
        raise InputError(f"pad_multiple {m} is not a multiple of the patch size {p}")
    hp, wp = -(-h // m) * m, -(-w // m) * m
    c1 = (ceil_half(ceil_half(hp)), ceil_half(ceil_half(wp)))
    c2 = (ceil_half(c1[0]), ceil_half(c1[1]))
    c3 = (ceil_half(c2[0]), ceil_half(c2[1]))
    c4 = (ceil_half(c3[0]), ceil_half(c3[1]))
    spm = (c1, c2, c3, c4)
    if (hp, wp) != (h, w):
        outputs = tuple((h // s, w // s) for s in (4, 8, 16, 32))
        vit_out = (h // p, w // p)
    else:
        outputs = spm
        vit_out = (hp // p, wp // p)
    empty = [f"f{i + 1}" for i, o in enumerate(outputs) if min(o) == 0]
    if min(vit_out) == 0:
        empty.append("vit")
    if empty:
        hint = f"the patch size {p}" if m == p else str(m)
        raise InputError(
            f"input size {h}x{w} is too small: outputs {', '.join(empty)} would be empty "
            f"after cropping (sizes {list(outputs)}, vit {vit_out}); use at least 32x32 or a "
            f"multiple of {hint}"
        )
    return AdapterGeometry(
        image_size=(h, w),
        patch_size=p,
        padded=(hp, wp),
        vit_grid=(hp // p, wp // p),
        spm_shapes=spm,
        output_sizes=outputs,
        vit_output_size=vit_out,
        pad_multiple=0 if m == p else m,
    )


# The DINOv3 adapter's policy: patch 16, inputs padded to a multiple of 32.
DINOV3_PATCH_SIZE = 16
DINOV3_PAD_MULTIPLE = 32


def dinov3_geometry(h: int, w: int) -> AdapterGeometry:
    """Geometry of the DINOv3 adapter for an ``h x w`` input.

    The upstream module runs only when 32 divides both sides (SPEC_DINOV3 section 4); other
    sizes are defined as upstream's result on the image zero-padded (bottom, right) to the next
    multiple of 32, with ``f1..f4`` cropped to ``h//4 .. h//32`` and the ViT map to ``h//16``.
    On the padded canvas ``c_k = (Hp, Wp) / 2^(k+1)`` exactly and the ViT grid is c3.
    """
    return compute_geometry(h, w, DINOV3_PATCH_SIZE, DINOV3_PAD_MULTIPLE)
