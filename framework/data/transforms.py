"""Per-image train and eval transforms, as timm's ``create_transform`` orders them, on ``mindspore.dataset``.

Train: RandomResizedCrop → horizontal flip → auto-augment (RandAugment/AutoAugment string) → normalise →
HWC→CHW → RandomErasing. Eval: resize the shorter side to ``int(size / crop_pct)`` → center crop.
Geometric ops are MindSpore's C++ ops; auto-augment and erasing are NumPy/PIL ops seeded per sample
from the sampler's key, so a seed fixes every augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import mindspore.dataset as ds
import mindspore.dataset.vision as vision
import numpy as np

from framework.data.auto_augment import AutoAugment, parse_auto_augment
from framework.data.random_erasing import ErasingMode, RandomErasing
from framework.schema import Fraction, Positive

Interpolation = Literal["bilinear", "bicubic", "nearest"]  # dataset.interpolation
INTERPOLATIONS = {"bilinear": vision.Inter.BILINEAR, "bicubic": vision.Inter.BICUBIC, "nearest": vision.Inter.NEAREST}


def interpolation_mode(name: Interpolation) -> vision.Inter:
    return INTERPOLATIONS[name]


def normalize_ops(mean: Sequence[float], std: Sequence[float]) -> list:
    """uint8 HWC → float32 CHW with ``mean``/``std`` given on the 0..1 scale (as timm writes them)."""
    return [vision.Normalize(mean=[m * 255.0 for m in mean], std=[s * 255.0 for s in std]), vision.HWC2CHW()]


@dataclass
class TrainAugment:
    """Train-time augmentation settings (``dataset.augment``); names follow timm and the seed recipes."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: Annotated[float, Fraction] = 0.5
    auto_augment: str | None = None
    re_prob: Annotated[float, Fraction] = 0.0
    re_mode: ErasingMode = "pixel"
    re_count: Annotated[int, Positive] = 1

    def __post_init__(self) -> None:
        self.scale, self.ratio = tuple(self.scale), tuple(self.ratio)
        for name, pair, upper in (("scale", self.scale, 1.0), ("ratio", self.ratio, math.inf)):
            if len(pair) != 2 or not 0 < pair[0] <= pair[1] <= upper:  # a relation of two values: not a Range
                bound = "<= 1" if upper == 1.0 else ""
                raise ValueError(f"dataset.augment.{name} must be [min, max] with 0 < min <= max {bound}, got {pair}")
        # Fail at build time, not in a worker thread mid-epoch.
        if self.auto_augment:
            parse_auto_augment(self.auto_augment)
        self.erasing = (
            RandomErasing(self.re_prob, mode=self.re_mode, max_count=self.re_count) if self.re_prob > 0 else None
        )

    def apply(
        self,
        dataset: ds.Dataset,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: Interpolation,
        seed: int,
        workers: int,
        python_multiprocessing: bool,
    ) -> ds.Dataset:
        """Map the train transforms over a dataset with ``image`` (HWC uint8) and ``key`` columns."""
        geometry = [vision.RandomResizedCrop(image_size, self.scale, self.ratio, interpolation_mode(interpolation))]
        if self.hflip > 0:
            geometry.append(vision.RandomHorizontalFlip(self.hflip))
        dataset = dataset.map(geometry, input_columns="image", num_parallel_workers=workers)
        if self.auto_augment:
            augment = AutoAugment(self.auto_augment, image_size, mean, interpolation, seed)
            dataset = dataset.map(
                augment,
                input_columns=["image", "key"],
                output_columns=["image", "key"],
                num_parallel_workers=workers,
                python_multiprocessing=python_multiprocessing,
            )
        dataset = dataset.map(normalize_ops(mean, std), input_columns="image", num_parallel_workers=workers)
        if self.erasing is not None:
            dataset = dataset.map(
                KeyedErasing(self.erasing, seed),
                input_columns=["image", "key"],
                output_columns=["image", "key"],
                num_parallel_workers=workers,
                python_multiprocessing=python_multiprocessing,
            )
        return dataset


class KeyedErasing:
    """RandomErasing drawing its randomness from the sample key (deterministic under any worker count)."""

    def __init__(self, erasing: RandomErasing, seed: int) -> None:
        self.erasing, self.seed = erasing, seed

    def __call__(self, image: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(key), 1])
        return self.erasing(image, rng), key


def eval_resize_size(image_size: int, crop_pct: float) -> int:
    """Shorter side before the center crop, as timm: ``floor(image_size / crop_pct)``."""
    return math.floor(image_size / crop_pct)


def eval_ops(
    image_size: int, crop_pct: float, interpolation: Interpolation, mean: Sequence[float], std: Sequence[float]
) -> list:
    """Resize the shorter side to ``image_size / crop_pct``, center-crop ``image_size``, normalise (the values of
    ``dataset.*``, in the ranges ``ImageData`` declares)."""
    return [
        vision.Resize(eval_resize_size(image_size, crop_pct), interpolation_mode(interpolation)),
        vision.CenterCrop(image_size),
        *normalize_ops(mean, std),
    ]
