"""A generated JPEG tree in ImageNet folder layout, for the data benchmark and tests (no download needed).

Each class has its own colour gradient and stripe frequency, plus per-image shapes and noise, so
files compress like photos (tens of kB at 500×375) and a model can learn the classes.
``dataset=synthetic_jpeg`` writes the tree once (reused while its spec is unchanged) and reads it
through the same folder pipeline as ImageNet.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
from PIL import Image, ImageDraw

from framework.data.folder import ImageFolderData
from framework.schema import Positive


def synthetic_image(rng: np.random.Generator, label: int, width: int, height: int) -> Image.Image:
    """One RGB image of class ``label``: class-coloured gradient and stripes, random ellipses, noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    hue = np.array([np.sin(label * 1.3), np.sin(label * 2.1 + 1.0), np.sin(label * 0.7 + 2.0)]) * 0.5 + 0.5
    stripes = 0.5 + 0.5 * np.sin((x * np.cos(label) + y * np.sin(label)) * (0.02 + 0.01 * label))
    base = (0.3 + 0.7 * hue[None, None, :]) * (96 + 128 * stripes[..., None] * (x / width)[..., None])
    noise = rng.integers(-24, 25, size=(height, width, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, width * 3 // 4 + 1)), int(rng.integers(0, height * 3 // 4 + 1))
        box = [
            x0,
            y0,
            x0 + int(rng.integers(width // 8, width // 2 + 1)),
            y0 + int(rng.integers(height // 8, height // 2 + 1)),
        ]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def write_image_folder(
    root: str | Path,
    num_classes: int,
    train_per_class: int,
    val_per_class: int,
    size: Sequence[int] = (500, 375),
    size_jitter: float = 0.2,
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Write ``root/{train,val}/class_XXX/*.JPEG`` (sizes ``size`` ± ``size_jitter``); reuse an identical tree.

    A ``spec.json`` at the root records the arguments; a tree with the same spec is not rewritten.
    """
    root = Path(root)
    spec = {
        "num_classes": num_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "size": list(size),
        "size_jitter": size_jitter,
        "seed": seed,
        "quality": quality,
    }
    marker = root / "spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label in range(num_classes):
            folder = root / split / f"class_{label:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                width, height = (int(s * rng.uniform(1 - size_jitter, 1 + size_jitter)) for s in size)
                synthetic_image(rng, label, width, height).save(folder / f"{split}_{i:05d}.JPEG", quality=quality)
    marker.write_text(json.dumps(spec))
    return root


class SyntheticFolderData(ImageFolderData):
    """An :class:`ImageFolderData` over a tree this class writes at ``path`` (``dataset=synthetic_jpeg``)."""

    def __init__(
        self,
        path: str,
        num_classes: Annotated[int, Positive] = 10,
        train_images: Annotated[int, Positive] = 2000,
        val_images: Annotated[int, Positive] = 100,
        image_size_wh: tuple[Annotated[int, Positive], Annotated[int, Positive]] = (500, 375),
        image_seed: int = 0,
        **folder,
    ) -> None:
        if train_images < num_classes or val_images < num_classes:
            raise ValueError(f"dataset.train_images and val_images need at least one image per class ({num_classes})")
        write_image_folder(
            path, num_classes, train_images // num_classes, val_images // num_classes, image_size_wh, seed=image_seed
        )
        super().__init__(path=path, num_classes=num_classes, **folder)
