"""Conformer: Local Features Coupling Global Representations for Visual Recognition (Peng et al., ICCV 2021).

https://arxiv.org/abs/2105.03889. A ResNet-style CNN branch (bottleneck ``ConvBlock``s) and a ViT-style
transformer branch (patch embedding on the stem output, cls token, no positional embedding) run side by
side and exchange features at every block through the Feature Coupling Units: ``FCUDown`` (1×1 conv,
average pool, LayerNorm, GELU) turns the bottleneck's middle feature map into tokens added to the
transformer input, ``FCUUp`` (1×1 conv, BatchNorm, ReLU, nearest upsample) turns the tokens back into a
map added before the 3×3 conv of the fusion bottleneck. Each branch has its own classifier; training sums
the two cross-entropies and evaluation sums the two logits. Layout, initialisation and parameter names
follow the official code (github.com/pengzhiliang/Conformer, ``conformer.py``): ``conv1``/``bn1`` stem,
``conv_1`` + ``trans_patch_conv`` + ``trans_1`` (stage 1), ``conv_trans_{2..depth}.{cnn_block,
fusion_block,squeeze_block,expand_block,trans_block}``, ``cls_token``, ``trans_norm``,
``trans_cls_head``, ``conv_cls_head``. MindSpore names differ only in the norm layers: BatchNorm
``gamma``/``beta``/``moving_mean``/``moving_variance`` (torch ``weight``/``bias``/``running_mean``/
``running_var``) and LayerNorm ``gamma``/``beta`` (torch ``weight``/``bias``).
"""

from __future__ import annotations

import math
from typing import ClassVar

from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import HeNormal, TruncatedNormal, initializer

from framework.models.layers import DropPath, StemMaxPool, linear_drop_path_rates
from framework.models.registry import register_model

BASE_CHANNELS = 64  # stem width and stage-1 CNN width at channel ratio 1


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0, has_bias: bool = False) -> nn.Conv2d:
    # Kaiming normal (fan_out, ReLU) weights; a bias, where present, keeps the torch default init.
    return nn.Conv2d(
        in_ch, out_ch, kernel, stride=stride, pad_mode="pad", padding=padding, has_bias=has_bias,
        weight_init=HeNormal(mode="fan_out", nonlinearity="relu"),
    )  # fmt: skip


def _bn(channels: int, eps: float = 1e-6) -> nn.BatchNorm2d:
    # eps 1e-6 in the bottlenecks and FCUUp, torch's default 1e-5 in the stem; torch momentum 0.1.
    return nn.BatchNorm2d(channels, eps=eps, momentum=0.9)


def _layer_norm(dim: int, eps: float = 1e-6) -> nn.LayerNorm:
    return nn.LayerNorm((dim,), epsilon=eps)


def _dense(in_features: int, out_features: int, has_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        in_features, out_features, weight_init=TruncatedNormal(sigma=0.02), bias_init="zeros", has_bias=has_bias
    )


def _dropout(rate: float) -> nn.Cell:
    return nn.Dropout(p=rate) if rate > 0 else nn.Identity()


