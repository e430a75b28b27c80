"""The loader every image source shares: sampler → decode → transforms → batch → mixup/cutmix.

A source is random access: ``len(source)`` items, ``source[key]`` → (HWC uint8 RGB image, int32
label, key) for the item ``key % len(source)``. Sources differ only in where images come from.
"""

from __future__ import annotations

import logging
import os
from typing import Annotated, Protocol

import mindspore.dataset as ds
import mindspore.dataset.transforms as T
import numpy as np
from mindspore import dtype as mstype

from framework.data.mixup import Mixup
from framework.data.sampler import ShardSampler, shard_size
from framework.data.transforms import Interpolation, TrainAugment, eval_ops
from framework.schema import Positive, Range

Size = Annotated[int, Positive]  # pixels, images per batch, workers
Rgb = tuple[float, float, float]  # dataset.mean, on the 0..1 scale

SPLITS = ("train", "val")
log = logging.getLogger(__name__)


ClassList = list[str | int] | None  # dataset.classes: class names to keep, in their new label order


def class_subset(class_names: list[str], classes: ClassList, dataset: str) -> tuple[list[str], np.ndarray]:
    """The classes ``classes`` keeps, in the order given (their new labels 0..k-1), and for every old label its
    new one (-1: left out); all of ``class_names`` when ``classes`` is None. An unknown or repeated name is a
    ValueError naming ``dataset``'s classes."""
    if classes is None:
        return list(class_names), np.arange(len(class_names))
    kept = [str(name) for name in classes]
    unknown = [name for name in kept if name not in class_names]
    if unknown or len(set(kept)) != len(kept) or not kept:
        problem = f"no class {unknown[0]!r} in" if unknown else "must name distinct classes of"
        shown = ", ".join(class_names[:12]) + (" ..." if len(class_names) > 12 else "")
        raise ValueError(f"dataset.classes={kept}: {problem} {dataset} (its classes: {shown})")
    new_labels = np.full(len(class_names), -1, dtype=np.int32)
    for label, name in enumerate(kept):
        new_labels[class_names.index(name)] = label
    return kept, new_labels


def class_count(classes: ClassList, default: int) -> int:
    """``${class_count:${dataset.classes},10}``: how many classes a dataset with that subset has."""
    return len(classes) if classes else default


class ImageSource(Protocol):
    labels: np.ndarray  # the label of every item, in order

    def __len__(self) -> int: ...

    def __getitem__(self, key: int) -> tuple[np.ndarray, np.int32, np.int64]: ...

    def fingerprint(self) -> str:
        """sha256 of what defines the split (file list and labels, or the arrays)."""
        ...


