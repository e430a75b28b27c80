"""Layers shared across model families."""

from __future__ import annotations

from typing import ClassVar, Literal

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
from mindspore import Tensor
from mindspore.common.initializer import Initializer

from framework.models.kernels import ANY_SIZE, activation, conv2d, depthwise_conv2d, spec


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Round a scaled channel count to a multiple of ``divisor``, never more than 10 % below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


def linear_drop_path_rates(max_rate: float, count: int) -> list[float]:
    """Stochastic-depth rate per block, growing linearly from 0 to ``max_rate`` (Huang et al. 2016)."""
    return [max_rate * i / max(count - 1, 1) for i in range(count)]


def broadcast_product(x: Tensor, factor: Tensor, training: bool) -> Tensor:
    """``x * factor`` for a tensor ``factor`` that broadcasts (per sample, per channel, or a scalar tensor). In
    training the factor is first broadcast to x's shape: MindSpore's backward of the implicit broadcast kept about
    seven more x-sized buffers (one MBConv block, 144 channels on 56×56, batch 16: 459 → 265 MiB a step)."""
    if training:
        return x * ops.broadcast_to(factor, x.shape)
    return x * factor


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
        # the per-sample mask is scaled, not the map: the backward keeps no scaled copy of x (EfficientNet-B2 at
        # 64 px, batch 32: peak RSS 1,993 -> 1,942 MiB)
        return broadcast_product(x, mask / self.keep_prob, True)


