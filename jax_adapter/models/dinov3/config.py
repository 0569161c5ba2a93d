"""Configs of the DINOv3 family: the trunk (Meta's ``DinoVisionTransformer``) and Meta's
``DINOv3_Adapter`` around it.

Field names are the PyTorch constructors' keyword arguments, so upstream's JSON loads as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Optional, Tuple

import numpy as np

from jax_adapter.errors import ConfigError
from jax_adapter.models.base import COMPUTE_DTYPES, PARAM_DTYPES, ConfigMethods, check_choice, fields_to_config
from jax_adapter.nn.geometry import DINOV3_PATCH_SIZE
from jax_adapter.nn.msda import IMPLS as MSDA_IMPLS
from jax_adapter.nn.rope import NORMALIZE_COORDS, rope_periods

# ffn_layer -> SwiGLU hidden-width alignment (None: the GELU MLP).
FFN_LAYERS: Dict[str, Optional[int]] = {
    "mlp": None, "swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128,
}
# norm_layer -> LayerNorm epsilon ("layernormbf16" is a plain float LayerNorm despite its name).
NORM_LAYERS: Dict[str, float] = {"layernorm": 1e-6, "layernormbf16": 1e-5}
ROPE_DTYPES = ("fp32",)


def ffn_hidden(embed_dim: int, ffn_ratio: float, ffn_layer: str) -> int:
    """The FFN's hidden width: ``int(D * ffn_ratio)``; for SwiGLU 2/3 of it rounded up to the
    alignment (8, 32, 64 or 128) of ``ffn_layer``."""
    hidden = int(embed_dim * ffn_ratio)
    align = FFN_LAYERS[ffn_layer]
    if align is not None:
        d = int(hidden * 2 / 3)
        hidden = d + (-d % align)
    return hidden


@dataclasses.dataclass(frozen=True)
class DinoV3Config(ConfigMethods):
    """The DINOv3 trunk. Field names are Meta's ``DinoVisionTransformer`` keyword arguments.

    The defaults are the hub's ``dinov3_vits16`` (not the constructor's own defaults, which give
    no storage tokens, eps 1e-6 and bfloat16 RoPE): a dict of constructor arguments should list
    every argument that differs from the hub model. ``dtype``, ``param_dtype`` and
    ``rope_augment`` are this library's: the training-time RoPE coordinate noise
    (``pos_embed_rope_{shift,jitter,rescale}_coords``) is applied only when ``rope_augment`` is
    true *and* the module is in train mode; otherwise RoPE is deterministic.
    """

    # The patch embedding and the width.
    img_size: int = 224  # unused: there is no position table to size
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384
    # The blocks.
    depth: int = 12
    num_heads: int = 6
    ffn_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    layerscale_init: Optional[float] = 1e-5
    norm_layer: str = "layernormbf16"
    ffn_layer: str = "mlp"
    ffn_bias: bool = True
    proj_bias: bool = True
    n_storage_tokens: int = 4
    mask_k_bias: bool = True
    untie_cls_and_patch_norms: bool = False
    untie_global_and_local_cls_norm: bool = False
    pos_embed_rope_base: Optional[float] = 100.0
    pos_embed_rope_min_period: Optional[float] = None
    pos_embed_rope_max_period: Optional[float] = None
    pos_embed_rope_normalize_coords: str = "separate"
    pos_embed_rope_shift_coords: Optional[float] = None
    pos_embed_rope_jitter_coords: Optional[float] = None
    pos_embed_rope_rescale_coords: Optional[float] = 2.0
    pos_embed_rope_dtype: str = "fp32"
    # This library's fields.
    rope_augment: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        check_choice("ffn_layer", self.ffn_layer, tuple(FFN_LAYERS))
        check_choice("norm_layer", self.norm_layer, tuple(NORM_LAYERS))
        check_choice("pos_embed_rope_normalize_coords", self.pos_embed_rope_normalize_coords, NORMALIZE_COORDS)
        check_choice("pos_embed_rope_dtype", self.pos_embed_rope_dtype, ROPE_DTYPES)
        check_choice("dtype", self.dtype, COMPUTE_DTYPES)
        check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)
        if self.in_chans != 3:
            raise ConfigError(f"in_chans must be 3 (RGB), got {self.in_chans}")
        for name in ("patch_size", "embed_dim", "depth", "num_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_storage_tokens < 0:
            raise ConfigError(f"n_storage_tokens must be >= 0, got {self.n_storage_tokens}")
        if self.embed_dim % (4 * self.num_heads):
            raise ConfigError(f"embed_dim {self.embed_dim} is not a multiple of 4 * num_heads "
                              f"({4 * self.num_heads}), which axial RoPE needs")
        if self.ffn_ratio <= 0:
            raise ConfigError(f"ffn_ratio must be positive, got {self.ffn_ratio}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        try:
            self.rope_periods()
        except ValueError as e:
            raise ConfigError(f"pos_embed_rope_base / pos_embed_rope_min_period / pos_embed_rope_max_period: {e}") from None
        for name in ("pos_embed_rope_jitter_coords", "pos_embed_rope_rescale_coords"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1 (a log-uniform factor range), got {v}")
        if self.pos_embed_rope_shift_coords is not None and self.pos_embed_rope_shift_coords < 0:
            raise ConfigError(f"pos_embed_rope_shift_coords must be >= 0, got {self.pos_embed_rope_shift_coords}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def norm_eps(self) -> float:
        """LayerNorm's epsilon (``norm_layer`` says which)."""
        return NORM_LAYERS[self.norm_layer]

    @property
    def num_prefix_tokens(self) -> int:
        """cls + storage tokens."""
        return 1 + self.n_storage_tokens

    @property
    def ffn_hidden(self) -> int:
        return ffn_hidden(self.embed_dim, self.ffn_ratio, self.ffn_layer)

    def rope_periods(self) -> np.ndarray:
        """The ``[head_dim // 4]`` float32 periods (upstream's buffer ``rope_embed.periods``)."""
        return rope_periods(self.head_dim, base=self.pos_embed_rope_base,
                            min_period=self.pos_embed_rope_min_period,
                            max_period=self.pos_embed_rope_max_period)

    def grid(self, h: int, w: int) -> Tuple[int, int]:
        """Patch grid of an ``h x w`` image: ``(h // patch, w // patch)``."""
        return h // self.patch_size, w // self.patch_size


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
class DinoV3AdapterConfig(ConfigMethods):
    """``DINOv3_Adapter`` configuration.

    The first fields are the PyTorch constructor's keyword arguments with upstream's defaults
    (``pretrain_size`` and ``init_values`` are unused upstream too, kept so that its JSON
    loads); ``backbone`` is the trunk's config (a dict of ``DinoVisionTransformer`` keyword
    arguments is accepted). The trunk's compute and parameter dtypes are set by
    ``trunk_dtype`` and ``param_dtype`` here, whatever ``backbone`` says.
    """

    # The tapped trunk blocks and the SPM.
    interaction_indexes: Tuple[int, ...] = (9, 19, 29, 39)
    pretrain_size: int = 512
    conv_inplane: int = 64
    # The extractors' deformable attention and ConvFFN.
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
        check_choice("msda_impl", self.msda_impl, MSDA_IMPLS)
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

    @property
    def tapped_blocks(self) -> Tuple[int, ...]:
        """The trunk blocks the extractors read (as :attr:`DinoV2AdapterConfig.tapped_blocks`)."""
        return self.interaction_indexes

    def trunk_config(self) -> DinoV3Config:
        return self.backbone

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["interaction_indexes"] = list(self.interaction_indexes)
        bb = self.backbone
        d["backbone"] = bb.to_dict() if hasattr(bb, "to_dict") else dataclasses.asdict(bb)
        return d

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
        return fields_to_config(cls, d)
