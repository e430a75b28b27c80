"""NFNet: High-Performance Large-Scale Image Recognition Without Normalization (Brock et al., ICML 2021).

https://arxiv.org/abs/2102.06171. Normalizer-free ResNets: no BatchNorm; scaled weight-standardised
convolutions, activations multiplied by the variance-preserving gamma of the non-linearity, residual
branches scaled by ``alpha`` and inputs by ``beta = 1/sqrt(expected variance)``, a learnable skip gain
initialised at zero (SkipInit), squeeze-excite with gain 2 and stochastic depth. This is the DeepMind
variant (GELU, "SAME" padding, gamma in the activation), i.e. timm's ``dm_nfnet_f*``. Parameter names
follow timm (``stem.conv1-4``, ``stages.{s}.{b}.conv1/conv2/conv2b/conv3/downsample.conv``,
``final_conv``, ``head.fc``; each conv has ``weight``, ``bias`` and ``gain``), except that the SE
convs are ``attn_last.conv_reduce/conv_expand`` (timm: ``attn_last.fc1/fc2``) and the skip gain is
``skipinit_gain`` as in timm.
"""

from __future__ import annotations

import math
from typing import ClassVar

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
import numpy as np
from mindspore import Parameter, Tensor
from mindspore.common.initializer import HeNormal, Normal, initializer

from framework.models.kernels import conv2d, spec, weight_standardisation
from framework.models.layers import (
    ClassifierHead,
    DropPath,
    FusedActivation,
    SqueezeExcite,
    broadcast_product,
    linear_drop_path_rates,
    make_divisible,
)
from framework.models.registry import register_model

# Variance-preserving gamma of GELU, from the official DeepMind code.
GELU_GAMMA = 1.7015043497085571
GELU_TANH_SCALE = 2.0 * math.sqrt(2.0 / math.pi)
STAGE_CHANNELS = (256, 512, 1536, 1536)