class Mlp(nn.Cell):
    """Transformer feed-forward: Linear → GELU → dropout → Linear → dropout."""

    def __init__(self, dim: int, hidden: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.fc1 = _dense(dim, hidden)
        self.act = nn.GELU(approximate=False)
        self.fc2 = _dense(hidden, dim)
        self.drop = _dropout(drop_rate)

    def construct(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Cell):
    """Multi-head self-attention with a fused ``qkv`` projection; dropout after the output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = _dense(dim, dim * 3, has_bias=qkv_bias)
        self.proj = _dense(dim, dim)
        self.proj_drop = _dropout(drop_rate)
        self.matmul_qk = ops.BatchMatMul(transpose_b=True)
        self.matmul_av = ops.BatchMatMul()

    def construct(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ops.softmax(self.matmul_qk(q, k) * self.scale, axis=-1)
        x = self.matmul_av(attn, v).transpose(0, 2, 1, 3).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(x))


class Block(nn.Cell):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)), both residuals with drop path."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_rate: float, drop_path_rate: float
    ) -> None:
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, drop_rate)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop_rate)

    def construct(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvBlock(nn.Cell):
    """ResNet bottleneck (1×1 → 3×3 with the stride → 1×1, width ``out_ch / 4``) with an optional projection.

    ``construct(x, x_t)`` adds the coupled transformer map ``x_t`` to the input of the 3×3 conv; with
    ``return_mid`` it returns ``(output, middle map after the 3×3 conv)``, the middle map feeding ``FCUDown``.
    """

    expansion = 4

    def __init__(
        self, in_ch: int, out_ch: int, stride: int = 1, res_conv: bool = False, return_mid: bool = False
    ) -> None:
        super().__init__()
        mid = out_ch // self.expansion
        self.conv1 = _conv(in_ch, mid, 1)
        self.bn1 = _bn(mid)
        self.conv2 = _conv(mid, mid, 3, stride=stride, padding=1)
        self.bn2 = _bn(mid)
        self.conv3 = _conv(mid, out_ch, 1)
        self.bn3 = _bn(out_ch)
        self.act = nn.ReLU()
        self.res_conv = res_conv
        self.return_mid = return_mid
        if res_conv:
            self.residual_conv = _conv(in_ch, out_ch, 1, stride=stride)
            self.residual_bn = _bn(out_ch)

    def construct(self, x: Tensor, x_t: Tensor | None = None) -> tuple[Tensor, Tensor] | Tensor:
        shortcut = self.residual_bn(self.residual_conv(x)) if self.res_conv else x
        out = self.act(self.bn1(self.conv1(x)))
        if x_t is not None:
            out = out + x_t
        mid = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(mid))
        out = self.act(out + shortcut)
        if self.return_mid:
            return out, mid
        return out


class FCUDown(nn.Cell):
    """CNN map → tokens: 1×1 conv to ``embed_dim``, ``dw_stride`` average pool, LayerNorm, GELU; the cls token
    of ``x_t`` is prepended."""

    def __init__(self, in_ch: int, embed_dim: int, dw_stride: int) -> None:
        super().__init__()
        self.conv_project = _conv(in_ch, embed_dim, 1, has_bias=True)
        self.sample_pooling = nn.AvgPool2d(kernel_size=dw_stride, stride=dw_stride)
        self.ln = _layer_norm(embed_dim)
        self.act = nn.GELU(approximate=False)

    def construct(self, x: Tensor, x_t: Tensor) -> Tensor:
        x = self.sample_pooling(self.conv_project(x))
        x = x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1)
        x = self.act(self.ln(x))
        return ops.concat((x_t[:, :1], x), axis=1)


class FCUUp(nn.Cell):
    """Tokens → CNN map: drop the cls token, fold to the ``(H / up_stride, W / up_stride)`` grid, 1×1 conv,
    BatchNorm, ReLU, nearest upsample to ``(H, W)``."""

    def __init__(self, embed_dim: int, out_ch: int, up_stride: int) -> None:
        super().__init__()
        self.up_stride = up_stride
        self.conv_project = _conv(embed_dim, out_ch, 1, has_bias=True)
        self.bn = _bn(out_ch)
        self.act = nn.ReLU()

    def construct(self, x: Tensor, height: int, width: int) -> Tensor:
        batch, _, dim = x.shape
        x = x[:, 1:].transpose(0, 2, 1).reshape(batch, dim, height // self.up_stride, width // self.up_stride)
        x = self.act(self.bn(self.conv_project(x)))
        b, c, h, w = x.shape
        if h * self.up_stride == height and w * self.up_stride == width:
            # nearest upsampling by a whole factor repeats each value; unlike ResizeNearestNeighbor it exports to ONNX
            x = ops.tile(x.reshape(b, c, h, 1, w, 1), (1, 1, 1, self.up_stride, 1, self.up_stride))
            return x.reshape(b, c, height, width)
        return ops.interpolate(x, size=(height, width), mode="nearest")


class ConvTransBlock(nn.Cell):
    """One coupled step: bottleneck ``cnn_block`` → ``squeeze_block`` (FCUDown) → transformer ``trans_block`` →
    ``expand_block`` (FCUUp) → ``fusion_block`` bottleneck (stride 2 with projection when ``last_fusion``)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        res_conv: bool,
        stride: int,
        dw_stride: int,
        embed_dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_rate: float,
        drop_path_rate: float,
        last_fusion: bool = False,
    ) -> None:
        super().__init__()
        mid = out_ch // ConvBlock.expansion
        self.cnn_block = ConvBlock(in_ch, out_ch, stride=stride, res_conv=res_conv, return_mid=True)
        if last_fusion:
            self.fusion_block = ConvBlock(out_ch, out_ch, stride=2, res_conv=True)
        else:
            self.fusion_block = ConvBlock(out_ch, out_ch)
        self.squeeze_block = FCUDown(mid, embed_dim, dw_stride)
        self.expand_block = FCUUp(embed_dim, mid, dw_stride)
        self.trans_block = Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, drop_path_rate)

    def construct(self, x: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
        x, mid = self.cnn_block(x)
        x_t = self.trans_block(self.squeeze_block(mid, x_t) + x_t)
        x_t_up = self.expand_block(x_t, mid.shape[2], mid.shape[3])
        return self.fusion_block(x, x_t_up), x_t


class Conformer(nn.Cell):
    """Stem → ``conv_1`` bottleneck ∥ patch embedding + ``trans_1`` → ``depth - 1`` ConvTransBlocks → CNN head
    (global average pool → linear) and transformer head (LayerNorm on the cls token → linear).

    With ``conv_1``/``trans_1`` the blocks form three stages of ``depth / 3`` (CNN width ×1, ×2, ×4 of
    ``base_channels · channel_ratio``, FCU stride ``patch_size / 4``, ``/ 8``, ``/ 16``); the first block of
    stages 2 and 3 and the last fusion block have stride 2 and a projection shortcut. ``base_channels`` is also
    the stem width (64; the official code fixes the stem at 64 and calls the stage width ``base_channel``).

    ``drop_rate`` is the official one: dropout after the attention projection and in the MLP, not before the
    heads. While training, ``construct`` returns ``(conv_logits, trans_logits)`` (loss: the sum of their
    cross-entropies, weights ``head_loss_weights``); in evaluation it returns their sum.
    """

    reduction = 32  # input pixels per pixel of the last feature map
    # depth order for layer-wise lr decay (optimizer.layer_decay): the stems, each CNN-transformer stage, the
    # final norm; then both heads
    depth_patterns: ClassVar = (
        r"^(cls_token|conv1|bn1|conv_1|trans_patch_conv|trans_1)(\.|$)",
        r"^conv_trans_(\d+)\.",
        r"^trans_norm\.",
    )
    classifiers: ClassVar = ("conv_cls_head", "trans_cls_head")  # what depends on the class count (model.pretrained)

    @staticmethod
    def image_size_error(size: int) -> str | None:
        """The CNN branch (stride 4, then 4 more) and the patch tokens must tile the same grid."""
        if math.ceil(size / 4) % 4:
            return (
                "needs an image size that is a multiple of 16 (e.g. 32, 224): its CNN and transformer grids must match"
            )
        return None

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        patch_size: int = 16,
        channel_ratio: int = 1,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        base_channels: int = BASE_CHANNELS,
    ) -> None:
        super().__init__()
        if depth % 3 != 0:
            raise ValueError(f"Conformer depth must be a multiple of 3, got {depth}")
        self.head_loss_weights = (1.0, 1.0)
        self.num_features = embed_dim
        # Stochastic depth on the transformer blocks only, linear from 0 over the depth (official ``trans_dpr``).
        dpr = linear_drop_path_rates(drop_path_rate, depth)
        block_args = (embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate)

        self.conv1 = _conv(in_channels, base_channels, 7, stride=2, padding=3)
        self.bn1 = _bn(base_channels, eps=1e-5)
        self.act1 = nn.ReLU()
        self.maxpool = StemMaxPool()

        stage_channels = [int(base_channels * channel_ratio * 2**stage) for stage in range(3)]
        trans_dw_stride = patch_size // 4  # the stem already reduces by 4
        self.conv_1 = ConvBlock(base_channels, stage_channels[0], res_conv=True)
        self.trans_patch_conv = _conv(base_channels, embed_dim, trans_dw_stride, stride=trans_dw_stride, has_bias=True)
        self.trans_1 = Block(*block_args, dpr[0])
        self.cls_token = Parameter(initializer(TruncatedNormal(sigma=0.02), (1, 1, embed_dim)), name="cls_token")

        blocks_per_stage, in_ch, names = depth // 3, stage_channels[0], []
        for i in range(2, depth + 1):
            stage = (i - 1) // blocks_per_stage
            first = stage > 0 and (i - 1) % blocks_per_stage == 0
            block = ConvTransBlock(
                in_ch, stage_channels[stage], res_conv=first, stride=2 if first else 1,
                dw_stride=trans_dw_stride // 2**stage, embed_dim=embed_dim, num_heads=num_heads,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate, drop_path_rate=dpr[i - 1],
                last_fusion=i == depth,
            )  # fmt: skip
            names.append(f"conv_trans_{i}")
            setattr(self, names[-1], block)
            in_ch = stage_channels[stage]
        self.conv_trans_names = tuple(names)

        self.trans_norm = _layer_norm(embed_dim, eps=1e-5)
        self.trans_cls_head = _dense(embed_dim, num_classes)
        self.conv_cls_head = _dense(in_ch, num_classes)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images → (final CNN map, final tokens with the cls token first)."""
        x_base = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.conv_1(x_base)
        x_t = self.trans_patch_conv(x_base)
        x_t = x_t.reshape(x_t.shape[0], x_t.shape[1], -1).transpose(0, 2, 1)
        cls_tokens = ops.tile(self.cls_token, (x_t.shape[0], 1, 1))
        x_t = self.trans_1(ops.concat((cls_tokens, x_t), axis=1))
        for name in self.conv_trans_names:
            x, x_t = getattr(self, name)(x, x_t)
        return x, x_t

    def construct(self, x: Tensor) -> tuple[Tensor, Tensor] | Tensor:
        x, x_t = self.forward_features(x)
        conv_logits = self.conv_cls_head(x.mean((2, 3)))
        trans_logits = self.trans_cls_head(self.trans_norm(x_t)[:, 0])
        if self.training:
            return conv_logits, trans_logits
        return conv_logits + trans_logits


@register_model
def conformer_ti(**kwargs) -> Conformer:
    """Conformer-Ti (patch 16, channel ratio 1, embed 384, depth 12, 6 heads): 23.5 M parameters, 224 px."""
    return Conformer(**kwargs)


@register_model
def conformer_test(**kwargs) -> Conformer:
    """Depth 6, embed 32, 2 heads, CNN widths 16-64 (~0.1 M parameters): Conformer-Ti's code path (all three
    stages, both kinds of coupled block, both heads) at a fraction of its cost, for tests; not for accuracy."""
    return Conformer(base_channels=16, embed_dim=32, depth=6, num_heads=2, **kwargs)
