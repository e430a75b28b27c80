"""scikit-learn's handwritten digits (1,797 real 8×8 grey images, 10 classes) as an image dataset.

Ships with scikit-learn, so the default job and the tests need no download. Images are made
3-channel uint8 once, split into fixed stratified train/val sets, then resized, normalised,
shuffled and batched through ``mindspore.dataset`` like any other image source.
"""

from __future__ import annotations

from collections.abc import Sequence

import mindspore.dataset as ds
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from framework.data.pipeline import batch_images


class DigitsData:
    """Train/val loaders over the digits set; ``loader('train'|'val')`` returns a batched pipeline."""

    num_classes = 10
    class_names = [str(i) for i in range(10)]

    def __init__(
        self,
        image_size: int,
        batch_size: int,
        eval_batch_size: int,
        val_fraction: float,
        split_seed: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_parallel_workers: int = 2,
        num_classes: int = 10,
    ) -> None:
        if num_classes != self.num_classes:
            raise ValueError(f"dataset.num_classes must be 10 for digits, got {num_classes}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"dataset.val_fraction must be in (0, 1), got {val_fraction}")
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.mean, self.std = list(mean), list(std)
        self.num_parallel_workers = num_parallel_workers
        digits = load_digits()
        # 0..16 grey levels → 0..255 uint8, HWC with three identical channels.
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        images = np.repeat(images[..., None], 3, axis=-1)
        labels = digits.target.astype(np.int32)
        train_x, val_x, train_y, val_y = train_test_split(
            images, labels, test_size=val_fraction, stratify=labels, random_state=split_seed
        )
        self._splits = {"train": (train_x, train_y), "val": (val_x, val_y)}

    def num_samples(self, split: str) -> int:
        return len(self._splits[split][1])

    def loader(self, split: str, shard_id: int = 0, num_shards: int = 1) -> ds.Dataset:
        """Batched pipeline of (image CHW float32, label int32); the train split is shuffled."""
        training = split == "train"
        images, labels = self._splits[split]
        source = ds.NumpySlicesDataset(
            {"image": images, "label": labels}, shuffle=training, num_shards=num_shards, shard_id=shard_id
        )
        return batch_images(
            source,
            resize=self.image_size,
            mean=self.mean,
            std=self.std,
            batch_size=self.batch_size if training else self.eval_batch_size,
            drop_remainder=training,
            num_parallel_workers=self.num_parallel_workers,
        )
