"""A PyTorch peer of the seed DinoAdapter, for side-by-side benchmarks.

The seed "DinoAdapter" is a DINOv2 ViT (patch 14) wrapped by a ViT-Adapter: a Spatial Prior Module
(SPM) of strided convolutions, and interaction blocks built on multi-scale deformable attention
(MSDeformAttn). This module re-implements it in plain PyTorch, the way a PyTorch user would write
it (``nn.Module``, NCHW, ``nn.Conv2d``/``nn.BatchNorm2d``/``nn.LayerNorm``/``nn.Linear``, attention
through ``F.scaled_dot_product_attention``), so that the benchmarks can time "the PyTorch model this
library replaces". It was written for this project's benchmarks following ``docs/SPEC.md``
(sections 1-5 and 7) and is checked against the reference fixtures by ``tests/parity/test_torch_peer.py``.

Its ``state_dict()`` keys are the seed's (no prefix), so a seed checkpoint loads with
``strict=True``. Shapes follow the reference, not ``h // 8`` arithmetic: every level size is read
from the tensor the SPM actually produced (stride-2 ops map ``n`` to ``ceil(n / 2)``).

The deformable-attention sampling core is either ``msda="cpp"``, the C++ kernel of the optional
``torch-ms-deform-attn`` package (imported on first use), or ``msda="pytorch"``, a pure-PyTorch
core on ``F.grid_sample``. Only torch (and, optionally, that package) is needed.
"""

from __future__ import annotations

import itertools
import math
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Shape = Tuple[int, int]
SEED_INTERACTIONS = ((0, 2), (3, 5), (6, 8), (9, 11))
VARIANTS = {"vit_s": (6, 384), "vit_b": (12, 768)}  # name -> (ViT heads, embed dim)


# --------------------------------------------------------------------------------------------
# Multi-scale deformable attention
# --------------------------------------------------------------------------------------------

class Levels:
    """The value levels of one deformable attention: Python shapes (for the PyTorch core and the
    reshapes) and the int64 tensors the C++ kernel wants, built once per forward."""

    def __init__(self, shapes: Sequence[Shape], device: torch.device):
        self.shapes: List[Shape] = [(int(h), int(w)) for h, w in shapes]
        self.lengths: List[int] = [h * w for h, w in self.shapes]
        self.spatial_shapes = torch.tensor(self.shapes, dtype=torch.int64, device=device)
        starts = [0, *itertools.accumulate(self.lengths[:-1])]
        self.level_start_index = torch.tensor(starts, dtype=torch.int64, device=device)


def reference_points(shapes: Sequence[Shape], device: torch.device) -> torch.Tensor:
    """Pixel centres of each grid normalised to [0, 1], (x, y), row-major, grids concatenated:
    ``[1, Q, 1, 2]`` (the trailing 1 broadcasts over levels)."""
    points = []
    for h, w in shapes:
        y = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        x = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        points.append(torch.stack((xx.reshape(-1), yy.reshape(-1)), -1))
    return torch.cat(points, 0)[None, :, None]


def ms_deform_attn_pytorch(value: torch.Tensor, shapes: Sequence[Shape], locations: torch.Tensor,
                           weights: torch.Tensor) -> torch.Tensor:
    """Sampling core. value [N, S, M, D], locations [N, Q, M, L, P, 2] (x, y in [0, 1]),
    weights [N, Q, M, L, P] -> [N, Q, M*D]. Bilinear, zero padding, pixel-centre convention:
    exactly ``grid_sample(align_corners=False, padding_mode="zeros")`` on ``2*loc - 1``."""
    n, _, m, d = value.shape
    q = locations.shape[1]
    grids = 2 * locations - 1
    out = value.new_zeros(n * m, d, q)
    per_level = value.split([h * w for h, w in shapes], dim=1)
    for lvl, ((h, w), v) in enumerate(zip(shapes, per_level)):
        # [N, HW, M, D] -> [N*M, D, H, W]: one image per (batch, head).
        v = v.permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(n * m, q, -1, 2)       # [N*M, Q, P, 2]
        s = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        a = weights[:, :, :, lvl].transpose(1, 2).reshape(n * m, 1, q, -1)     # [N*M, 1, Q, P]
        out = out + (s * a).sum(-1)
    return out.view(n, m * d, q).transpose(1, 2)


