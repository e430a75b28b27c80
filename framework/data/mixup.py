"""Batch-level Mixup (Zhang et al., 2018, arXiv:1710.09412) and CutMix (Yun et al., 2019, arXiv:1905.04899)
with label-smoothed soft targets, in NumPy for the ``mindspore.dataset`` pipeline. Semantics follow timm's
``timm/data/mixup.py`` (per-batch, per-pair or per-element parameters, mixing with the flipped batch, lambda
corrected to the pasted box area); randomness comes only from the caller's ``np.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal, get_args

import numpy as np

from framework.schema import Fraction, HalfOpenFraction, NonNegative, checked

MixupMode = Literal["batch", "pair", "elem"]  # dataset.mixup.mode
MODES = get_args(MixupMode)

Box = tuple[int, int, int, int]  # top, bottom, left, right (bottom/right exclusive)


def one_hot_smoothed(labels: np.ndarray, num_classes: int, smoothing: Annotated[float, HalfOpenFraction]) -> np.ndarray:
    """Labels → float32 (N, num_classes) targets: off ``smoothing / num_classes``, on ``1 - smoothing + off``."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got values in [{labels.min()}, {labels.max()}]")
    off = smoothing / num_classes
    targets = np.full((len(labels), num_classes), off, dtype=np.float32)
    targets[np.arange(len(labels)), labels] = 1.0 - smoothing + off
    return targets


def rand_bbox(height: int, width: int, lam: float, rng: np.random.Generator) -> Box:
    """CutMix box of sides ``sqrt(1 - lam)`` of the image around a uniform centre, clipped to the image."""
    ratio = np.sqrt(1.0 - lam)
    half_h, half_w = int(height * ratio) // 2, int(width * ratio) // 2
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    return max(cy - half_h, 0), min(cy + half_h, height), max(cx - half_w, 0), min(cx + half_w, width)


def rand_bbox_minmax(height: int, width: int, minmax: tuple[float, float], rng: np.random.Generator) -> Box:
    """CutMix box whose sides are uniform fractions in [min, max) of the image sides, placed inside the image."""
    cut_h, cut_w = (_uniform_side(size, minmax, rng) for size in (height, width))
    top, left = int(rng.integers(height - cut_h)), int(rng.integers(width - cut_w))
    return top, top + cut_h, left, left + cut_w


def _uniform_side(size: int, minmax: tuple[float, float], rng: np.random.Generator) -> int:
    low = int(size * minmax[0])
    # timm draws from [low, high); widen an empty range (small images) to the single value ``low``.
    return int(rng.integers(low, max(int(size * minmax[1]), low + 1)))