class ScaledStdConv2d(nn.Cell):
    """Conv whose weight is standardised per output channel, then scaled by ``gain / sqrt(fan_in)``.

    "SAME" padding as TensorFlow (extra row/column at the bottom/right for even sizes at stride 2).
    """

    FLOAT32 = ms.float32  # a class attribute: MindSpore's AMP recompiles construct without module globals

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, eps: float = 1e-5
    ) -> None:
        super().__init__()
        fan_in = in_ch // groups * kernel * kernel
        self.weight = Parameter(
            initializer(HeNormal(mode="fan_in", nonlinearity="linear"), (out_ch, in_ch // groups, kernel, kernel)),
            name="weight",
        )
        self.bias = Parameter(initializer("zeros", (out_ch,)), name="bias")
        self.gain = Parameter(initializer("ones", (out_ch, 1, 1, 1)), name="gain")
        self.scale = 1.0 / math.sqrt(fan_in)
        self.eps = eps
        self.stride = stride
        self.groups = groups
        # Training on the CPU standardises with the project's kernel (kernels.weight_standardisation), elsewhere with
        # MindSpore's BatchNorm kernel, as timm does with F.batch_norm: one fused kernel each way, keeping only
        # per-channel statistics for the backward. Autodiff through the formula below kept ~8 weight-sized
        # intermediates per conv alive: NFNet-F0's step took 4.7 GB instead of 2.5 GB at batch 2.
        # momentum 0: the running statistics it is given (zeros, ones) are written back unchanged.
        self.batch_norm = ops.BatchNorm(is_training=True, epsilon=eps, momentum=0.0)
        self.zeros = Tensor(np.zeros(out_ch, np.float32))
        self.ones = Tensor(np.ones(out_ch, np.float32))
        self.standardise = weight_standardisation()
        self.standardise_spec = Tensor([self.scale, eps], ms.float32)
        # CPU training runs the project's OpenBLAS kernel on the layers and sizes where it is faster (kernels.conv2d)
        self.kernel, self.min_pixels, self.max_pixels = conv2d(in_ch, kernel, stride, groups, same=True) or (None, 0, 0)
        self.spec = spec(stride, same=True)

    def construct(self, x: Tensor) -> Tensor:
        if not self.training:
            weight = self.standardised_weight().reshape(self.weight.shape)
            return ops.conv2d(x, weight, self.bias, stride=self.stride, pad_mode="same", groups=self.groups)
        weight = self.training_weight()
        # mixed precision casts every op's inputs to float16 (layers.FusedActivation); the kernel takes float32
        pixels = x.shape[2] * x.shape[3]
        fits = self.min_pixels <= pixels and pixels <= self.max_pixels and self.mixed_precision_type is None
        if self.kernel is not None and x.dtype == self.FLOAT32 and fits:
            return ops.bias_add(self.kernel(x, weight, self.spec), self.bias)
        return ops.conv2d(x, weight, self.bias, stride=self.stride, pad_mode="same", groups=self.groups)

    def training_weight(self) -> Tensor:
        """The standardised weight in training: the kernel on the CPU in float32, MindSpore's BatchNorm elsewhere."""
        if self.standardise is not None and self.mixed_precision_type is None:
            return self.standardise(self.weight, self.gain, self.standardise_spec)
        rows = self.weight.reshape(1, self.weight.shape[0], -1, 1)  # N=1, C=out, H=fan_in, W=1
        factor = self.gain.reshape(-1) * self.scale
        return self.batch_norm(rows, factor, self.zeros, self.zeros, self.ones)[0].reshape(self.weight.shape)

    def standardised_weight(self) -> Tensor:
        """The formula, for inference and export (ONNX has no training-mode BatchNorm in MindSpore's exporter)."""
        # Each output channel's fan-in as one contiguous row (much faster on CPU than reducing over axes 1-3 of
        # the 4-D weight); the per-row factor is formed before touching the weight.
        weight = self.weight.reshape(self.weight.shape[0], -1)
        centered = weight - weight.mean(axis=1, keep_dims=True)
        # 1 / sqrt rather than rsqrt: MindSpore 2.8's ONNX exporter has no Rsqrt
        # centered * centered: the backward of ops.square goes through a slow Pow kernel on CPU
        inv_std = 1.0 / ops.sqrt((centered * centered).mean(axis=1, keep_dims=True) + self.eps)
        return centered * (inv_std * self.gain.reshape(-1, 1) * self.scale)


class GammaGELU(FusedActivation):
    """GELU times its variance-preserving gamma (and ``scale``), so activations keep unit variance.

    The tanh approximation, as ``jax.nn.gelu`` in the DeepMind code, written as
    ``x * sigmoid(2 * sqrt(2 / pi) * (x + 0.044715 x³))`` (the same function: 0.5 (1 + tanh z) = sigmoid(2z)).
    On MindSpore 2.8's CPU backend this form trains ~3× faster than ``nn.GELU(approximate=True)``, whose
    kernel and cube (``Pow``) took a quarter of NFNet-F0's step (``task=benchmark`` profile); CPU training runs
    the fused kernel (``FusedActivation``).
    """

    kernel_name = "Gelu"
    tanh_scale = GELU_TANH_SCALE

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__(GELU_GAMMA * scale)

    def formula(self, x: Tensor) -> Tensor:
        return x * ops.sigmoid(self.tanh_scale * (x + 0.044715 * (x * x * x))) * self.scale


class DownsampleAvg(nn.Cell):
    """Shortcut projection: 2×2 average pool (when striding) → 1×1 scaled-std conv.

    The pool is timm's (ceil mode, padding excluded from the mean). On even sizes that is a plain 2×2 pool,
    which is used there because it exports to ONNX (the padded form lowers to AvgPool3D, which MindSpore
    2.8's ONNX exporter refuses); odd sizes keep the padded form.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.has_pool = stride > 1
        if self.has_pool:
            self.pool = nn.AvgPool2d(2, stride, pad_mode="pad", ceil_mode=True, count_include_pad=False)
            self.pool_even = nn.AvgPool2d(2, stride)
        self.conv = ScaledStdConv2d(in_ch, out_ch, 1)

    def construct(self, x: Tensor) -> Tensor:
        if self.has_pool:
            x = self.pool_even(x) if x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0 else self.pool(x)
        return self.conv(x)


class NormFreeBlock(nn.Cell):
    """Pre-activation bottleneck: 1×1 → grouped 3×3 → grouped 3×3 → 1×1 → SE, scaled and added."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, alpha: float, beta: float, group_size: int, drop_path_rate: float
    ) -> None:
        super().__init__()
        groups = make_divisible(out_ch * 0.5) // group_size
        mid = group_size * groups
        self.alpha, self.attn_gain = alpha, 2.0
        self.has_downsample = in_ch != out_ch or stride != 1
        if self.has_downsample:
            self.downsample = DownsampleAvg(in_ch, out_ch, stride)
        self.act1, self.act2, self.act2b, self.act3 = GammaGELU(beta), GammaGELU(), GammaGELU(), GammaGELU()
        self.conv1 = ScaledStdConv2d(in_ch, mid, 1)
        self.conv2 = ScaledStdConv2d(mid, mid, 3, stride=stride, groups=groups)
        self.conv2b = ScaledStdConv2d(mid, mid, 3, groups=groups)
        self.conv3 = ScaledStdConv2d(mid, out_ch, 1)
        self.attn_last = SqueezeExcite(out_ch, make_divisible(out_ch * 0.5, round_limit=0.0))
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.skipinit_gain = Parameter(initializer("zeros", ()), name="skipinit_gain")

    def construct(self, x: Tensor) -> Tensor:
        out = self.act1(x)  # times beta
        shortcut = self.downsample(out) if self.has_downsample else x
        out = self.conv2(self.act2(self.conv1(out)))
        out = self.conv3(self.act3(self.conv2b(self.act2b(out))))
        # SE's gates times the branch's other factors (attention gain, alpha, drop-path mask, skip gain), then one
        # product with the map, where each factor took a map-sized product forward and backward
        factor = self.drop_path(self.attn_last.excitation(out) * (self.attn_gain * self.alpha)) * self.skipinit_gain
        return broadcast_product(out, factor, self.training) + shortcut


class DeepQuadStem(nn.Cell):
    """Four 3×3 convs (16, 32, 64, 128 channels, strides 2-1-1-2) with gamma-GELU between them."""

    def __init__(self, in_channels: int, out_channels: int = 128) -> None:
        super().__init__()
        self.conv1 = ScaledStdConv2d(in_channels, out_channels // 8, 3, stride=2)
        self.conv2 = ScaledStdConv2d(out_channels // 8, out_channels // 4, 3)
        self.conv3 = ScaledStdConv2d(out_channels // 4, out_channels // 2, 3)
        self.conv4 = ScaledStdConv2d(out_channels // 2, out_channels, 3, stride=2)
        self.act2, self.act3, self.act4 = GammaGELU(), GammaGELU(), GammaGELU()

    def construct(self, x: Tensor) -> Tensor:
        x = self.act2(self.conv1(x))
        x = self.act3(self.conv2(x))
        return self.conv4(self.act4(self.conv3(x)))


class NFNet(nn.Cell):
    """Four-conv "deep quad" stem (stride 4), four stages of NF blocks, 1×1 final conv, pooled classifier."""

    reduction = 32  # input pixels per pixel of the last feature map
    # depth order for layer-wise lr decay (optimizer.layer_decay): stem, each block, the final conv; then the head
    depth_patterns: ClassVar = (r"^stem\.", r"^stages\.(\d+)\.(\d+)\.", r"^final_conv\.")
    # names of timm dm_nfnet_f0's tensors → ours (model.pretrained)
    weight_names: ClassVar = {
        "torch": (
            (r"\.attn_last\.fc1\.", ".attn_last.conv_reduce."),
            (r"\.attn_last\.fc2\.", ".attn_last.conv_expand."),
        )
    }

    def __init__(
        self,
        depths: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.1,
        alpha: float = 0.2,
        group_size: int = 128,
        stem_width: int = 128,
        widths: tuple[int, int, int, int] = STAGE_CHANNELS,
    ) -> None:
        super().__init__()
        self.stem = DeepQuadStem(in_channels, stem_width)
        rates, block_idx, in_ch = linear_drop_path_rates(drop_path_rate, sum(depths)), 0, stem_width
        expected_var = 1.0
        stages = []
        for stage_idx, (depth, out_ch) in enumerate(zip(depths, widths, strict=True)):
            blocks = []
            for i in range(depth):
                stride = 2 if i == 0 and stage_idx > 0 else 1
                beta = 1.0 / math.sqrt(expected_var)
                blocks.append(NormFreeBlock(in_ch, out_ch, stride, alpha, beta, group_size, rates[block_idx]))
                # A stage's first block (projection shortcut) resets the expected variance; each block adds alpha².
                expected_var = (1.0 if i == 0 else expected_var) + alpha**2
                in_ch = out_ch
                block_idx += 1
            stages.append(nn.SequentialCell(blocks))
        self.stages = nn.SequentialCell(stages)
        self.num_features = 2 * widths[-1]
        self.final_conv = ScaledStdConv2d(in_ch, self.num_features, 1)
        self.final_act = GammaGELU()
        self.head = ClassifierHead(
            self.num_features, num_classes, drop_rate, weight_init=Normal(sigma=0.01), bias_init="zeros"
        )

    def forward_features(self, x: Tensor) -> Tensor:
        return self.final_act(self.final_conv(self.stages(self.stem(x))))

    def construct(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


@register_model
def nfnet_f0(**kwargs) -> NFNet:
    """NFNet-F0 (DeepMind variant): depths 1-2-6-3, 71.5 M parameters, 192 px train / 256 px test."""
    return NFNet((1, 2, 6, 3), **kwargs)


@register_model
def nfnet_test(**kwargs) -> NFNet:
    """Depths 1-2-1-1 at widths 32-96 with 8-channel groups (~0.1 M parameters): NFNet-F0's code path (projection
    and identity shortcuts, skip gains, SE) at a fraction of its cost, for tests; not for accuracy."""
    return NFNet((1, 2, 1, 1), group_size=8, stem_width=16, widths=(32, 48, 64, 96), **kwargs)
