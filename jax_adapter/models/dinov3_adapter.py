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

import dataclasses
import json
from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_adapter.errors import ConfigError
from jax_adapter.models.common import (
    AdapterOutput, COMPUTE_DTYPES, PARAM_DTYPES, check_choice, config_from_dict, named_preset,
)
from jax_adapter.models.dinov3 import DinoV3, DinoV3Config
from jax_adapter.nn.geometry import DINOV3_PATCH_SIZE, AdapterGeometry, dinov3_geometry
from jax_adapter.nn.images import check_images, pad_bottom_right
from jax_adapter.nn.interaction import Extractor, run
from jax_adapter.nn.layers import BatchNorm2d, ConvTranspose2x2
from jax_adapter.nn.resize import resize_nhwc
from jax_adapter.nn.spm import SpatialPriorModule

# The interaction (tapped block) indexes of the hub trunks (FOUR_EVEN_INTERVALS: ``i*(depth//4)-1``,
# except depth 24, which uses the paper's [4, 11, 17, 23]).
INTERACTION_INDEXES: Dict[int, Tuple[int, int, int, int]] = {
    12: (2, 5, 8, 11),
    24: (4, 11, 17, 23),
    32: (7, 15, 23, 31),
    40: (9, 19, 29, 39),
}


def default_interaction_indexes(depth: int) -> Tuple[int, int, int, int]:
    """Upstream's four tapped blocks for a trunk of ``depth`` blocks."""
    if depth in INTERACTION_INDEXES:
        return INTERACTION_INDEXES[depth]
    if depth < 4:
        raise ConfigError(f"a DINOv3 adapter needs a trunk of at least 4 blocks, got depth {depth}")
    step = depth // 4
    return tuple(i * step - 1 for i in range(1, 5))


def _backbone_config(backbone: Any) -> DinoV3Config:
    if isinstance(backbone, DinoV3Config):
        return backbone
    if isinstance(backbone, dict):
        return DinoV3Config.from_dict(dict(backbone))
    if backbone is None:
        raise ConfigError("a DINOv3 adapter config needs 'backbone': the trunk's DinoVisionTransformer "
                          "keyword arguments (or a DinoV3Config)")
    raise ConfigError(f"backbone must be a DinoV3Config or a dict of its fields, got {type(backbone).__name__}")


@dataclasses.dataclass(frozen=True)
class DinoV3AdapterConfig:
    """``DINOv3_Adapter`` configuration.

    The first fields are the PyTorch constructor's keyword arguments with upstream's defaults
    (``pretrain_size`` and ``init_values`` are unused upstream too, kept so that its JSON
    loads); ``backbone`` is the trunk's config (a dict of ``DinoVisionTransformer`` keyword
    arguments is accepted). The trunk's compute and parameter dtypes are set by
    ``trunk_dtype`` and ``param_dtype`` here, whatever ``backbone`` says.
    """

    interaction_indexes: Tuple[int, ...] = (9, 19, 29, 39)
    pretrain_size: int = 512
    conv_inplane: int = 64
    n_points: int = 4
    deform_num_heads: int = 16
    drop_path_rate: float = 0.3
    init_values: float = 0.0
    with_cffn: bool = True
    cffn_ratio: float = 0.25
    deform_ratio: float = 0.5
    add_vit_feature: bool = True
    use_extra_extractor: bool = True
    with_cp: bool = True
    backbone: Optional[DinoV3Config] = None
    # JAX-side: sampling-core implementation of MSDeformAttn ("auto", "xla", "pallas").
    msda_impl: str = "auto"
    # JAX-side: the adapter's compute dtype and the parameter storage dtype (trunk included).
    dtype: str = "float32"
    param_dtype: str = "float32"
    # JAX-side: compute dtype of the frozen trunk. Upstream runs it under
    # ``torch.autocast("cuda", bfloat16)`` (bf16 matmuls, fp32 LayerNorm and RoPE) even in a
    # float32 configuration; on CPU that autocast is a no-op, so the reference numbers (and the
    # parity tests) are float32. Set "bfloat16" to match upstream on GPU.
    trunk_dtype: str = "float32"

    # The trunk never trains (upstream: ``requires_grad_(False)`` + ``no_grad``).
    frozen_trunk: ClassVar[bool] = True

    def __post_init__(self):
        check_choice("msda_impl", self.msda_impl, ("auto", "xla", "pallas"))
        check_choice("dtype", self.dtype, COMPUTE_DTYPES)
        check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)
        check_choice("trunk_dtype", self.trunk_dtype, COMPUTE_DTYPES)
        bb = _backbone_config(self.backbone)
        bb = dataclasses.replace(bb, dtype=self.trunk_dtype, param_dtype=self.param_dtype)
        object.__setattr__(self, "backbone", bb)
        if bb.patch_size != DINOV3_PATCH_SIZE:
            raise ConfigError(f"the DINOv3 adapter needs a patch-{DINOV3_PATCH_SIZE} trunk, got "
                              f"patch_size {bb.patch_size}")
        raw = self.interaction_indexes
        if not isinstance(raw, (list, tuple)) or any(
                isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in raw):
            raise ConfigError(f"interaction_indexes must be a list of 4 block indexes (ints), got {raw!r}")
        idx = tuple(int(i) for i in raw)
        object.__setattr__(self, "interaction_indexes", idx)
        if len(idx) != 4:
            # Upstream unpacks exactly four maps (x1..x4) for add_vit_feature.
            raise ConfigError(f"interaction_indexes must be exactly 4 block indexes, got {list(idx)}")
        if list(idx) != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= bb.depth:
            # The trunk returns the tapped blocks in block order: unsorted indexes would
            # silently reorder the features.
            raise ConfigError(f"interaction_indexes {list(idx)} must be sorted, unique and in "
                              f"[0, depth={bb.depth})")
        dv = int(self.embed_dim * self.deform_ratio)
        if dv <= 0 or dv % self.deform_num_heads:
            raise ConfigError(f"embed_dim*deform_ratio = {dv} is not divisible by deform_num_heads "
                              f"{self.deform_num_heads}")
        if self.conv_inplane < 1 or self.n_points < 1:
            raise ConfigError("conv_inplane and n_points must be >= 1")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    # Fields the shared interaction parts read (InteractionConfig), from the trunk.
    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def depth(self) -> int:
        return self.backbone.depth

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    def trunk_config(self) -> DinoV3Config:
        return self.backbone

    def replace(self, **changes) -> "DinoV3AdapterConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["interaction_indexes"] = list(self.interaction_indexes)
        bb = self.backbone
        d["backbone"] = bb.to_dict() if hasattr(bb, "to_dict") else dataclasses.asdict(bb)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DinoV3AdapterConfig":
        """From the PyTorch keyword arguments plus ``"backbone": {...}`` (or our own fields)."""
        d = dict(d)
        bb = d.get("backbone")
        if isinstance(bb, dict):
            for key, field in (("dtype", "trunk_dtype"), ("param_dtype", "param_dtype")):
                want = d.get(field, "float32")
                if key in bb and bb[key] != want:
                    raise ConfigError(f"backbone {key} {bb[key]!r} differs from the adapter's "
                                      f"{field} {want!r} (the adapter's field sets the trunk's)")
            d["backbone"] = DinoV3Config.from_dict(bb)
        return config_from_dict(cls, d)

    @classmethod
    def preset(cls, name: str) -> "DinoV3AdapterConfig":
        """``dinov3_vit{s16,s16plus,b16,l16,l16plus,h16plus,7b16}_adapter`` or ``dinov3_tiny_adapter``."""
        return named_preset(cls, name, trunk=False)


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


