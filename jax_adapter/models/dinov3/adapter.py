"""``DinoV3Adapter``: Meta's ``DINOv3_Adapter`` (the DINOv3 segmentation backbone) in NNX.

Unlike the DINOv2 ViT-Adapter there is no injector: a frozen DINOv3 trunk runs once per call,
four of its blocks are tapped (final norm applied) and only extractors (MSDA from the ViT grid
into the SPM tokens) refine the SPM features. ``model(images [B, H, W, 3])`` ->
``AdapterOutput(features=(f1, f2, f3, f4), vit=map)``, all NHWC.

Input sizes: upstream runs only when 32 divides both sides; there the outputs are upstream's.
Any other size is defined as upstream's result on the image zero-padded (bottom, right) to the
next multiple of 32, with ``f1..f4`` cropped to ``h//4, h//8, h//16, h//32`` and the ViT map to
``h//16, w//16``. Padding changes the RoPE coordinates of the real patches (they are normalised
by the padded grid), so a padded result is not upstream's on a resized image. Every split,
view and reference point comes from :func:`jax_adapter.nn.geometry.dinov3_geometry`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_adapter.models.base import AdapterOutput
from jax_adapter.models.dinov3.config import DinoV3AdapterConfig
from jax_adapter.models.dinov3.trunk import DinoV3
from jax_adapter.nn.geometry import AdapterGeometry, dinov3_geometry
from jax_adapter.nn.images import check_images
from jax_adapter.nn.interaction import Extractor, run
from jax_adapter.nn.neck import AdapterNeck, pad_input


class ExtractorBlock(nnx.Module):
    """One DINOv3 interaction: an extractor (and, on the last one, two extra extractors); no
    injector. ``c [B, c2+c3+c4, D]``, ``x [B, Hv*Wv, D]`` -> ``[B, c2+c3+c4, D]``."""

    def __init__(self, cfg: DinoV3AdapterConfig, extra_extractors: bool, *, rngs: nnx.Rngs):
        self.with_cp = cfg.with_cp
        self.extractor = Extractor(cfg, rngs=rngs)
        self.extra_extractors = (
            nnx.List([Extractor(cfg, rngs=rngs) for _ in range(2)]) if extra_extractors else None
        )

    def __call__(self, c: jax.Array, x: jax.Array, geom: AdapterGeometry) -> jax.Array:
        c = run(self.extractor, c, x, remat=self.with_cp, geom=geom)
        if self.extra_extractors is not None:
            for ext in self.extra_extractors:
                c = run(ext, c, x, remat=self.with_cp, geom=geom)
        return c


def _stop(tree: Any) -> Any:
    return jax.tree.map(
        lambda a: jax.lax.stop_gradient(a) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a,
        tree,
    )


class DinoV3Adapter(AdapterNeck):
    """``DINOv3_Adapter`` around a frozen :class:`DinoV3` trunk (``self.backbone``).

    Constructed in eval mode; ``.train()`` puts the adapter (BatchNorm batch statistics, drop
    path) in training mode but leaves the trunk in eval mode (deterministic RoPE), as upstream.
    """

    TRUNK_CLASS: ClassVar[type] = DinoV3
    TRUNK_PATH: ClassVar[Tuple[str, ...]] = ("backbone",)

    def __init__(self, cfg: DinoV3AdapterConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.backbone = DinoV3(cfg.trunk_config(), rngs=rngs)
        self.init_neck(cfg, ExtractorBlock, rngs=rngs)
        self.backbone.eval()

    @property
    def frozen_submodules(self) -> Tuple[str, ...]:
        """Submodules that never train (the config says whether the trunk does): training leaves
        them out of the optimised parameters."""
        return self.TRUNK_PATH if self.cfg.frozen_trunk else ()

    def train(self, **attributes):
        """Training mode for the adapter; the trunk stays in eval mode."""
        out = super().train(**attributes)
        self.backbone.eval()
        return out

    def geometry(self, height: int, width: int) -> AdapterGeometry:
        """The static geometry for ``height x width`` inputs (``InputError`` if too small)."""
        return dinov3_geometry(height, width)

    def trunk_features(self, images: jax.Array, geom: AdapterGeometry) -> Sequence[jax.Array]:
        """The four tapped, final-normed patch maps ``[B, Hv, Wv, D]`` of the padded images,
        in the adapter's compute dtype, as constants of differentiation.

        The trunk's parameters and input are stopped too, so that no tangent enters the trunk
        and a backward pass keeps none of its activations.
        """
        graph, state = nnx.split(self.backbone)
        trunk = nnx.merge(graph, _stop(state))
        # A parent's ``.train()`` reaches the trunk's modules too (set_attributes recurses):
        # this copy runs in eval mode whatever they say (deterministic RoPE, no drop path).
        trunk.eval()
        x = jax.lax.stop_gradient(pad_input(images, geom, self.cfg.trunk_dtype))
        layers = trunk.intermediates(x, list(self.cfg.interaction_indexes), norm=True)
        maps = []
        for patches, _cls in layers:
            # The geometry is the contract; a mismatch is a bug, not an input error.
            assert patches.shape[1:3] == geom.vit_grid, (patches.shape, geom.vit_grid)
            maps.append(jax.lax.stop_gradient(patches).astype(self.cfg.dtype))
        return maps

    def __call__(self, images: jax.Array) -> AdapterOutput:
        """``images [B, H, W, 3]`` (normalised) -> ``f1..f4 [B, h//4 .. h//32, D]`` and the last
        tapped ViT map ``[B, h//16, w//16, D]`` (sides that are multiples of 32: no cropping)."""
        check_images(images)
        b, h, w, _ = images.shape
        geom = self.geometry(h, w)
        cfg = self.cfg
        s1, c = self.neck_in(pad_input(images, geom, cfg.dtype), geom)
        outs = self.trunk_features(images, geom)
        for layer, vit in zip(self.interactions, outs):
            c = layer(c, vit.reshape(b, geom.num_vit_tokens, cfg.embed_dim), geom)
        # On the canvas (multiples of 32) every halving is exact: neck_out resizes nothing.
        return self.neck_out(s1, c, outs, geom, add_vit_feature=cfg.add_vit_feature)
