"""NASNet-A: Learning Transferable Architectures for Scalable Image Recognition (Zoph et al., CVPR 2018).

https://arxiv.org/abs/1707.07012. The searched NASNet-A normal and reduction cells in the Mobile 4@1056
layout of Keras ``keras.applications.NASNetMobile`` (itself the TF-slim ``nasnet_mobile`` network): a
3×3/2 "valid" stem conv, two reduction stem cells, then three stacks of four normal cells separated by
reduction cells, with the previous cell's output as each cell's second input (``skip_reduction=False``).
The auxiliary head follows slim's ``_build_aux_head`` (Keras has none) and is attached to the last normal
cell of the second stack, as slim does for the mobile config.

Parameter names follow slim's scopes, flattened; Keras names in brackets:

- ``stem_conv``/``stem_bn``: slim ``conv0``/``conv0_bn`` [``stem_conv1``/``stem_bn1``];
- ``cell_stem_{0,1}``: slim ``cell_stem_{0,1}`` [``reduction_A_block_stem_{1,2}``];
- ``blocks.{0..13}``: slim ``cell_0..3``, ``reduction_cell_0``, ``cell_4..7``, ``reduction_cell_1``,
  ``cell_8..11`` [block ids ``0..3``, ``reduce_4``, ``5..8``, ``reduce_8``, ``9..12``];
- per cell: ``adjust`` — slim ``prev_1x1``/``prev_bn`` or ``path{1,2}_conv``/``final_path_bn``
  [``adjust_conv_projection``/``adjust_conv_{1,2}``, ``adjust_bn``]; ``conv_1x1`` — slim
  ``1x1``/``beginning_bn`` [``{normal,reduction}_conv_1``/``_bn_1``]; ``comb_iter_{k}_{left,right}`` —
  slim ``comb_iter_{k}/{left,right}`` [``{normal,reduction}_{left,right}{k+1}``, except that Keras calls
  the reduction cell's ``comb_iter_4_left`` "``reduction_left4``"], whose ``separable_{1,2}`` and
  ``bn_{1,2}`` are slim ``separable_KxK_{1,2}``/``bn_sep_KxK_{1,2}``
  [``separable_conv_{1,2}_*``/``separable_conv_{1,2}_bn_*``];
- ``head.fc``: slim ``final_layer/FC`` [``predictions``]; ``aux_head.{proj,bn0,conv,bn1,fc}``: slim
  ``aux_7/aux_logits/{proj,aux_bn0,Conv,aux_bn1,FC}``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import mindspore.nn as nn
import mindspore.ops as ops
from mindspore import Tensor
from mindspore.common.initializer import TruncatedNormal, XavierUniform

from framework.models.layers import ClassifierHead, DropPath
from framework.models.registry import register_model

STEM_FILTERS = 32
PENULTIMATE_FILTERS = 1056  # = 24 × the first stack's cell width (44): 6 branches × 4 × 44 at the last stack
NUM_BLOCKS = 4  # normal cells per stack
FILTER_MULTIPLIER = 2
# slim's aux head ends in a conv whose kernel covers the remaining map; at the native 224 px that is
# 14 px → 5×5/3 valid pool → 4 px. Parameters are fixed at construction, so the kernel is sized for 224 px.
AUX_KERNEL = 4
AUX_WIDTHS = (128, 768)  # slim's aux head: 1×1 projection, then the conv covering the map


def _he_normal(in_ch: int, kernel: int) -> TruncatedNormal:
    # Keras "he_normal": normal with std sqrt(2 / fan_in), truncated at 2 std (std rescaled for the cut).
    std = math.sqrt(2.0 / (in_ch * kernel * kernel)) / 0.87962566103423978
    return TruncatedNormal(sigma=std, a=-2.0 * std, b=2.0 * std)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, has_bias=False, weight_init=_he_normal(in_ch, 1))


def _bn(channels: int, momentum: float) -> nn.BatchNorm2d:
    # MindSpore's momentum, like TF's decay (0.9997 in the reference), is the weight kept on the running statistics.
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=momentum)


class PoolPad(nn.Cell):
    """Keras zero-pads before its 3×3/2 "valid" pools (``correct_pad``): (1, 1) on odd sizes, (0, 1) on even.

    The ``ops.Pad`` primitive, not ``ops.pad``/``nn.ZeroPad2d``: with MindSpore 2.8 on CPU, training steps through
    those hang after one to three steps in GRAPH_MODE. A cell, not a module function: amp_level=O1 recompiles
    ``construct`` from a rewritten copy of each class, which sees no module globals.
    """

    def construct(self, x: Tensor) -> Tensor:
        return ops.Pad(((0, 0), (0, 0), (x.shape[2] % 2, 1), (x.shape[3] % 2, 1)))(x)


class ReluConvBn(nn.Cell):
    """ReLU → 1×1 conv → BN: a cell's input projection and the previous-output projection."""

    def __init__(self, in_ch: int, out_ch: int, bn_momentum: float) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.conv = _conv1x1(in_ch, out_ch)
        self.bn = _bn(out_ch, bn_momentum)

    def construct(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(self.act(x)))


