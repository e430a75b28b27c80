"""EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks (Tan & Le, ICML 2019).

https://arxiv.org/abs/1905.11946. MBConv blocks (inverted residual, depthwise conv, squeeze-excite,
swish) in the B0 layout, scaled in width and depth by the compound coefficients of b0–b7; stochastic
depth ("drop connect") grows linearly over the blocks. Parameter names follow timm
(``conv_stem``, ``blocks.{stage}.{i}.conv_pw/conv_dw/se/conv_pwl``, ``conv_head``) with the
classifier at ``head.fc``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import mindspore.nn as nn
from mindspore import Tensor
from mindspore.common.initializer import Normal, Uniform

from framework.models.layers import (
    BlasConv2d,
    ClassifierHead,
    DepthwiseConv2d,
    DropPath,
    SiLU,
    SqueezeExcite,
    make_divisible,
)
from framework.models.registry import register_model

# B0 stages: (block kind, repeats, kernel, stride, expansion, output channels); SE ratio 0.25 throughout.
B0_STAGES = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)
SE_RATIO = 0.25
# (width multiplier, depth multiplier, native resolution, dropout) per variant, from the paper.
VARIANTS = {
    "b0": (1.0, 1.0, 224, 0.2),
    "b1": (1.0, 1.1, 240, 0.2),
    "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3),
    "b4": (1.4, 1.8, 380, 0.4),
    "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5),
    "b7": (2.0, 3.1, 600, 0.5),
}


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> BlasConv2d:
    # TF/timm "goog" init: normal with std sqrt(2 / fan_out), fan_out = k*k*out/groups.
    return BlasConv2d(
        in_ch, out_ch, kernel, stride, weight_init=Normal(sigma=math.sqrt(2.0 / (kernel * kernel * out_ch)))
    )


def _depthwise(channels: int, kernel: int, stride: int) -> DepthwiseConv2d:
    # the same init: fan_out = k*k*channels / channels groups
    return DepthwiseConv2d(channels, kernel, stride, weight_init=Normal(sigma=math.sqrt(2.0 / (kernel * kernel))))


def _bn(channels: int, eps: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps, momentum=0.9)


class DepthwiseSeparable(nn.Cell):
    """Depthwise conv → SE → pointwise conv (the first stage, expansion 1)."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int, drop_path_rate: float, bn_eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.conv_dw = _depthwise(in_ch, kernel, stride)
        self.bn1 = _bn(in_ch, bn_eps)
        self.act = SiLU()
        self.se = SqueezeExcite(in_ch, max(1, int(in_ch * SE_RATIO)), act=SiLU)
        self.conv_pw = _conv(in_ch, out_ch, 1)
        self.bn2 = _bn(out_ch, bn_eps)
        self.has_skip = stride == 1 and in_ch == out_ch
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def construct(self, x: Tensor) -> Tensor:
        out = self.se(self.act(self.bn1(self.conv_dw(x))))
        out = self.bn2(self.conv_pw(out))
        return x + self.drop_path(out) if self.has_skip else out


