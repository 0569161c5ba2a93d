"""Configurations and named presets.

``AdapterConfig``'s fields are the PyTorch DinoAdapter keyword arguments, so that
``AdapterConfig(**json.load(open("seed_adapter_tiny.json")))`` works, plus the trunk details a
DINOv2 checkpoint fixes (registers, SwiGLU, position-embedding resize mode) and JAX-side switches.
``DinoV2Config`` describes the trunk alone.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Sequence, Tuple

# How the pretraining position grid is resized to the token grid (SPEC section 6).
POS_RESIZE_MODES = (
    "bicubic_size",  # size-based bicubic, no antialias: the DinoAdapter, Hugging Face Dinov2Model
    "bicubic_scale_offset",  # scale factor (grid + offset) / M, no antialias: hub models without registers
    "bicubic_size_antialias",  # size-based bicubic with antialias: hub and HF register models
)
FFN_LAYERS = ("mlp", "swiglu")
# Compute dtypes and parameter dtypes (names, so that configs stay JSON).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16")

# embed_dim, depth, num_heads, ffn_layer of the four DINOv2 variants.
VARIANTS: Dict[str, Tuple[int, int, int, str]] = {
    "s": (384, 12, 6, "mlp"),
    "b": (768, 12, 12, "mlp"),
    "l": (1024, 24, 16, "mlp"),
    "g": (1536, 40, 24, "swiglu"),
}


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DinoV2Config:
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
        _check_choice("ffn_layer", self.ffn_layer, FFN_LAYERS)
        _check_choice("pos_embed_resize", self.pos_embed_resize, POS_RESIZE_MODES)
        _check_choice("dtype", self.dtype, COMPUTE_DTYPES)
        _check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pretrain_size % self.patch_size:
            raise ValueError(f"pretrain_size {self.pretrain_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def pretrain_grid(self) -> int:
        return self.pretrain_size // self.patch_size

    @property
    def ffn_hidden(self) -> int:
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.ffn_layer == "swiglu":
            # DINOv2's SwiGLUFFNFused: 2/3 of the MLP width, rounded up to a multiple of 8.
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DinoV2Config":
        return _from_dict(cls, d)

    @classmethod
    def preset(cls, name: str) -> "DinoV2Config":
        return _parse_preset(name)[0]


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """DinoAdapter configuration; field names are the PyTorch constructor's keyword arguments."""

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

    def __post_init__(self):
        idx = tuple(tuple(int(i) for i in pair) for pair in self.interaction_indexes)
        object.__setattr__(self, "interaction_indexes", idx)
        if any(len(p) != 2 or p[0] > p[1] for p in idx):
            raise ValueError(f"interaction_indexes must be (first, last) pairs, got {idx}")
        flat = [i for a, b in idx for i in range(a, b + 1)]
        if flat != list(range(len(flat))) or len(flat) > self.depth:
            raise ValueError(
                f"interaction_indexes {idx} must cover ViT blocks 0..n-1 in order (depth {self.depth})"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        dv = int(self.embed_dim * self.deform_ratio)
        if dv % self.deform_num_heads:
            raise ValueError(
                f"embed_dim*deform_ratio = {dv} is not divisible by deform_num_heads {self.deform_num_heads}"
            )
        _check_choice("ffn_layer", self.ffn_layer, FFN_LAYERS)
        _check_choice("pos_embed_resize", self.pos_embed_resize, POS_RESIZE_MODES)
        _check_choice("msda_impl", self.msda_impl, ("auto", "xla", "pallas"))
        _check_choice("dtype", self.dtype, COMPUTE_DTYPES)
        _check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)

    def trunk_config(self) -> DinoV2Config:
        return DinoV2Config(
            embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio, patch_size=self.patch_size, pretrain_size=self.pretrain_size,
            num_register_tokens=self.num_register_tokens, ffn_layer=self.ffn_layer,
            layer_scale_init=self.layer_scale_init, pos_embed_resize=self.pos_embed_resize,
            drop_path_rate=self.drop_path_rate, dtype=self.dtype, param_dtype=self.param_dtype,
        )

    def replace(self, **changes) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["interaction_indexes"] = [list(p) for p in self.interaction_indexes]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "AdapterConfig":
        return _from_dict(cls, d)

    @classmethod
    def preset(cls, name: str) -> "AdapterConfig":
        """``dinov2_vit{s,b,l,g}14`` with an optional ``_reg`` suffix, or ``tiny`` (tests)."""
        return _parse_preset(name)[1]