class FactorizedReduction(nn.Cell):
    """ReLU, then two strided 1×1 convs on the map and on the map shifted by one pixel, concatenated → BN.

    Halves the previous cell's output spatially without dropping every other pixel (slim
    ``factorized_reduction``; Keras's reduction ``_adjust_block``).
    """

    def __init__(self, in_ch: int, out_ch: int, bn_momentum: float) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.conv_1 = _conv1x1(in_ch, out_ch // 2, stride=2)
        # The shifted path: the map minus its first row and column, zero-padded back at the bottom/right.
        # The padding is its own op: MindSpore 2.8 writes a conv's uneven padding to ONNX in the wrong order.
        self.pad_2 = ops.Pad(((0, 0), (0, 0), (0, 1), (0, 1)))
        self.conv_2 = _conv1x1(in_ch, out_ch // 2, stride=2)
        self.bn = _bn(out_ch, bn_momentum)

    def construct(self, x: Tensor) -> Tensor:
        x = self.act(x)
        return self.bn(ops.concat((self.conv_1(x), self.conv_2(self.pad_2(x[:, :, 1:, 1:]))), axis=1))


class SeparableConv2d(nn.Cell):
    """Depthwise k×k (TF "SAME" padding, or ``symmetric``: k // 2 on every side) → pointwise 1×1, no bias: Keras
    ``SeparableConv2D``. The two paddings differ only at stride 2 on an even side, where "SAME" pads one pixel less
    before the map."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, symmetric: bool = False) -> None:
        super().__init__()
        padding = {"pad_mode": "pad", "padding": kernel // 2} if symmetric else {"pad_mode": "same"}
        self.depthwise = nn.Conv2d(
            in_ch, in_ch, kernel, stride=stride, group=in_ch, has_bias=False, weight_init=XavierUniform(), **padding
        )
        self.pointwise = nn.Conv2d(in_ch, out_ch, 1, has_bias=False, weight_init=XavierUniform())

    def construct(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class SeparableBranch(nn.Cell):
    """[ReLU → separable conv → BN] twice; only the first conv strides (Keras ``_separable_conv_block``)."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, bn_momentum: float, stride: int = 1, symmetric: bool = False
    ) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.separable_1 = SeparableConv2d(in_ch, out_ch, kernel, stride, symmetric)
        self.bn_1 = _bn(out_ch, bn_momentum)
        self.separable_2 = SeparableConv2d(out_ch, out_ch, kernel)
        self.bn_2 = _bn(out_ch, bn_momentum)

    def construct(self, x: Tensor) -> Tensor:
        x = self.bn_1(self.separable_1(self.act(x)))
        return self.bn_2(self.separable_2(self.act(x)))


class _CellBase(nn.Cell):
    """Shared start of both cells: adjust the previous output ``p``, project the input to ``h``.

    ``prev_ch=None`` marks the first stem cell, whose second input is its own input, used as is (Keras
    passes ``p=None``). Otherwise ``p`` is factorized-reduced when it is ``prev_stride`` times larger than
    the input, else 1×1-projected when its width differs from ``filters``. ``drop_path_rate`` drops each
    branch that is not an identity, as slim's ``_apply_drop_path`` does.
    """

    def __init__(
        self, in_ch: int, prev_ch: int | None, filters: int, prev_stride: int, drop_path_rate: float, bn_momentum: float
    ) -> None:
        super().__init__()
        if prev_ch is None:
            self.adjust, self.prev_ch = nn.Identity(), in_ch
        elif prev_stride == 2:
            self.adjust, self.prev_ch = FactorizedReduction(prev_ch, filters, bn_momentum), filters
        elif prev_ch != filters:
            self.adjust, self.prev_ch = ReluConvBn(prev_ch, filters, bn_momentum), filters
        else:
            self.adjust, self.prev_ch = nn.Identity(), filters
        self.conv_1x1 = ReluConvBn(in_ch, filters, bn_momentum)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()


class NormalCell(_CellBase):
    """NASNet-A normal cell (paper Fig. 4 left): five pairwise sums, concatenated with ``p`` → 6 × filters."""

    def __init__(
        self, in_ch: int, prev_ch: int | None, filters: int, prev_stride: int, drop_path_rate: float, bn_momentum: float
    ) -> None:
        super().__init__(in_ch, prev_ch, filters, prev_stride, drop_path_rate, bn_momentum)
        self.comb_iter_0_left = SeparableBranch(filters, filters, 5, bn_momentum)
        self.comb_iter_0_right = SeparableBranch(self.prev_ch, filters, 3, bn_momentum)
        self.comb_iter_1_left = SeparableBranch(self.prev_ch, filters, 5, bn_momentum)
        self.comb_iter_1_right = SeparableBranch(self.prev_ch, filters, 3, bn_momentum)
        self.avg_pool = nn.AvgPool2d(3, 1, pad_mode="same")  # TF "SAME": padding excluded from the mean
        self.comb_iter_4_left = SeparableBranch(filters, filters, 3, bn_momentum)

    def construct(self, x: Tensor, prev: Tensor) -> Tensor:
        p = self.adjust(prev)
        h = self.conv_1x1(x)
        dp = self.drop_path
        x0 = dp(self.comb_iter_0_left(h)) + dp(self.comb_iter_0_right(p))
        x1 = dp(self.comb_iter_1_left(p)) + dp(self.comb_iter_1_right(p))
        x2 = dp(self.avg_pool(h)) + p
        p_avg = self.avg_pool(p)
        x3 = dp(p_avg) + dp(p_avg)
        x4 = dp(self.comb_iter_4_left(h)) + h
        return ops.concat((p, x0, x1, x2, x3, x4), axis=1)


class ReductionCell(_CellBase):
    """NASNet-A reduction cell (paper Fig. 4 right): halves the map, outputs 4 × filters channels.

    ``padding``: Keras's (TF "SAME" convolutions; pools over the map zero-padded as Keras's ``correct_pad``), or
    mindcv's (pools with MindSpore's "same" padding, which leaves padding out of the max and the mean; its
    strided convolutions padded ``symmetric`` or "SAME", by cell: see ``NASNetAMobile``).
    """

    def __init__(
        self,
        in_ch: int,
        prev_ch: int | None,
        filters: int,
        prev_stride: int,
        drop_path_rate: float,
        bn_momentum: float,
        padding: Literal["keras", "mindcv"] = "keras",
        symmetric: bool = False,
    ) -> None:
        super().__init__(in_ch, prev_ch, filters, prev_stride, drop_path_rate, bn_momentum)
        self.comb_iter_0_left = SeparableBranch(filters, filters, 5, bn_momentum, 2, symmetric)
        self.comb_iter_0_right = SeparableBranch(self.prev_ch, filters, 7, bn_momentum, 2, symmetric)
        self.comb_iter_1_right = SeparableBranch(self.prev_ch, filters, 7, bn_momentum, 2, symmetric)
        self.comb_iter_2_right = SeparableBranch(self.prev_ch, filters, 5, bn_momentum, 2, symmetric)
        self.pool_pad = PoolPad() if padding == "keras" else nn.Identity()
        pool_padding = "valid" if padding == "keras" else "same"  # Keras: "valid" on the zero-padded h
        self.max_pool = nn.MaxPool2d(3, 2, pad_mode=pool_padding)
        self.avg_pool_2 = nn.AvgPool2d(3, 2, pad_mode=pool_padding)
        self.avg_pool_1 = nn.AvgPool2d(3, 1, pad_mode="same")
        self.comb_iter_4_left = SeparableBranch(filters, filters, 3, bn_momentum)

    def construct(self, x: Tensor, prev: Tensor) -> Tensor:
        p = self.adjust(prev)
        h = self.conv_1x1(x)
        h_pool = self.pool_pad(h)
        h_max = self.max_pool(h_pool)
        dp = self.drop_path
        x0 = dp(self.comb_iter_0_left(h)) + dp(self.comb_iter_0_right(p))
        x1 = dp(h_max) + dp(self.comb_iter_1_right(p))
        x2 = dp(self.avg_pool_2(h_pool)) + dp(self.comb_iter_2_right(p))
        x3 = x1 + dp(self.avg_pool_1(x0))
        x4 = dp(self.comb_iter_4_left(x0)) + dp(h_max)
        return ops.concat((x1, x2, x3, x4), axis=1)


class AuxHead(nn.Cell):
    """slim ``_build_aux_head``: ReLU → 5×5/3 avg pool → 1×1 conv 128 → BN → ReLU → conv 768 → BN → ReLU → FC.

    Small inputs: a map smaller than the 5×5 window (inputs below 67 px) is pooled globally instead. The
    768-filter conv covers the whole remaining map, as in slim, with its kernel sized for 224 px
    (``AUX_KERNEL``); maps of any other size are brought to that size by adaptive average pooling (an
    identity at 224 px; a 1×1 map is replicated, which makes the conv a dense layer over the pooled
    features), so the head's parameters do not depend on the input size. ``widths``: the two convs' filters.
    """

    def __init__(self, in_ch: int, num_classes: int, bn_momentum: float, widths: tuple[int, int] = AUX_WIDTHS) -> None:
        super().__init__()
        proj_ch, conv_ch = widths
        self.act = nn.ReLU()
        self.pool = nn.AvgPool2d(5, 3)
        self.proj = nn.Conv2d(in_ch, proj_ch, 1, has_bias=False, weight_init=XavierUniform())
        self.bn0 = _bn(proj_ch, bn_momentum)
        self.conv = nn.Conv2d(
            proj_ch, conv_ch, AUX_KERNEL, pad_mode="valid", has_bias=False, weight_init=XavierUniform()
        )
        self.bn1 = _bn(conv_ch, bn_momentum)
        self.fc = nn.Dense(conv_ch, num_classes, weight_init=XavierUniform(), bias_init="zeros")
        # an attribute, not the module constant: amp_level=O1 recompiles construct from a rewritten copy of the
        # class, which sees no module globals
        self.kernel = AUX_KERNEL

    def construct(self, x: Tensor) -> Tensor:
        x = self.act(x)
        # Shapes are static, so GRAPH_MODE resolves both branches at compile time.
        if x.shape[2] >= 5 and x.shape[3] >= 5:
            x = self.pool(x)
        else:
            x = x.mean((2, 3), keep_dims=True)
        x = self.act(self.bn0(self.proj(x)))
        if x.shape[2] != self.kernel or x.shape[3] != self.kernel:
            x = ops.adaptive_avg_pool2d(x, (self.kernel, self.kernel))
        x = self.act(self.bn1(self.conv(x)))
        return self.fc(x.reshape(x.shape[0], -1))


class NASNetAMobile(nn.Cell):
    """Stem conv → 2 reduction stem cells → 3 stacks of ``num_blocks`` (4) normal cells joined by reduction cells
    → classifier; the cells of the first stack are ``penultimate_filters / 24`` (44) filters wide, doubling per stack.

    ``construct`` returns ``(logits, aux_logits)`` while training with ``aux_factor > 0`` and ``logits``
    otherwise; ``head_loss_weights = (1.0, aux_factor)`` weights the two cross-entropies. Drop path uses
    slim's per-cell schedule ``drop_path_rate × (cell index + 1) / cells`` over all cells (16, stem cells
    included); slim additionally ramps it up over the training steps, which is left out here.
    ``bn_momentum`` is the weight kept on BatchNorm running statistics (TF decay): 0.9997 in the reference,
    which needs thousands of steps to settle; short runs want a smaller value. ``padding="mindcv"`` builds the
    network as mindcv's ``nasnet_a_4x1056`` (a port of Cadene's PyTorch NASNet) was trained: its stem cells and
    second reduction cell pad strided convolutions symmetrically, its first reduction cell as TF "SAME" (mindcv
    pads, convolves and crops to the same effect), and every reduction cell pools with "same" padding.
    """

    reduction = 32  # input pixels per pixel of the last feature map
    # depth order for layer-wise lr decay (optimizer.layer_decay): stem, stem cells, each cell; then both heads
    depth_patterns: ClassVar = (r"^stem_(conv|bn)\.", r"^cell_stem_(\d+)\.", r"^blocks\.(\d+)\.")
    classifiers: ClassVar = ("head.fc", "aux_head.fc")  # what depends on the class count (model.pretrained)
    # names of its twins' tensors → ours (model.pretrained). mindcv numbers normal cells as Cadene's port, counting
    # the reduction cells twice (cell_0-3, 6-9, 12-15): its cell_n is our block n - n // 6
    weight_names: ClassVar = {
        "mindcv": (
            (r"^conv0\.0\.", "stem_conv."),
            (r"^conv0\.1\.", "stem_bn."),
            (r"^cell_(\d+)\.", lambda m: f"blocks.{int(m[1]) - int(m[1]) // 6}."),
            (r"^reduction_cell_(\d)\.", lambda m: f"blocks.{4 + 5 * int(m[1])}."),
            (r"\.conv_1x1\.1\.", ".conv_1x1.conv."),
            (r"\.conv_1x1\.2\.", ".conv_1x1.bn."),
            (r"\.conv_prev_1x1\.1\.", ".adjust.conv."),
            (r"\.conv_prev_1x1\.2\.", ".adjust.bn."),
            (r"\.path_1\.1\.", ".adjust.conv_1."),
            (r"\.path_2\.2\.", ".adjust.conv_2."),
            (r"\.final_path_bn\.", ".adjust.bn."),
            (r"\.(depthwise|pointwise)_conv2d\.", r".\1."),
            (r"\.bn_sep_(\d)\.", r".bn_\1."),
            (r"^classifier\.", "head.fc."),
        ),
    }
    pretrained_settings: ClassVar = {"mindcv": lambda name: {"padding": "mindcv"}}  # as its weights were trained
    absent_parts: ClassVar = {"mindcv": ("aux_head",)}  # mindcv's model has no aux head: ours starts initialised

    @staticmethod
    def image_size_error(size: int) -> str | None:
        return "needs images of at least 3 px (its stem convolution has no padding)" if size < 3 else None

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        drop_rate: float = 0.5,
        drop_path_rate: float = 0.0,
        aux_factor: float = 0.4,
        bn_momentum: float = 0.9997,
        stem_filters: int = STEM_FILTERS,
        penultimate_filters: int = PENULTIMATE_FILTERS,
        num_blocks: int = NUM_BLOCKS,
        aux_widths: tuple[int, int] = AUX_WIDTHS,
        padding: Literal["keras", "mindcv"] = "keras",
    ) -> None:
        super().__init__()
        filters = penultimate_filters // 24
        total_cells = 2 + 3 * num_blocks + 2
        rates = [drop_path_rate * (i + 1) / total_cells for i in range(total_cells)]
        self.stem_conv = nn.Conv2d(
            in_channels, stem_filters, 3, stride=2, pad_mode="valid", has_bias=False,
            weight_init=_he_normal(in_channels, 3),
        )  # fmt: skip
        self.stem_bn = _bn(stem_filters, bn_momentum)
        stem_0_filters = filters // FILTER_MULTIPLIER**2
        stem_1_filters = filters // FILTER_MULTIPLIER
        symmetric = padding == "mindcv"
        self.cell_stem_0 = ReductionCell(
            stem_filters, None, stem_0_filters, 1, rates[0], bn_momentum, padding, symmetric
        )
        self.cell_stem_1 = ReductionCell(
            4 * stem_0_filters, stem_filters, stem_1_filters, 2, rates[1], bn_momentum, padding, symmetric
        )
        # Each cell sees (x, prev) = (previous output, the output before it); prev_stride is their size ratio.
        in_ch, prev_ch, prev_stride = 4 * stem_1_filters, 4 * stem_0_filters, 2
        blocks = []
        for stack in range(3):
            stack_filters = filters * FILTER_MULTIPLIER**stack
            if stack > 0:
                rate = rates[len(blocks) + 2]
                blocks.append(
                    ReductionCell(
                        in_ch, prev_ch, stack_filters, prev_stride, rate, bn_momentum, padding, symmetric and stack == 2
                    )
                )
                in_ch, prev_ch, prev_stride = 4 * stack_filters, in_ch, 2
            for _ in range(num_blocks):
                blocks.append(
                    NormalCell(in_ch, prev_ch, stack_filters, prev_stride, rates[len(blocks) + 2], bn_momentum)
                )
                in_ch, prev_ch, prev_stride = 6 * stack_filters, in_ch, 1
            if stack == 1:
                self.aux_index, aux_ch = len(blocks) - 1, in_ch
        self.blocks = nn.CellList(blocks)
        self.act = nn.ReLU()
        self.num_features = in_ch
        self.head = ClassifierHead(in_ch, num_classes, drop_rate, weight_init=XavierUniform(), bias_init="zeros")
        self.aux_head = AuxHead(aux_ch, num_classes, bn_momentum, aux_widths) if aux_factor > 0 else None
        self.head_loss_weights = (1.0, aux_factor)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images → (final ReLU'd feature map, output of the second stack's last normal cell for the aux head)."""
        x = self.stem_bn(self.stem_conv(x))
        x, prev = self.cell_stem_0(x, x), x
        x, prev = self.cell_stem_1(x, prev), x
        aux = x
        for i, block in enumerate(self.blocks):
            x, prev = block(x, prev), x
            if i == self.aux_index:
                aux = x
        return self.act(x), aux

    def construct(self, x: Tensor) -> tuple[Tensor, Tensor] | Tensor:
        features = self.forward_features(x)  # not unpacked: an unused aux map draws a GRAPH_MODE warning
        logits = self.head(features[0])
        if self.training and self.aux_head is not None:
            return logits, self.aux_head(features[1])
        return logits


@register_model
def nasnet_a_mobile(**kwargs) -> NASNetAMobile:
    """NASNet-A Mobile 4@1056: 5.3 M parameters at 1000 classes, 224 px."""
    return NASNetAMobile(**kwargs)


@register_model
def nasnet_test(**kwargs) -> NASNetAMobile:
    """NASNet-A 1@96 with an 8-channel stem and an 8/16-channel aux head (~0.03 M parameters): the Mobile model's
    code path (both cells, all three ways of adjusting the previous output, aux head) at a fraction of its cost,
    for tests; not for accuracy."""
    return NASNetAMobile(stem_filters=8, penultimate_filters=96, num_blocks=1, aux_widths=(8, 16), **kwargs)
