"""Pallas (Triton backend) kernels of the multi-scale deformable attention sampling core.

``ms_deform_attn`` samples from given locations and softmaxed weights; ``ms_deform_attn_fused``
forms the locations and the softmax inside the kernels from reference points, raw offsets and
raw logits. Both are differentiable (``jax.custom_vjp`` with Pallas backward kernels) and run
interpreted where there is no GPU.
"""

from .fused import ms_deform_attn_fused
from .sampling import ms_deform_attn

__all__ = ["ms_deform_attn", "ms_deform_attn_fused"]