def _from_dict(cls, d: Dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    return cls(**d)


def _interaction_indexes(depth: int) -> Tuple[Tuple[int, int], ...]:
    step = depth // 4
    return tuple((i * step, (i + 1) * step - 1) for i in range(4))


def _parse_preset(name: str) -> Tuple[DinoV2Config, AdapterConfig]:
    if name == "tiny":
        # A small adapter (the shape of the test fixture) for smoke runs.
        adapter = AdapterConfig(
            num_heads=3, embed_dim=96, depth=4, conv_inplane=16,
            interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3)),
        )
        return adapter.trunk_config(), adapter
    base = name[: -len("_reg")] if name.endswith("_reg") else name
    variant = base[len("dinov2_vit"):-len("14")] if base.startswith("dinov2_vit") and base.endswith("14") else ""
    if variant not in VARIANTS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    dim, depth, heads, ffn = VARIANTS[variant]
    regs = 4 if name.endswith("_reg") else 0
    trunk = DinoV2Config(
        embed_dim=dim, depth=depth, num_heads=heads, ffn_layer=ffn, num_register_tokens=regs,
        pos_embed_resize="bicubic_size_antialias" if regs else "bicubic_scale_offset",
    )
    # Deformable heads: 6 for S and B (the seed detector's choice), Dh = 64 for L and g.
    adapter = AdapterConfig(
        num_heads=heads, embed_dim=dim, depth=depth, deform_num_heads=6 if dim <= 768 else dim // 64,
        interaction_indexes=_interaction_indexes(depth), num_register_tokens=regs, ffn_layer=ffn,
    )
    return trunk, adapter


PRESETS: List[str] = ["tiny"] + [
    f"dinov2_vit{v}14{suffix}" for v in VARIANTS for suffix in ("", "_reg")
]


def load_config_file(path: str) -> AdapterConfig:
    """An ``AdapterConfig`` from a JSON file of PyTorch keyword arguments (or our own fields)."""
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object of config fields")
    return AdapterConfig.from_dict(d)



def dinov2_config_from_hub(kwargs: Dict[str, Any]) -> DinoV2Config:
    """A ``DinoV2Config`` from the DINOv2 hub ``vit_*`` constructor arguments."""
    known = {"img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "init_values",
             "ffn_layer", "block_chunks", "num_register_tokens", "interpolate_antialias",
             "interpolate_offset", "qkv_bias", "proj_bias", "ffn_bias", "drop_path_rate"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown DINOv2 hub arguments: {', '.join(unknown)}")
    ffn = kwargs.get("ffn_layer", "mlp")
    if ffn not in ("mlp", "swiglu", "swiglufused"):
        raise ValueError(f"unsupported DINOv2 ffn_layer {ffn!r}")
    if kwargs.get("interpolate_antialias", False):
        mode = "bicubic_size_antialias"
    elif kwargs.get("interpolate_offset", 0.1):
        mode = "bicubic_scale_offset"
    else:
        mode = "bicubic_size"
    return DinoV2Config(
        embed_dim=kwargs.get("embed_dim", 768), depth=kwargs.get("depth", 12),
        num_heads=kwargs.get("num_heads", 12), mlp_ratio=kwargs.get("mlp_ratio", 4.0),
        patch_size=kwargs.get("patch_size", 14), pretrain_size=kwargs.get("img_size", 518),
        num_register_tokens=kwargs.get("num_register_tokens", 0),
        ffn_layer="mlp" if ffn == "mlp" else "swiglu",
        layer_scale_init=kwargs.get("init_values", 1.0) or 1.0, pos_embed_resize=mode,
        drop_path_rate=kwargs.get("drop_path_rate", 0.0),
    )
