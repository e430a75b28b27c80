"""Loss over one or several classifier heads (NASNet's auxiliary head, Conformer's two heads)."""

from __future__ import annotations

from typing import Annotated

import mindspore.nn as nn
import mindspore.ops as ops
from mindspore import Tensor

from framework.schema import HalfOpenFraction


class CrossEntropy(nn.Cell):
    """Cross-entropy on class indices with label smoothing, or on soft targets (mixup/cutmix).

    Soft targets already carry the smoothing (``dataset.mixup.label_smoothing`` folds it in, as
    timm's SoftTargetCrossEntropy expects), so they are scored as given: ``-Σ t·log_softmax(z)``.
    """

    def __init__(self, label_smoothing: Annotated[float, HalfOpenFraction] = 0.0) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def construct(self, logits: Tensor, labels: Tensor) -> Tensor:
        if labels.ndim == logits.ndim:
            return -(labels * ops.log_softmax(logits, -1)).sum(-1).mean()
        return ops.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


class HeadsLoss(nn.Cell):
    """``network(images)`` → loss; a network returning several logits while training is scored head by head.

    The total is ``Σ w_i · loss_fn(logits_i, labels)`` with ``w = network.head_loss_weights``
    (e.g. ``(1.0, aux_factor)`` for NASNet, ``(1.0, 1.0)`` for Conformer); a single-head network
    gives plain ``loss_fn(logits, labels)``.
    """

    def __init__(self, network: nn.Cell, loss_fn: nn.Cell) -> None:
        super().__init__(auto_prefix=False)
        self.network = network
        self.loss_fn = loss_fn
        self.weights = tuple(float(w) for w in getattr(network, "head_loss_weights", (1.0,)))

    def construct(self, images: Tensor, labels: Tensor) -> Tensor:
        outputs = self.network(images)
        if not isinstance(outputs, tuple):
            return self.loss_fn(outputs, labels)
        loss = self.weights[0] * self.loss_fn(outputs[0], labels)
        for i in range(1, len(outputs)):
            loss = loss + self.weights[i] * self.loss_fn(outputs[i], labels)
        return loss
