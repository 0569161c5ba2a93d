"""Pallas kernels of the multi-scale deformable attention sampling core.

GPU (Pallas's Triton backend): ``ms_deform_attn`` samples from given locations and softmaxed
weights; ``ms_deform_attn_fused`` forms the locations and the softmax inside the kernels from
reference points, raw offsets and raw logits. TPU (Mosaic): the same two as
``ms_deform_attn_tpu`` and ``ms_deform_attn_fused_tpu`` (:mod:`pallas_kernels.tpu`), built
without gathers or scatters. All are differentiable (``jax.custom_vjp`` with Pallas backward
kernels) and run in the Pallas interpreter with ``interpret=True``.
"""

from .fused import ms_deform_attn_fused
from .sampling import ms_deform_attn
from .tpu import ms_deform_attn_fused_tpu, ms_deform_attn_tpu

__all__ = ["ms_deform_attn", "ms_deform_attn_fused", "ms_deform_attn_fused_tpu", "ms_deform_attn_tpu"]
