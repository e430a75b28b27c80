"""Evaluation: cross-entropy loss, top-1 and top-5 accuracy over a whole split (or its shards, summed over ranks)."""

from __future__ import annotations

import mindspore.dataset as ds
import mindspore.nn as nn
import numpy as np

from framework.engine.inference import Forward, mindspore_forward
from framework.runtime.world import SINGLE_PROCESS, World


def evaluate(model: nn.Cell | Forward, loader: ds.Dataset, world: World = SINGLE_PROCESS) -> dict[str, float]:
    """Run ``model`` (a network, in inference mode, or an engine's images → logits) over ``loader``; metrics are
    exact sums over every sample.

    With several ranks each passes its shard of the split and the sums are added over ranks, so every
    rank returns the metrics of the whole split.
    """
    forward = mindspore_forward(model) if isinstance(model, nn.Cell) else model
    total, loss_sum, top1, top5 = 0, 0.0, 0, 0
    for images, labels in loader.create_tuple_iterator(num_epochs=1, output_numpy=True):
        logits = forward(images).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss_sum += float(-log_probs[np.arange(len(labels)), labels].sum())
        ranked = np.argsort(-logits, axis=1, kind="stable")
        top1 += int((ranked[:, 0] == labels).sum())
        top5 += int((ranked[:, :5] == labels[:, None]).any(axis=1).sum())
        total += len(labels)
    if world.size > 1:
        loss_sum, top1, top5, total = world.all_reduce_sum(np.array([loss_sum, top1, top5, total]))
        top1, top5, total = round(top1), round(top5), round(total)
    if total == 0:
        raise ValueError("evaluation split is empty")
    return {"loss": float(loss_sum) / total, "top1": top1 / total, "top5": top5 / total}
