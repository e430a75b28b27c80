"""ResNeXt: Aggregated Residual Transformations for Deep Neural Networks (Xie et al., CVPR 2017).

https://arxiv.org/abs/1611.05431. Bottleneck blocks whose 3×3 convolution is split into
``cardinality`` groups; the stride sits on the 3×3 conv (the "ResNet v1.5" placement used by
timm, torchvision and the MindSpore ResNeXt50 recipe). Parameter names follow timm/torchvision
(``conv1``, ``bn1``, ``layer{1-4}.{i}.conv{1-3}``, ``downsample.{0,1}``) with the classifier at
``head.fc``, so pretrained weights convert by renaming only the head.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import mindspore.nn as nn
from mindspore import Tensor
from mindspore.common.initializer import HeNormal

from framework.models.layers import BlasConv2d, ClassifierHead, DropPath, StemMaxPool, linear_drop_path_rates
from framework.models.registry import register_model


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> BlasConv2d:
    return BlasConv2d(in_ch, out_ch, kernel, stride, groups, weight_init=HeNormal(mode="fan_out", nonlinearity="relu"))


def _bn(channels: int, zero_init: bool = False) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.9, gamma_init="zeros" if zero_init else "ones")


class Bottleneck(nn.Cell):
    """1×1 reduce → grouped 3×3 (carries the stride) → 1×1 expand, plus identity or projection."""

    expansion = 4

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int,
        cardinality: int,
        base_width: int,
        drop_path_rate: float,
        zero_init_last: bool,
    ) -> None:
        super().__init__()
        width = int(planes * base_width / 64) * cardinality
        out_ch = planes * self.expansion
        self.conv1 = _conv(in_ch, width, 1)
        self.bn1 = _bn(width)
        self.conv2 = _conv(width, width, 3, stride=stride, groups=cardinality)
        self.bn2 = _bn(width)
        self.conv3 = _conv(width, out_ch, 1)
        self.bn3 = _bn(out_ch, zero_init=zero_init_last)
        self.relu = nn.ReLU()
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.has_downsample = stride != 1 or in_ch != out_ch
        if self.has_downsample:
            self.downsample = nn.SequentialCell([_conv(in_ch, out_ch, 1, stride=stride), _bn(out_ch)])

    def construct(self, x: Tensor) -> Tensor:
        shortcut = self.downsample(x) if self.has_downsample else x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.drop_path(out) + shortcut)


class ResNeXt(nn.Cell):
    """7×7 stem + max-pool, four stages of bottlenecks, global-pool classifier."""

    reduction = 32  # input pixels per pixel of the last feature map
    # depth order for layer-wise lr decay (optimizer.layer_decay): the stem, then each block; the head is last
    depth_patterns: ClassVar = (r"^(conv1|bn1)\.", r"^layer(\d+)\.(\d+)\.")
    # names of its twins' tensors → ours (model.pretrained; norm tensors are renamed by framework.models.pretrained)
    weight_names: ClassVar = {
        "torch": ((r"^fc\.", "head.fc."),),
        "mindcv": ((r"^classifier\.", "head.fc."), (r"\.down_sample\.", ".downsample.")),
    }
    pretrained_settings: ClassVar = {"mindcv": lambda name: {"stem_pool": "same"}}  # as its weights were trained

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        cardinality: int = 32,
        base_width: int = 4,
        num_classes: int = 1000,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        zero_init_last: bool = True,
        stem_width: int = 64,
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
        stem_pool: Literal["symmetric", "same"] = "symmetric",
    ) -> None:
        super().__init__()
        self.conv1 = _conv(in_channels, stem_width, 7, stride=2)
        self.bn1 = _bn(stem_width)
        self.relu = nn.ReLU()
        self.maxpool = StemMaxPool(stem_pool)
        rates, block_idx, in_ch = linear_drop_path_rates(drop_path_rate, sum(layers)), 0, stem_width
        stages = []
        for stage_idx, (depth, planes) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for i in range(depth):
                stride = 2 if i == 0 and stage_idx > 0 else 1
                blocks.append(
                    Bottleneck(in_ch, planes, stride, cardinality, base_width, rates[block_idx], zero_init_last)
                )
                in_ch = planes * Bottleneck.expansion
                block_idx += 1
            stages.append(nn.SequentialCell(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = in_ch
        self.head = ClassifierHead(in_ch, num_classes, drop_rate)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def construct(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


@register_model
def resnext50_32x4d(**kwargs) -> ResNeXt:
    """ResNeXt-50 32×4d: 25.0 M parameters at 1000 classes, 4.3 GFLOPs at 224 px."""
    return ResNeXt((3, 4, 6, 3), cardinality=32, base_width=4, **kwargs)


@register_model
def resnext101_32x4d(**kwargs) -> ResNeXt:
    """ResNeXt-101 32×4d: 44.2 M parameters at 1000 classes."""
    return ResNeXt((3, 4, 23, 3), cardinality=32, base_width=4, **kwargs)


@register_model
def resnext101_32x8d(**kwargs) -> ResNeXt:
    """ResNeXt-101 32×8d: 88.8 M parameters at 1000 classes."""
    return ResNeXt((3, 4, 23, 3), cardinality=32, base_width=8, **kwargs)


@register_model
def resnext_test(**kwargs) -> ResNeXt:
    """One narrow block per stage (~0.16 M parameters): the ResNeXt code path at a fraction of the cost, for
    tests and smoke runs of the training machinery (as timm's ``test_*`` models); not for accuracy."""
    return ResNeXt((1, 1, 1, 1), cardinality=4, base_width=16, stem_width=16, widths=(16, 32, 48, 64), **kwargs)
