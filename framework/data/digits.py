"""scikit-learn's handwritten digits (1,797 real 8×8 grey images, 10 classes) as an image dataset.

Ships with scikit-learn, so the default job and the tests need no download. Images are made
3-channel uint8 once and split into fixed stratified train/val sets; from there they go through
the same pipeline (transforms, mixup, sharding) as an ImageNet folder.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from framework.data.pipeline import ClassList, ImageData, class_subset
from framework.schema import OpenFraction, Positive


class ArraySource:
    """In-memory images (N, H, W, 3) uint8 and labels (N,) as a random-access source."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels.astype(np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int) -> tuple[np.ndarray, np.int32, np.int64]:
        index = int(key) % len(self.labels)
        return self.images[index], self.labels[index], np.int64(key)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.images.tobytes() + self.labels.tobytes()).hexdigest()


class DigitsData(ImageData):
    """The digits set: ``val_fraction`` of it, stratified by class with ``split_seed``, is the val split."""

    def __init__(
        self,
        val_fraction: Annotated[float, OpenFraction],
        split_seed: int,
        num_classes: Annotated[int, Positive] = 10,
        classes: ClassList = None,
        **pipeline,
    ) -> None:
        super().__init__(**pipeline)
        digits = load_digits()
        # 0..16 grey levels → 0..255 uint8, HWC with three identical channels.
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        images = np.ascontiguousarray(np.repeat(images[..., None], 3, axis=-1))
        train_x, val_x, train_y, val_y = train_test_split(
            images, digits.target, test_size=val_fraction, stratify=digits.target, random_state=split_seed
        )  # the same split with or without a class subset: a subset's images are the same in either
        self.class_names, new_labels = class_subset([str(i) for i in range(10)], classes, "digits")
        if num_classes != len(self.class_names):
            kept = f"dataset.classes keeps {len(self.class_names)}" if classes is not None else "digits has 10"
            raise ValueError(
                f"dataset.num_classes={num_classes} but {kept}. Fix: dataset.num_classes={len(self.class_names)}"
            )
        self.sources = {
            split: ArraySource(x[new_labels[y] >= 0], new_labels[y][new_labels[y] >= 0])
            for split, x, y in (("train", train_x, train_y), ("val", val_x, val_y))
        }
        self.name = "digits"
        self.locations = {split: "sklearn.datasets.load_digits" for split in self.sources}