class FusedActivation(nn.Cell):
    """An element-wise activation times a constant ``scale``. Float32 training on the CPU runs this project's fused
    kernel (``framework/models/kernels/activations.cc``), whose backward keeps only the input; MindSpore's autodiff
    of ``formula`` keeps every intermediate and runs one kernel per operation. Inference, export and other devices
    run ``formula``."""

    FLOAT32 = ms.float32  # class attributes: MindSpore's AMP recompiles construct without module globals
    kernel_name: ClassVar[Literal["Gelu", "Silu"]]

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.scale_tensor = Tensor([scale], ms.float32)
        self.kernel = activation(self.kernel_name)

    def construct(self, x: Tensor) -> Tensor:
        # under mixed precision (amp_level O2/O3) MindSpore casts every op's inputs in the cell to float16, the
        # kernel's too: it takes float32 only
        full_precision = self.mixed_precision_type is None
        if self.training and self.kernel is not None and x.dtype == self.FLOAT32 and full_precision:
            return self.kernel(x, self.scale_tensor)
        return self.formula(x)

    def formula(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class SiLU(FusedActivation):
    """SiLU ("swish", x · sigmoid(x)) times ``scale``."""

    kernel_name = "Silu"

    def formula(self, x: Tensor) -> Tensor:
        return x * ops.sigmoid(x) * self.scale


class KernelConv2d(nn.Conv2d):
    """MindSpore's ``Conv2d`` (same weights and names) whose float32 training on the CPU runs ``self.kernel``, one of
    this project's kernels (``framework/models/kernels``), on inputs of ``self.min_pixels`` to ``self.max_pixels``
    pixels (H·W, a constant when the graph compiles); inference, export, other sizes and devices run MindSpore's."""

    FLOAT32 = ms.float32  # a class attribute: MindSpore's AMP recompiles construct without module globals
    min_pixels = 0
    max_pixels = ANY_SIZE

    def construct(self, x: Tensor) -> Tensor:
        # mixed precision casts every op's inputs to float16 (FusedActivation); the size is a graph constant
        pixels = x.shape[2] * x.shape[3]
        fits = self.min_pixels <= pixels and pixels <= self.max_pixels and self.mixed_precision_type is None
        if self.training and self.kernel is not None and x.dtype == self.FLOAT32 and fits:
            out = self.kernel(x, self.weight, self.spec)
        else:
            out = self.conv2d(x, self.weight)
        return self.bias_add(out, self.bias) if self.has_bias else out


class DepthwiseConv2d(KernelConv2d):
    """k×k depthwise convolution (one channel per group) with zero padding k//2 and no bias; CPU training runs the
    project's kernel (EfficientNet-B2 trains 1.2-1.3x faster than on MindSpore 2.8's)."""

    def __init__(self, channels: int, kernel: int, stride: int = 1, weight_init: Initializer | str = "normal") -> None:
        super().__init__(
            channels, channels, kernel, stride=stride, pad_mode="pad", padding=kernel // 2, group=channels,
            has_bias=False, weight_init=weight_init,
        )  # fmt: skip
        self.kernel = depthwise_conv2d(kernel, stride)
        self.spec = spec(stride)


class BlasConv2d(KernelConv2d):
    """k×k convolution with zero padding k//2; CPU training runs the project's OpenBLAS kernel (``convolution.cc``)
    on the layers and sizes where it is the faster one (``kernels.conv2d``). ``weight_init``/``bias_init`` default
    to MindSpore's."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        has_bias: bool = False,
        weight_init: Initializer | str | None = None,
        bias_init: Initializer | str | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel, stride=stride, pad_mode="pad", padding=kernel // 2, group=groups,
            has_bias=has_bias, weight_init=weight_init, bias_init=bias_init,
        )  # fmt: skip
        self.kernel, self.min_pixels, self.max_pixels = conv2d(in_channels, kernel, stride, groups) or (None, 0, 0)
        self.spec = spec(stride)


class StemMaxPool(nn.Cell):
    """3×3 / 2 max pooling with 1-pixel padding of a non-negative (post-ReLU) map, as ResNet stems.

    Zero padding then unpadded pooling gives the same maximum as padding with -inf when inputs are
    non-negative, and exports to ONNX; ``nn.MaxPool2d(pad_mode="pad")`` lowers to MaxPool3DWithArgmax,
    which MindSpore 2.8's ONNX exporter refuses. The zero border is concatenated: MindSpore's CPU ``Pad``
    kernel made this layer ~5 % of ResNeXt-50's step, concatenation a quarter of that. Export sets
    ``concat_border = False`` (``engine.export.exportable``): the traced concatenation would fix the batch size.

    ``padding="same"`` pads as TensorFlow and MindSpore's ``pad_mode="same"`` do (mindcv's ResNets): an even side
    gets its one pixel after the map only, which shifts the pooling windows by one pixel.
    """

    def __init__(self, padding: Literal["symmetric", "same"] = "symmetric") -> None:
        super().__init__()
        self.concat_border = True
        self.padding = padding
        self.pad = ops.Pad(((0, 0), (0, 0), (1, 1), (1, 1)))
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2)

    def construct(self, x: Tensor) -> Tensor:
        (top, bottom), (left, right) = self._pads(x.shape[2]), self._pads(x.shape[3])
        if not self.concat_border:
            pad = self.pad if self.padding == "symmetric" else ops.Pad(((0, 0), (0, 0), (top, bottom), (left, right)))
            return self.pool(pad(x))
        rows = ops.zeros_like(x[:, :, :1, :])
        x = ops.concat((rows,) * top + (x,) + (rows,) * bottom, 2)
        columns = ops.zeros_like(x[:, :, :, :1])
        return self.pool(ops.concat((columns,) * left + (x,) + (columns,) * right, 3))

    def _pads(self, size: int) -> tuple[int, int]:
        """(before, after) padding of a side of ``size`` pixels."""
        if self.padding == "symmetric" or size % 2:
            return 1, 1
        return 0, 1


class SpatialMean(nn.Cell):
    """Mean over (H, W), kept as (N, C, 1, 1). With ``product``, training takes it as a product with a column of
    1 / (H·W): MindSpore 2.8's CPU ReduceMean with its backward (a Tile) took 2-2.5x as long (a squeeze-excite gate,
    forward and backward, batch 32: 1536 channels on 4 × 4 15.3 -> 8.1 ms, 256 on 16 × 16 39.4 -> 15.8). Inference
    and export keep the mean (ONNX ReduceMean)."""

    def __init__(self, product: bool = False) -> None:
        super().__init__()
        self.product = product

    def construct(self, x: Tensor) -> Tensor:
        if not (self.training and self.product):
            return x.mean((2, 3), keep_dims=True)
        n, c, h, w = x.shape
        column = ops.full((h * w, 1), 1.0 / (h * w), dtype=x.dtype)
        return ops.matmul(x.reshape(n * c, h * w), column).reshape(n, c, 1, 1)


class SqueezeExcite(nn.Cell):
    """Squeeze-and-excitation (Hu et al. 2018): channel gates from globally pooled features, pooled in training as
    ``SpatialMean(product=True)`` (64 px, batch 32: NFNet-F0 16.1 -> 17.1 img/s; EfficientNet-B2 63.0 -> 68.4, three
    runs each, for 20 MiB more at its peak)."""

    def __init__(self, channels: int, reduced: int, act: type[nn.Cell] = nn.ReLU) -> None:
        super().__init__()
        self.pool = SpatialMean(product=True)
        self.conv_reduce = BlasConv2d(channels, reduced, 1, has_bias=True)
        self.act = act()
        self.conv_expand = BlasConv2d(reduced, channels, 1, has_bias=True)
        self.gate = nn.Sigmoid()

    def construct(self, x: Tensor) -> Tensor:
        return broadcast_product(x, self.excitation(x), self.training)

    def excitation(self, x: Tensor) -> Tensor:
        """The channel gates (N, C, 1, 1) for ``x``: a block may fold its other factors into them before the product."""
        return self.gate(self.conv_expand(self.act(self.conv_reduce(self.pool(x)))))


class ClassifierHead(nn.Cell):
    """Global average pool → dropout → linear classifier.

    Pooling is a mean over (H, W) rather than ``nn.AdaptiveAvgPool2d`` so the head exports to ONNX.
    ``weight_init``/``bias_init`` default to MindSpore's (the same as PyTorch's ``nn.Linear``).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        drop_rate: float = 0.0,
        weight_init: Initializer | str | None = None,
        bias_init: Initializer | str | None = None,
    ) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Dense(in_features, num_classes, weight_init=weight_init, bias_init=bias_init)

    def construct(self, x: Tensor) -> Tensor:
        x = x.mean((2, 3))
        return self.fc(self.dropout(x))