class DinoV3Adapter(nnx.Module):
    """``DINOv3_Adapter`` around a frozen :class:`DinoV3` trunk (``self.backbone``).

    Constructed in eval mode; ``.train()`` puts the adapter (BatchNorm batch statistics, drop
    path) in training mode but leaves the trunk in eval mode (deterministic RoPE), as upstream.
    """

    # Submodules that never train: training leaves them out of the optimised parameters.
    FROZEN_SUBMODULES: ClassVar[Tuple[str, ...]] = ("backbone",)

    def __init__(self, cfg: DinoV3AdapterConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.embed_dim
        pd = jnp.dtype(cfg.param_dtype)
        self.backbone = DinoV3(cfg.trunk_config(), rngs=rngs)
        self.level_embed = nnx.Param(jax.random.normal(rngs.params(), (3, d)).astype(pd))
        self.spm = SpatialPriorModule(cfg.conv_inplane, d, dtype=cfg.dtype, param_dtype=pd, rngs=rngs)
        n = len(cfg.interaction_indexes)
        self.interactions = nnx.List([
            ExtractorBlock(cfg, extra_extractors=cfg.use_extra_extractor and i == n - 1, rngs=rngs)
            for i in range(n)
        ])
        self.up = ConvTranspose2x2(d, d, param_dtype=pd, rngs=rngs)
        self.norm1 = BatchNorm2d(d, param_dtype=pd)
        self.norm2 = BatchNorm2d(d, param_dtype=pd)
        self.norm3 = BatchNorm2d(d, param_dtype=pd)
        self.norm4 = BatchNorm2d(d, param_dtype=pd)
        self.backbone.eval()

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
        x = jax.lax.stop_gradient(pad_bottom_right(images.astype(self.cfg.trunk_dtype), geom.padded))
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
        d = cfg.embed_dim
        x = pad_bottom_right(images.astype(cfg.dtype), geom.padded)

        c1, c2, c3, c4 = self.spm(x, geom)
        level_embed = self.level_embed[...].astype(c2.dtype)
        c = jnp.concatenate([c2 + level_embed[0], c3 + level_embed[1], c4 + level_embed[2]], axis=1)

        outs = self.trunk_features(images, geom)
        for layer, vit in zip(self.interactions, outs):
            c = layer(c, vit.reshape(b, geom.num_vit_tokens, d), geom)

        c2, c3, c4 = (
            c[:, start:start + n].reshape(b, hh, ww, d)
            for (hh, ww), start, n in zip(geom.level_shapes, geom.level_starts, geom.level_lengths)
        )
        up = self.up(c2)
        assert up.shape[1:3] == c1.shape[1:3], (up.shape, c1.shape)  # exact halvings on the canvas
        maps = [c1 + up, c2, c3, c4]
        if cfg.add_vit_feature:
            # Size-based bilinear (align_corners=False, no antialias): x4 up, x2 up, identity,
            # x0.5 down, as upstream's F.interpolate(size=...).
            maps = [m + resize_nhwc(o, m.shape[1:3], "bilinear") for m, o in zip(maps, outs)]
        norms = (self.norm1, self.norm2, self.norm3, self.norm4)
        feats = [norm(m) for norm, m in zip(norms, maps)]
        vit = outs[-1]
        if geom.needs_crop:
            feats = [f[:, :oh, :ow] for f, (oh, ow) in zip(feats, geom.output_sizes)]
            vit = vit[:, :geom.vit_output_size[0], :geom.vit_output_size[1]]
        return AdapterOutput(features=tuple(feats), vit=vit)