def ms_deform_attn_cpp(value: torch.Tensor, levels: Levels, locations: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
    """The same core through the ``torch-ms-deform-attn`` C++ kernel (imported lazily)."""
    try:
        from torch_ms_deform_attn import ms_deform_attn
    except ImportError as e:
        raise ImportError("msda='cpp' needs the optional torch-ms-deform-attn package "
                          "(pip install --no-build-isolation --no-deps torch-ms-deform-attn); "
                          "use msda='pytorch' for the pure-PyTorch core") from e
    return ms_deform_attn(value, levels.spatial_shapes, levels.level_start_index, locations, weights)


class MSDeformAttn(nn.Module):
    """Deformable attention of ``n_heads`` heads, each sampling ``n_points`` points per level."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int, ratio: float,
                 msda: str):
        super().__init__()
        if msda not in ("cpp", "pytorch"):
            raise ValueError(f"msda must be 'cpp' or 'pytorch', not {msda!r}")
        d_value = int(d_model * ratio)
        if d_value % n_heads:
            raise ValueError(f"value width {d_value} is not divisible by {n_heads} heads")
        self.n_levels, self.n_heads, self.n_points, self.msda = n_levels, n_heads, n_points, msda
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_value)
        self.output_proj = nn.Linear(d_value, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Deformable DETR's init: zero offset weights, biases pointing each head in its own
        # direction (scaled so the larger component is 1) at distances 1..P; uniform attention.
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2 * math.pi / self.n_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: torch.Tensor, ref: torch.Tensor, feat: torch.Tensor,
                levels: Levels) -> torch.Tensor:
        """query [B, Q, C], ref [1 or B, Q, 1, 2], feat [B, S, C] (levels concatenated) -> [B, Q, C]."""
        b, q, _ = query.shape
        m, nl, p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(feat).view(b, feat.shape[1], m, -1)
        offsets = self.sampling_offsets(query).view(b, q, m, nl, p, 2)
        weights = self.attention_weights(query).view(b, q, m, nl * p).softmax(-1).view(b, q, m, nl, p)
        # Offsets are in pixels of each level: divide by (W_l, H_l) to get [0, 1] units.
        wh = levels.spatial_shapes.flip(-1).to(offsets.dtype)
        locations = ref[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
        if self.msda == "cpp":
            out = ms_deform_attn_cpp(value, levels, locations, weights)
        else:
            out = ms_deform_attn_pytorch(value, levels.shapes, locations, weights)
        return self.output_proj(out)


# --------------------------------------------------------------------------------------------
# ViT-Adapter pieces
# --------------------------------------------------------------------------------------------

def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


class DWConv(nn.Module):
    """Depthwise 3x3 conv applied to each level's tokens at that level's own shape."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, levels: Levels) -> torch.Tensor:
        """x [B, S, C] (the levels concatenated) -> [B, S, C]."""
        b, _, c = x.shape
        outs = []
        for t, (h, w) in zip(x.split(levels.lengths, dim=1), levels.shapes):
            y = self.dwconv(t.transpose(1, 2).reshape(b, c, h, w))
            outs.append(y.flatten(2).transpose(1, 2))
        return torch.cat(outs, dim=1)


class ConvFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()  # exact (erf) GELU, PyTorch's default
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, levels: Levels) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), levels)))