class InvertedResidual(nn.Cell):
    """MBConv: 1×1 expand → depthwise k×k → SE → 1×1 linear projection, residual when shapes allow."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int,
        expansion: int,
        drop_path_rate: float,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        mid = in_ch * expansion
        self.conv_pw = _conv(in_ch, mid, 1)
        self.bn1 = _bn(mid, bn_eps)
        self.conv_dw = _depthwise(mid, kernel, stride)
        self.bn2 = _bn(mid, bn_eps)
        self.act = SiLU()
        self.se = SqueezeExcite(mid, max(1, int(in_ch * SE_RATIO)), act=SiLU)
        self.conv_pwl = _conv(mid, out_ch, 1)
        self.bn3 = _bn(out_ch, bn_eps)
        self.has_skip = stride == 1 and in_ch == out_ch
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def construct(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv_pw(x)))
        out = self.se(self.act(self.bn2(self.conv_dw(out))))
        out = self.bn3(self.conv_pwl(out))
        return x + self.drop_path(out) if self.has_skip else out


# mindcv's block.N positions → our layer names (the activations hold positions 2 and 5)
_MINDCV_FIRST_STAGE = {"0": "conv_dw", "1": "bn1", "3": "se", "4": "conv_pw", "5": "bn2"}
_MINDCV_BLOCK = {"0": "conv_pw", "1": "bn1", "3": "conv_dw", "4": "bn2", "6": "se", "7": "conv_pwl", "8": "bn3"}


class EfficientNet(nn.Cell):
    """Stem → seven MBConv stages → 1×1 head conv → pooled classifier."""

    reduction = 32  # input pixels per pixel of the last feature map
    # depth order for layer-wise lr decay (optimizer.layer_decay): stem, each block, the head conv; then the head
    depth_patterns: ClassVar = (r"^(conv_stem|bn1)\.", r"^blocks\.(\d+)\.(\d+)\.", r"^(conv_head|bn2)\.")
    # names of its twins' tensors → ours (model.pretrained; norm tensors are renamed by framework.models.pretrained)
    # mindcv keeps torchvision's layout: features.0/1 stem conv/bn, features.3-9 the stages (layers by position
    # in block.N), features.10/11 head conv/bn, mlp_head the classifier
    weight_names: ClassVar = {
        "torch": ((r"^classifier\.", "head.fc."),),
        "mindcv": (
            (r"^features\.0\.", "conv_stem."),
            (r"^features\.1\.", "bn1."),
            (r"^features\.10\.", "conv_head."),
            (r"^features\.11\.", "bn2."),
            (r"^features\.3\.(\d+)\.block\.(\d)\.", lambda m: f"blocks.0.{m[1]}.{_MINDCV_FIRST_STAGE[m[2]]}."),
            (
                r"^features\.([4-9])\.(\d+)\.block\.(\d)\.",
                lambda m: f"blocks.{int(m[1]) - 3}.{m[2]}.{_MINDCV_BLOCK[m[3]]}.",
            ),
            (r"^mlp_head\.", "head.fc."),
        ),
    }
    # mindcv's (torchvision's) B5-B7 were trained with BatchNorm eps 1e-3 (the TensorFlow originals' value)
    pretrained_settings: ClassVar = {
        "mindcv": lambda name: (
            {"bn_eps": 1e-3} if name in ("efficientnet_b5", "efficientnet_b6", "efficientnet_b7") else {}
        )
    }

    def __init__(
        self,
        width_mult: float,
        depth_mult: float,
        num_classes: int = 1000,
        in_channels: int = 3,
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.2,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        stem_ch = make_divisible(32 * width_mult)
        self.conv_stem = _conv(in_channels, stem_ch, 3, stride=2)
        self.bn1 = _bn(stem_ch, bn_eps)
        self.act = SiLU()
        repeats = [math.ceil(stage[1] * depth_mult) for stage in B0_STAGES]
        total_blocks, block_idx, in_ch = sum(repeats), 0, stem_ch
        stages = []
        for (kind, _, kernel, stride, expansion, out_ch), depth in zip(B0_STAGES, repeats, strict=True):
            out_ch = make_divisible(out_ch * width_mult)
            blocks = []
            for i in range(depth):
                rate = drop_path_rate * block_idx / total_blocks
                block_stride = stride if i == 0 else 1
                if kind == "ds":
                    blocks.append(DepthwiseSeparable(in_ch, out_ch, kernel, block_stride, rate, bn_eps))
                else:
                    blocks.append(InvertedResidual(in_ch, out_ch, kernel, block_stride, expansion, rate, bn_eps))
                in_ch = out_ch
                block_idx += 1
            stages.append(nn.SequentialCell(blocks))
        self.blocks = nn.SequentialCell(stages)
        self.num_features = make_divisible(1280 * width_mult)
        self.conv_head = _conv(in_ch, self.num_features, 1)
        self.bn2 = _bn(self.num_features, bn_eps)
        init_range = 1.0 / math.sqrt(num_classes)
        self.head = ClassifierHead(
            self.num_features, num_classes, drop_rate, weight_init=Uniform(init_range), bias_init="zeros"
        )

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.act(self.bn1(self.conv_stem(x)))
        return self.act(self.bn2(self.conv_head(self.blocks(x))))

    def construct(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


def _efficientnet(variant: str, **kwargs) -> EfficientNet:
    width, depth, _, dropout = VARIANTS[variant]
    kwargs.setdefault("drop_rate", dropout)
    return EfficientNet(width, depth, **kwargs)


@register_model
def efficientnet_b0(**kwargs) -> EfficientNet:
    return _efficientnet("b0", **kwargs)


@register_model
def efficientnet_b1(**kwargs) -> EfficientNet:
    return _efficientnet("b1", **kwargs)


@register_model
def efficientnet_b2(**kwargs) -> EfficientNet:
    """EfficientNet-B2: width 1.1, depth 1.2, 260 px, dropout 0.3; 9.1 M parameters at 1000 classes."""
    return _efficientnet("b2", **kwargs)


@register_model
def efficientnet_b3(**kwargs) -> EfficientNet:
    return _efficientnet("b3", **kwargs)


@register_model
def efficientnet_b4(**kwargs) -> EfficientNet:
    return _efficientnet("b4", **kwargs)


@register_model
def efficientnet_b5(**kwargs) -> EfficientNet:
    return _efficientnet("b5", **kwargs)


@register_model
def efficientnet_b6(**kwargs) -> EfficientNet:
    return _efficientnet("b6", **kwargs)


@register_model
def efficientnet_b7(**kwargs) -> EfficientNet:
    return _efficientnet("b7", **kwargs)


@register_model
def efficientnet_test(**kwargs) -> EfficientNet:
    """Width 0.05, depth 0.5 (10 blocks of 8-16 channels, ~0.03 M parameters): EfficientNet's code path (both
    block kinds, SE, residuals, drop path) at a fraction of B0's cost, for tests; not for accuracy."""
    return EfficientNet(0.05, 0.5, **kwargs)
