"""Layers shared across model families."""

from __future__ import annotations

import mindspore.nn as nn
import mindspore.ops as ops
from mindspore import Tensor


class DropPath(nn.Cell):
    """Stochastic depth (Huang et al. 2016): drop a residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {drop_prob}")
        self.keep_prob = 1.0 - drop_prob

    def construct(self, x: Tensor) -> Tensor:
        if not self.training or self.keep_prob == 1.0:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = ops.floor(self.keep_prob + ops.rand(shape, dtype=x.dtype))
        return x / self.keep_prob * mask


class ClassifierHead(nn.Cell):
    """Global average pool → dropout → linear classifier.

    Pooling is a mean over (H, W) rather than ``nn.AdaptiveAvgPool2d`` so the head exports to ONNX.
    """

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Dense(in_features, num_classes)

    def construct(self, x: Tensor) -> Tensor:
        x = x.mean((2, 3))
        return self.fc(self.dropout(x))