class Injector(nn.Module):
    """ViT tokens attend to the SPM levels: ``x + gamma * attn(query_norm(x), feat_norm(c))``."""

    def __init__(self, dim: int, num_heads: int, n_points: int, deform_ratio: float,
                 init_values: float, msda: str):
        super().__init__()
        self.query_norm = _layer_norm(dim)
        self.feat_norm = _layer_norm(dim)
        self.attn = MSDeformAttn(dim, 3, num_heads, n_points, deform_ratio, msda)
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor, ref: torch.Tensor, c: torch.Tensor, levels: Levels) -> torch.Tensor:
        return x + self.gamma * self.attn(self.query_norm(x), ref, self.feat_norm(c), levels)


class Extractor(nn.Module):
    """SPM tokens attend to the ViT map, then (with_cffn) a ConvFFN residual."""

    def __init__(self, dim: int, num_heads: int, n_points: int, deform_ratio: float,
                 with_cffn: bool, cffn_ratio: float, msda: str):
        super().__init__()
        self.query_norm = _layer_norm(dim)
        self.feat_norm = _layer_norm(dim)
        self.attn = MSDeformAttn(dim, 1, num_heads, n_points, deform_ratio, msda)
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
            self.ffn_norm = _layer_norm(dim)

    def forward(self, c: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, vit_levels: Levels,
                spm_levels: Levels) -> torch.Tensor:
        c = c + self.attn(self.query_norm(c), ref, self.feat_norm(x), vit_levels)
        if self.with_cffn:  # drop path is 0 in the seed: no DropPath module
            c = c + self.ffn(self.ffn_norm(c), spm_levels)
        return c


class InteractionBlockWithCls(nn.Module):
    """Injector, a slice of ViT blocks on ``[cls, x]``, extractor (+ extra extractors)."""

    def __init__(self, dim: int, num_heads: int, n_points: int, deform_ratio: float,
                 init_values: float, with_cffn: bool, cffn_ratio: float, extra_extractor: bool,
                 msda: str):
        super().__init__()
        self.injector = Injector(dim, num_heads, n_points, deform_ratio, init_values, msda)
        self.extractor = Extractor(dim, num_heads, n_points, deform_ratio, with_cffn, cffn_ratio, msda)
        self.extra_extractors = nn.Sequential(*[
            Extractor(dim, num_heads, n_points, deform_ratio, with_cffn, cffn_ratio, msda)
            for _ in range(2)]) if extra_extractor else None

    def forward(self, x: torch.Tensor, c: torch.Tensor, cls: torch.Tensor, blocks: Sequence[nn.Module],
                ref_inj: torch.Tensor, ref_ext: torch.Tensor, spm_levels: Levels,
                vit_levels: Levels) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.injector(x, ref_inj, c, spm_levels)
        x = torch.cat((cls, x), dim=1)
        for blk in blocks:
            x = blk(x)
        cls, x = x[:, :1], x[:, 1:]
        extractors = [self.extractor]
        if self.extra_extractors is not None:  # the last block's two extra extractors
            extractors += list(self.extra_extractors)
        for ext in extractors:
            c = ext(c, ref_ext, x, vit_levels, spm_levels)
        return x, c, cls


def _conv_bn_relu(cin: int, cout: int, stride: int) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """Conv stem (stride 4) and three stride-2 stages; 1x1 projections to the embed dim."""

    def __init__(self, inplanes: int, dim: int):
        super().__init__()
        c = inplanes
        self.stem = nn.Sequential(*_conv_bn_relu(3, c, 2), *_conv_bn_relu(c, c, 1),
                                  *_conv_bn_relu(c, c, 1), nn.MaxPool2d(3, 2, 1))
        self.conv2 = nn.Sequential(*_conv_bn_relu(c, 2 * c, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * c, 4 * c, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * c, 4 * c, 2))
        self.fc1 = nn.Conv2d(c, dim, 1)
        self.fc2 = nn.Conv2d(2 * c, dim, 1)
        self.fc3 = nn.Conv2d(4 * c, dim, 1)
        self.fc4 = nn.Conv2d(4 * c, dim, 1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """x [B, 3, Hp, Wp] -> four [B, D, h_i, w_i] maps at strides 4, 8, 16, 32 (ceil-halved)."""
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)


