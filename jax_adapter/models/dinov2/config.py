"""Configs of the DINOv2 family: the trunk and the seed's ViT-Adapter around it.

Field names are the PyTorch constructors' keyword arguments (the DINOv2 hub trunk; the seed
``DinoAdapter``), so a PyTorch JSON config loads as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Optional, Tuple

from jax_adapter.errors import ConfigError
from jax_adapter.models.base import COMPUTE_DTYPES, PARAM_DTYPES, ConfigMethods, check_choice
from jax_adapter.nn.msda import IMPLS as MSDA_IMPLS
from jax_adapter.nn.resize import POS_RESIZE_MODES

FFN_LAYERS = ("mlp", "swiglu")


def ffn_hidden(embed_dim: int, mlp_ratio: float, ffn_layer: str) -> int:
    """The FFN's hidden width: ``int(D * mlp_ratio)``; DINOv2's SwiGLUFFNFused takes 2/3 of it,
    rounded up to a multiple of 8."""
    hidden = int(embed_dim * mlp_ratio)
    if ffn_layer == "swiglu":
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    return hidden


@dataclasses.dataclass(frozen=True)
class DinoV2Config(ConfigMethods):
    """The DINOv2 ViT trunk (patch 14, cls token, optional register tokens)."""

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    patch_size: int = 14
    pretrain_size: int = 518
    num_register_tokens: int = 0
    ffn_layer: str = "mlp"
    layer_scale_init: float = 1.0
    pos_embed_resize: str = "bicubic_scale_offset"
    drop_path_rate: float = 0.0
    # Compute dtype of matmuls and convolutions, and storage dtype of the parameters.
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        check_choice("ffn_layer", self.ffn_layer, FFN_LAYERS)
        check_choice("pos_embed_resize", self.pos_embed_resize, POS_RESIZE_MODES)
        check_choice("dtype", self.dtype, COMPUTE_DTYPES)
        check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pretrain_size % self.patch_size:
            raise ConfigError(f"pretrain_size {self.pretrain_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def pretrain_grid(self) -> int:
        """Side of the position table's grid (the pretraining resolution in patches)."""
        return self.pretrain_size // self.patch_size

    @property
    def ffn_hidden(self) -> int:
        """The FFN's hidden width (:func:`ffn_hidden`)."""
        return ffn_hidden(self.embed_dim, self.mlp_ratio, self.ffn_layer)

    @property
    def num_prefix_tokens(self) -> int:
        """cls + register tokens."""
        return 1 + self.num_register_tokens


@dataclasses.dataclass(frozen=True)
class DinoV2AdapterConfig(ConfigMethods):
    """The seed's ViT-Adapter around a DINOv2 trunk (``DinoAdapter`` in PyTorch).

    The trunk's fields sit beside the adapter's, as in the PyTorch constructor.
    ``interaction_indexes``: ``(first, last)`` trunk blocks of each interaction (the DINOv3
    adapter's field of that name lists tapped blocks; :attr:`tapped_blocks` means the same in
    both).
    """

    num_heads: int = 6
    embed_dim: int = 384
    depth: int = 12
    pretrain_size: int = 518
    patch_size: int = 14
    mlp_ratio: float = 4.0
    conv_inplane: int = 64
    n_points: int = 4
    deform_num_heads: int = 6
    init_values: float = 0.0
    interaction_indexes: Tuple[Tuple[int, int], ...] = ((0, 2), (3, 5), (6, 8), (9, 11))
    with_cffn: bool = True
    cffn_ratio: float = 0.25
    deform_ratio: float = 1.0
    add_vit_feature: bool = False
    use_extra_extractor: bool = True
    with_cp: bool = False
    drop_path_rate: float = 0.0
    # Trunk details fixed by the DINOv2 checkpoint.
    num_register_tokens: int = 0
    ffn_layer: str = "mlp"
    layer_scale_init: float = 1.0
    pos_embed_resize: str = "bicubic_size"
    # JAX-side: which sampling-core implementation MSDeformAttn uses ("auto", "xla", "pallas").
    msda_impl: str = "auto"
    # JAX-side: compute dtype (e.g. "bfloat16": matmuls and convolutions in bfloat16, while
    # softmax, LayerNorm and BatchNorm statistics and the sampling core accumulate in float32)
    # and parameter storage dtype.
    dtype: str = "float32"
    param_dtype: str = "float32"
    # JAX-side: compute dtype of the trunk's blocks (None: ``dtype``).
    trunk_dtype: Optional[str] = None

    # The trunk trains unless a training run freezes it (``trainable_filter(freeze_trunk=True)``).
    frozen_trunk: ClassVar[bool] = False

    def __post_init__(self):
        idx = tuple(tuple(int(i) for i in pair) for pair in self.interaction_indexes)
        object.__setattr__(self, "interaction_indexes", idx)
        if any(len(p) != 2 or p[0] > p[1] for p in idx):
            raise ConfigError(f"interaction_indexes must be (first, last) pairs, got {idx}")
        flat = [i for a, b in idx for i in range(a, b + 1)]
        if flat != list(range(len(flat))) or len(flat) > self.depth:
            raise ConfigError(
                f"interaction_indexes {idx} must cover ViT blocks 0..n-1 in order (depth {self.depth})"
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        dv = int(self.embed_dim * self.deform_ratio)
        if dv % self.deform_num_heads:
            raise ConfigError(
                f"embed_dim*deform_ratio = {dv} is not divisible by deform_num_heads {self.deform_num_heads}"
            )
        check_choice("ffn_layer", self.ffn_layer, FFN_LAYERS)
        check_choice("pos_embed_resize", self.pos_embed_resize, POS_RESIZE_MODES)
        check_choice("msda_impl", self.msda_impl, MSDA_IMPLS)
        check_choice("dtype", self.dtype, COMPUTE_DTYPES)
        check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)
        if self.trunk_dtype is not None:
            check_choice("trunk_dtype", self.trunk_dtype, COMPUTE_DTYPES)

    @property
    def tapped_blocks(self) -> Tuple[int, ...]:
        """The trunk blocks whose outputs feed the extractors: the last of each interaction."""
        return tuple(last for _, last in self.interaction_indexes)

    def trunk_config(self) -> DinoV2Config:
        return DinoV2Config(
            embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio, patch_size=self.patch_size, pretrain_size=self.pretrain_size,
            num_register_tokens=self.num_register_tokens, ffn_layer=self.ffn_layer,
            layer_scale_init=self.layer_scale_init, pos_embed_resize=self.pos_embed_resize,
            drop_path_rate=self.drop_path_rate, dtype=self.trunk_dtype or self.dtype,
            param_dtype=self.param_dtype,
        )

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["interaction_indexes"] = [list(p) for p in self.interaction_indexes]
        return d


def adapter_around(trunk: DinoV2Config, **fields: Any) -> DinoV2AdapterConfig:
    """A DINOv2 adapter config holding ``trunk``'s fields (and the adapter's ``fields``)."""
    shared = {f.name for f in dataclasses.fields(DinoV2AdapterConfig)}
    t = {k: v for k, v in trunk.to_dict().items() if k in shared and k != "pos_embed_resize"}
    return DinoV2AdapterConfig(**{**t, **fields})
