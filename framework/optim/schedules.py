"""Learning-rate schedules (``scheduler/`` configs), evaluated per optimisation step.

Each schedule returns one float32 value per step for the whole run; the optimizer takes the
array as a dynamic learning rate and indexes it by its own global step, so the lr position is
part of the optimizer state. Warmup is linear from ``warmup_lr`` to ``lr`` over ``warmup_epochs``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _with_warmup(
    decay: np.ndarray, lr: float, warmup_lr: float, warmup_epochs: float, steps_per_epoch: int
) -> np.ndarray:
    """Replace the first ``warmup_epochs`` of ``decay`` (per-step lr) by a linear ramp to ``lr``."""
    warmup_steps = min(int(round(warmup_epochs * steps_per_epoch)), len(decay))
    if warmup_steps > 0:
        decay[:warmup_steps] = warmup_lr + (lr - warmup_lr) * np.arange(warmup_steps) / warmup_steps
    return decay.astype(np.float32)


def cosine(
    lr: float,
    epochs: int,
    steps_per_epoch: int,
    min_lr: float = 0.0,
    warmup_epochs: float = 0.0,
    warmup_lr: float = 0.0,
) -> np.ndarray:
    """Cosine decay from ``lr`` to ``min_lr`` over the steps after warmup (Loshchilov & Hutter 2017)."""
    total = epochs * steps_per_epoch
    warmup_steps = min(int(round(warmup_epochs * steps_per_epoch)), total)
    progress = np.clip((np.arange(total) - warmup_steps) / max(total - warmup_steps, 1), 0.0, 1.0)
    decay = min_lr + 0.5 * (lr - min_lr) * (1.0 + np.cos(np.pi * progress))
    return _with_warmup(decay, lr, warmup_lr, warmup_epochs, steps_per_epoch)


def multistep(
    lr: float,
    epochs: int,
    steps_per_epoch: int,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
    warmup_lr: float = 0.0,
) -> np.ndarray:
    """Multiply ``lr`` by ``gamma`` at each epoch in ``milestones`` (the ResNeXt recipe's ``lr_epochs``)."""
    epoch_of_step = np.arange(epochs * steps_per_epoch) // steps_per_epoch
    decay = lr * gamma ** np.searchsorted(np.asarray(sorted(milestones)), epoch_of_step, side="right")
    return _with_warmup(decay.astype(np.float64), lr, warmup_lr, warmup_epochs, steps_per_epoch)