class ImageData:
    """Train/val loaders of one dataset: ``loader(split, shard_id, num_shards)`` gives batches of
    (float32 NCHW images, labels); train labels are soft targets (N, num_classes) when mixup/cutmix is on.

    Subclasses fill ``self.sources`` (split → source), ``self.class_names``, ``self.name`` and
    ``self.locations`` (split → where its images come from) and call ``super().__init__``.
    """

    sources: dict[str, ImageSource]
    class_names: list[str]
    name: str
    locations: dict[str, str]

    def __init__(
        self,
        image_size: Size,
        batch_size: Size,
        eval_batch_size: Size,
        mean: Rgb,
        std: tuple[Annotated[float, Positive], Annotated[float, Positive], Annotated[float, Positive]],
        augment: TrainAugment,
        mixup: Mixup | None = None,
        eval_image_size: Size | None = None,
        crop_pct: Annotated[float, Range(0, 1, low_inclusive=False)] = 0.875,
        interpolation: Interpolation = "bilinear",
        num_parallel_workers: Size = 2,
        python_multiprocessing: bool = False,
        prefetch_size: Size = 16,
        seed: int = 0,
    ) -> None:
        self.image_size, self.eval_image_size = image_size, eval_image_size or image_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.mean, self.std = list(mean), list(std)
        self.augment, self.mixup = augment, mixup if mixup is not None and mixup.active else None
        self.crop_pct, self.interpolation = crop_pct, interpolation
        cores = os.cpu_count() or 1
        if num_parallel_workers > cores:  # MindSpore refuses more workers than cores
            log.warning("dataset.num_parallel_workers=%d > %d cores here; using %d", num_parallel_workers, cores, cores)
        self.workers = min(num_parallel_workers, cores)
        self.python_multiprocessing = python_multiprocessing
        self.prefetch_size, self.seed = prefetch_size, seed

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def bad_images(self) -> list[str]:
        """Files found unreadable (and skipped) so far; in-memory sources have none."""
        return []

    def health_metrics(self) -> dict[str, float]:
        """Per-epoch data-health figures for MLflow (file-reading sources count skipped images)."""
        return {}

    def fingerprint(self) -> dict[str, str | int]:
        """Item counts and content hashes per split, logged with each run to tell datasets apart."""
        return {
            key: value
            for split, source in self.sources.items()
            for key, value in ((f"{split}_items", len(source)), (f"{split}_sha256", source.fingerprint()))
        }

    def class_counts(self) -> dict[str, list[int]]:
        """Images per class (in label order) of each split."""
        return {
            split: np.bincount(np.asarray(source.labels), minlength=self.num_classes).tolist()
            for split, source in self.sources.items()
        }

    def classes_missing_from_val(self) -> list[str]:
        """Classes the train split has and the val split lacks: their accuracy is never measured."""
        counts = self.class_counts()
        return [
            name
            for name, train, val in zip(self.class_names, counts["train"], counts["val"], strict=True)
            if train and not val
        ]

    def num_samples(self, split: str) -> int:
        return len(self.sources[split])

    def steps_per_epoch(self, num_shards: int = 1) -> int:
        """Full train batches per epoch on each of ``num_shards`` ranks (the last partial batch is dropped)."""
        return shard_size(len(self.sources["train"]), num_shards, pad=True) // self.batch_size

    def loader(self, split: str, shard_id: int = 0, num_shards: int = 1, epoch: int = 0) -> ds.Dataset:
        """Batched pipeline for ``split`` from ``epoch`` on; train is shuffled, augmented and padded to equal shards.

        Everything random depends on (``seed``, epoch, sample), so the pipeline made for epoch ``e``
        of a resumed run gives the batches an uninterrupted run saw in that epoch.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
        training = split == "train"
        ds.config.set_prefetch_size(self.prefetch_size)
        ds.config.set_seed((self.seed * 1_000_003 + epoch) % 2**32)  # seeds the C++ random ops (crop, flip) below
        sampler = ShardSampler(
            len(self.sources[split]), training, self.seed, shard_id, num_shards, pad=training, first_epoch=epoch
        )
        # The generator only emits keys; loading runs as a map op. (GeneratorDataset's own worker threads
        # install MindSpore's C signal handlers in this process, which would kill it on SIGTERM/Ctrl-C.)
        dataset = ds.GeneratorDataset(SampleKeys(sampler.num_items), column_names=["key"], sampler=sampler)
        dataset = dataset.map(
            self.sources[split].__getitem__,
            input_columns=["key"],
            output_columns=["image", "label", "key"],
            num_parallel_workers=self.workers,
            python_multiprocessing=self.python_multiprocessing,
        )
        dataset = dataset.map(T.TypeCast(mstype.int32), input_columns="label")
        if training:
            dataset = self.augment.apply(
                dataset,
                self.image_size,
                self.mean,
                self.std,
                self.interpolation,
                self.seed,
                self.workers,
                self.python_multiprocessing,
            )
        else:
            ops = eval_ops(self.eval_image_size, self.crop_pct, self.interpolation, self.mean, self.std)
            dataset = dataset.map(ops, input_columns="image", num_parallel_workers=self.workers)
        dataset = dataset.batch(self.batch_size if training else self.eval_batch_size, drop_remainder=training)
        if training and self.mixup is not None:
            dataset = dataset.map(
                KeyedMixup(self.mixup, self.num_classes, self.seed),
                input_columns=["image", "label", "key"],
                output_columns=["image", "label", "key"],
            )
        return dataset.project(["image", "label"])


class SampleKeys:
    """What the sampler indexes: item ``key`` is the key itself (sources decode it as ``key % len``)."""

    def __init__(self, num_items: int) -> None:
        self.num_items = num_items

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, key: int) -> tuple[np.int64]:
        return (np.int64(key),)


class KeyedMixup:
    """Mixup/CutMix of one batch, seeded by the batch's first sample key (deterministic)."""

    def __init__(self, mixup: Mixup, num_classes: int, seed: int) -> None:
        self.mixup, self.num_classes, self.seed = mixup, num_classes, seed

    def __call__(self, images: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, ...]:
        rng = np.random.default_rng([self.seed, int(keys[0]), 2])
        mixed, targets = self.mixup(images, labels, self.num_classes, rng)
        return mixed, targets, keys
