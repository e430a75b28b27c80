"""Pipeline steps shared by every image source: resize, normalise, HWC→CHW, batch."""

from __future__ import annotations

from collections.abc import Sequence

import mindspore as ms
import mindspore.dataset as ds
import mindspore.dataset.transforms as T
import mindspore.dataset.vision as vision


def batch_images(
    source: ds.Dataset,
    resize: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    drop_remainder: bool,
    num_parallel_workers: int,
) -> ds.Dataset:
    """Map uint8 HWC images to normalised float32 CHW tensors of ``resize``² pixels and batch them.

    ``mean``/``std`` are given on the 0..1 scale (as timm and torchvision write them).
    """
    image_ops = [
        vision.Resize((resize, resize), interpolation=vision.Inter.BILINEAR),
        vision.Normalize(mean=[m * 255.0 for m in mean], std=[s * 255.0 for s in std]),
        vision.HWC2CHW(),
    ]
    source = source.map(image_ops, input_columns="image", num_parallel_workers=num_parallel_workers)
    source = source.map(T.TypeCast(ms.int32), input_columns="label", num_parallel_workers=num_parallel_workers)
    return source.batch(batch_size, drop_remainder=drop_remainder)