# --------------------------------------------------------------------------------------------
# DINOv2 trunk pieces (key names of the hub checkpoints)
# --------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # [B, D, Hv, Wv]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------

class DinoAdapter(nn.Module):
    """DINOv2 ViT + ViT-Adapter with the seed's constructor keywords (plus ``msda``).

    ``forward(x [B, 3, H, W]) -> (f1, f2, f3, f4, x_out)``, NCHW: the four BatchNorm'd pyramid
    levels (strides 4..32) and the final ViT patch tokens as a map (no final LayerNorm).
    ``with_cp`` is accepted and ignored (no activation checkpointing); ``add_vit_feature=True``
    is refused, since the seed configs never use it.
    """

    def __init__(self, num_heads: int = 12, embed_dim: int = 768, depth: int = 12,
                 pretrain_size: int = 518, patch_size: int = 14, mlp_ratio: float = 4.0,
                 conv_inplane: int = 64, n_points: int = 4, deform_num_heads: int = 6,
                 init_values: float = 0.0,
                 interaction_indexes: Sequence[Sequence[int]] = SEED_INTERACTIONS,
                 with_cffn: bool = True, cffn_ratio: float = 0.25, deform_ratio: float = 1.0,
                 add_vit_feature: bool = False, use_extra_extractor: bool = True,
                 with_cp: bool = False, msda: str = "cpp"):
        super().__init__()
        if add_vit_feature:
            raise NotImplementedError("add_vit_feature=True is not supported by this peer")
        d = embed_dim
        self.patch_size = patch_size
        self.pretrain_grid = pretrain_size // patch_size
        self.interaction_indexes = [tuple(ix) for ix in interaction_indexes]
        # DINOv2 trunk.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pretrain_grid ** 2, d))
        self.patch_embed = PatchEmbed(patch_size, d)
        self.blocks = nn.ModuleList([Block(d, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = _layer_norm(d)  # in the checkpoint; unused by the adapter's outputs
        # Adapter.
        self.level_embed = nn.Parameter(torch.zeros(3, d))
        self.spm = SpatialPriorModule(conv_inplane, d)
        n = len(self.interaction_indexes)
        self.interactions = nn.Sequential(*[
            InteractionBlockWithCls(d, deform_num_heads, n_points, deform_ratio, init_values, with_cffn,
                                    cffn_ratio, use_extra_extractor and i == n - 1, msda)
            for i in range(n)])
        self.up = nn.ConvTranspose2d(d, d, 2, 2)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.BatchNorm2d(d) for _ in range(4))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # Random init for benchmarks without a checkpoint (ViT-Adapter's recipe, roughly).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.level_embed)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.trunc_normal_(mod.weight, std=0.02)
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        for mod in self.modules():  # the Linear pass above overwrote the deformable init
            if isinstance(mod, MSDeformAttn):
                mod.reset_parameters()

    def _pos_embed(self, hv: int, wv: int) -> torch.Tensor:
        """Patch position embeddings resized to the token grid: [1, Hv*Wv, D]."""
        g, d = self.pretrain_grid, self.pos_embed.shape[-1]
        pos = self.pos_embed[:, 1:].reshape(1, g, g, d).permute(0, 3, 1, 2)
        # Size-based bicubic, align_corners=False, no antialias (the seed's resize, not the hub's).
        pos = F.interpolate(pos, size=(hv, wv), mode="bicubic", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """x [B, 3, H, W] -> (f1, f2, f3, f4, x_out), NCHW (see the class docstring)."""
        b, _, h, w = x.shape
        p = self.patch_size
        hp, wp = -(-h // p) * p, -(-w // p) * p
        padded = (hp, wp) != (h, w)
        if padded:
            if h // 32 == 0 or w // 32 == 0:
                raise ValueError(f"input {h}x{w} is too small: the cropped f4 would be empty")
            x = F.pad(x, (0, wp - w, 0, hp - h))  # zeros at the bottom and right

        # SPM; the level shapes come from the maps it produced (ceil-halvings), never from h // 8.
        c1, c2, c3, c4 = self.spm(x)
        spm_levels = Levels([t.shape[-2:] for t in (c2, c3, c4)], x.device)
        c = torch.cat([t.flatten(2).transpose(1, 2) + self.level_embed[i]
                       for i, t in enumerate((c2, c3, c4))], dim=1)

        # ViT tokens.
        x = self.patch_embed(x)
        hv, wv = x.shape[-2:]
        vit_levels = Levels([(hv, wv)], x.device)
        x = x.flatten(2).transpose(1, 2) + self._pos_embed(hv, wv)
        cls = self.cls_token.expand(b, -1, -1) + self.pos_embed[:, :1]

        ref_inj = reference_points(vit_levels.shapes, x.device)  # queries: ViT tokens
        ref_ext = reference_points(spm_levels.shapes, x.device)  # queries: SPM tokens c2|c3|c4
        for (first, last), layer in zip(self.interaction_indexes, self.interactions):
            x, c, cls = layer(x, c, cls, self.blocks[first:last + 1], ref_inj, ref_ext,
                              spm_levels, vit_levels)

        d = x.shape[-1]
        c2, c3, c4 = (t.transpose(1, 2).reshape(b, d, hh, ww)
                      for t, (hh, ww) in zip(c.split(spm_levels.lengths, dim=1), spm_levels.shapes))
        up = self.up(c2)
        if up.shape[-2:] != c1.shape[-2:]:
            # Odd c1 sizes: 2*c2 is one larger than c1; the reference resizes (not crops) it.
            up = F.interpolate(up, size=c1.shape[-2:], mode="bilinear", align_corners=False)
        c1 = c1 + up

        f1, f2, f3, f4 = self.norm1(c1), self.norm2(c2), self.norm3(c3), self.norm4(c4)
        x_out = x.transpose(1, 2).reshape(b, d, hv, wv)
        if padded:  # crop to the unpadded input's strides (only when padding was added)
            f1 = f1[..., :h // 4, :w // 4]
            f2 = f2[..., :h // 8, :w // 8]
            f3 = f3[..., :h // 16, :w // 16]
            f4 = f4[..., :h // 32, :w // 32]
            x_out = x_out[..., :h // p, :w // p]
        return f1, f2, f3, f4, x_out


def build(variant: str = "vit_s", msda: str = "cpp") -> DinoAdapter:
    """The seed DinoAdapter config for ``vit_s`` or ``vit_b`` (randomly initialised)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    heads, dim = VARIANTS[variant]
    return DinoAdapter(num_heads=heads, embed_dim=dim, depth=12, pretrain_size=518, patch_size=14,
                       mlp_ratio=4, conv_inplane=64, n_points=4, deform_num_heads=6, init_values=0.0,
                       interaction_indexes=SEED_INTERACTIONS, with_cffn=True, cffn_ratio=0.25,
                       deform_ratio=1.0, add_vit_feature=False, use_extra_extractor=True, msda=msda)


TRUNK_PREFIXES = ("cls_token", "pos_embed", "register_tokens", "patch_embed.", "blocks.", "norm.")


def freeze_trunk(model: DinoAdapter) -> DinoAdapter:
    """Stop gradients to the DINOv2 trunk (as detectors do); the adapter stays trainable."""
    for name, param in model.named_parameters():
        if name.startswith(TRUNK_PREFIXES):  # "norm." is the final LayerNorm, not norm1..norm4
            param.requires_grad_(False)
    return model
