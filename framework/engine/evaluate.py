"""Evaluation: cross-entropy loss, top-1 and top-5 accuracy over a whole split."""

from __future__ import annotations

import mindspore.dataset as ds
import mindspore.nn as nn
import numpy as np


def evaluate(network: nn.Cell, loader: ds.Dataset) -> dict[str, float]:
    """Run ``network`` in inference mode over ``loader``; metrics are exact sums over every sample."""
    network.set_train(False)
    total, loss_sum, top1, top5 = 0, 0.0, 0, 0
    for images, labels in loader.create_tuple_iterator(num_epochs=1):
        logits = network(images).asnumpy().astype(np.float64)
        labels = labels.asnumpy()
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss_sum += float(-log_probs[np.arange(len(labels)), labels].sum())
        ranked = np.argsort(-logits, axis=1, kind="stable")
        top1 += int((ranked[:, 0] == labels).sum())
        top5 += int((ranked[:, :5] == labels[:, None]).any(axis=1).sum())
        total += len(labels)
    if total == 0:
        raise ValueError("evaluation split is empty")
    return {"loss": loss_sum / total, "top1": top1 / total, "top5": top5 / total}
