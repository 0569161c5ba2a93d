"""The Spatial Prior Module: a small conv stem giving maps at strides 4, 8, 16 and 32.

Module paths mirror the PyTorch ``nn.Sequential`` indices (``stem.0`` conv, ``stem.1`` BN, ...).
Each stride-2 op maps ``n -> ceil(n / 2)``; :mod:`jax_adapter.nn.geometry` predicts the same sizes.
"""

from __future__ import annotations

from typing import Tuple

import jax
from flax import nnx

from jax_adapter.nn.geometry import AdapterGeometry
from jax_adapter.nn.layers import DType, BatchNorm2d, MaxPool3x3s2, ReLU, conv, run_sequential


def _conv_bn_relu(din: int, dout: int, stride: int, *, rngs: nnx.Rngs, **dt):
    return [conv(din, dout, 3, stride=stride, padding=1, bias=False, rngs=rngs, **dt),
            BatchNorm2d(dout, param_dtype=dt["param_dtype"]), ReLU()]


class SpatialPriorModule(nnx.Module):
    """``images [B, Hp, Wp, 3]`` -> ``c1 [B, *c1, D]`` map and ``c2, c3, c4`` token sequences."""

    def __init__(self, inplanes: int, embed_dim: int, *, rngs: nnx.Rngs, dtype: DType = None,
                 param_dtype: DType = "float32"):
        c = inplanes
        dt = dict(dtype=dtype, param_dtype=param_dtype)
        self.stem = nnx.List(
            _conv_bn_relu(3, c, 2, rngs=rngs, **dt) + _conv_bn_relu(c, c, 1, rngs=rngs, **dt)
            + _conv_bn_relu(c, c, 1, rngs=rngs, **dt) + [MaxPool3x3s2()]
        )
        self.conv2 = nnx.List(_conv_bn_relu(c, 2 * c, 2, rngs=rngs, **dt))
        self.conv3 = nnx.List(_conv_bn_relu(2 * c, 4 * c, 2, rngs=rngs, **dt))
        self.conv4 = nnx.List(_conv_bn_relu(4 * c, 4 * c, 2, rngs=rngs, **dt))
        self.fc1 = conv(c, embed_dim, 1, rngs=rngs, **dt)
        self.fc2 = conv(2 * c, embed_dim, 1, rngs=rngs, **dt)
        self.fc3 = conv(4 * c, embed_dim, 1, rngs=rngs, **dt)
        self.fc4 = conv(4 * c, embed_dim, 1, rngs=rngs, **dt)

    def __call__(self, x: jax.Array, geom: AdapterGeometry) -> Tuple[jax.Array, ...]:
        s1, c2, c3, c4 = self.prior(x, geom)
        return (self.fc1(s1), c2, c3, c4)

    def prior(self, x: jax.Array, geom: AdapterGeometry) -> Tuple[jax.Array, ...]:
        """``images [B, Hp, Wp, 3]`` -> the stride-4 stem map ``[B, *c1, inplanes]`` before
        ``fc1`` and the ``c2, c3, c4`` token sequences ``[B, n_i, D]``.

        The adapters apply ``fc1`` at their end, where its only use is: a ``[B, *c1, D]`` map
        made at the start would be held through the whole trunk at ``D / inplanes`` times the
        bytes of the stem map (ViT-S, 6x256x704 in bfloat16: 57 MB against 18 MB)."""
        s1 = run_sequential(self.stem, x)
        c2 = run_sequential(self.conv2, s1)
        c3 = run_sequential(self.conv3, c2)
        c4 = run_sequential(self.conv4, c3)
        maps = (s1, self.fc2(c2), self.fc3(c3), self.fc4(c4))
        for i, (f, shape) in enumerate(zip(maps, geom.spm_shapes)):
            # The geometry is the contract; a mismatch is a bug, not an input error.
            assert f.shape[1:3] == shape, (i, f.shape, shape)
        b, d = x.shape[0], maps[1].shape[-1]
        return (s1,) + tuple(f.reshape(b, -1, d) for f in maps[1:])