class Mixup:
    """Batch-level Mixup (Zhang et al., 2018) / CutMix (Yun et al., 2019) with soft targets, as timm's Mixup.

    Args mirror ``dataset.mixup``: ``mixup_alpha``/``cutmix_alpha`` are Beta(alpha, alpha) parameters (0 = off);
    ``cutmix_minmax`` = [min, max] side fractions of the CutMix box (turns CutMix on, with alpha 1 as timm);
    ``prob`` applies mixing per batch/pair/element; ``switch_prob`` picks CutMix when both are on; ``mode`` is
    ``batch``, ``pair`` or ``elem``; ``correct_lam`` recomputes lambda from the clipped box area;
    ``label_smoothing`` is folded into the targets.
    """

    @checked("dataset.mixup")
    def __init__(
        self,
        mixup_alpha: Annotated[float, NonNegative] = 0.0,
        cutmix_alpha: Annotated[float, NonNegative] = 0.0,
        cutmix_minmax: tuple[float, float] | None = None,
        prob: Annotated[float, Fraction] = 1.0,
        switch_prob: Annotated[float, Fraction] = 0.5,
        mode: MixupMode = "batch",
        correct_lam: bool = True,
        label_smoothing: Annotated[float, HalfOpenFraction] = 0.1,
    ) -> None:
        self.cutmix_minmax = None if cutmix_minmax is None else _check_minmax(cutmix_minmax)
        self.mixup_alpha = float(mixup_alpha)
        # As timm: a min/max box turns CutMix on, with alpha 1 only deciding whether a batch is mixed.
        self.cutmix_alpha = 1.0 if self.cutmix_minmax is not None else float(cutmix_alpha)
        self.prob, self.switch_prob = float(prob), float(switch_prob)
        self.mode, self.correct_lam, self.label_smoothing = mode, bool(correct_lam), float(label_smoothing)

    @property
    def active(self) -> bool:
        """Whether calls can change anything (some alpha > 0 or a min/max box, and ``prob`` > 0)."""
        return (self.mixup_alpha > 0.0 or self.cutmix_alpha > 0.0) and self.prob > 0.0

    def __call__(
        self, images: np.ndarray, labels: np.ndarray, num_classes: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mix a (N, C, H, W) batch; return new float32 images and (N, num_classes) float32 soft targets."""
        x = np.asarray(images, dtype=np.float32)
        labels = np.asarray(labels)
        if x.ndim != 4 or labels.shape != x.shape[:1]:
            raise ValueError(f"Mixup needs images (N, C, H, W) and labels (N,), got {x.shape} and {labels.shape}")
        n = len(x)
        if self.mode == "pair" and n % 2:
            raise ValueError(f"dataset.mixup.mode 'pair' needs an even batch size, got {n}")
        y = one_hot_smoothed(labels, num_classes, self.label_smoothing)
        mixed = x.copy()
        if not self.active:
            return mixed, y
        if self.mode == "batch":
            groups = [(slice(None), slice(None, None, -1))]
        elif self.mode == "pair":
            groups = [([i, n - 1 - i], [n - 1 - i, i]) for i in range(n // 2)]
        else:
            groups = [(i, n - 1 - i) for i in range(n)]
        lam = np.ones(n)
        for (dst, src), group_lam, use_cutmix in zip(groups, *self._params(len(groups), rng), strict=True):
            if group_lam == 1.0:
                continue
            if use_cutmix:
                (top, bottom, left, right), group_lam = self._cutmix_box(x.shape[-2:], group_lam, rng)
                mixed[dst, :, top:bottom, left:right] = x[src, :, top:bottom, left:right]
            else:
                mixed[dst] = x[dst] * group_lam + x[src] * (1.0 - group_lam)
            lam[dst] = group_lam
        lam = lam[:, None]
        return mixed, (lam * y + (1.0 - lam) * y[::-1]).astype(np.float32)

    def _params(self, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Lambda (1 where not applied) and the CutMix choice for ``count`` batches/pairs/elements."""
        if self.mixup_alpha > 0.0 and self.cutmix_alpha > 0.0:
            use_cutmix = rng.random(count) < self.switch_prob
            lam = np.where(
                use_cutmix,
                rng.beta(self.cutmix_alpha, self.cutmix_alpha, count),
                rng.beta(self.mixup_alpha, self.mixup_alpha, count),
            )
        elif self.mixup_alpha > 0.0:
            use_cutmix = np.zeros(count, dtype=bool)
            lam = rng.beta(self.mixup_alpha, self.mixup_alpha, count)
        else:
            use_cutmix = np.ones(count, dtype=bool)
            lam = rng.beta(self.cutmix_alpha, self.cutmix_alpha, count)
        applied = rng.random(count) < self.prob
        return np.where(applied, lam, 1.0), use_cutmix & applied

    def _cutmix_box(self, size: tuple[int, int], lam: float, rng: np.random.Generator) -> tuple[Box, float]:
        """Box to paste and the lambda it implies (area-corrected if ``correct_lam`` or a min/max box)."""
        height, width = size
        if self.cutmix_minmax is not None:
            box = rand_bbox_minmax(height, width, self.cutmix_minmax, rng)
        else:
            box = rand_bbox(height, width, lam, rng)
        if self.correct_lam or self.cutmix_minmax is not None:
            top, bottom, left, right = box
            lam = 1.0 - (bottom - top) * (right - left) / (height * width)
        return box, float(lam)


def _check_minmax(minmax: Sequence[float]) -> tuple[float, float]:
    message = f"dataset.mixup.cutmix_minmax must be [min, max] with 0 < min < max <= 1, got {minmax}"
    try:
        low, high = (float(v) for v in minmax)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not 0.0 < low < high <= 1.0:
        raise ValueError(message)
    return low, high
