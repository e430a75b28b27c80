"""Image folders in ImageNet layout: ``<path>/train/<class>/*.JPEG`` and ``<path>/val/<class>/*.JPEG``.

Class folders sorted by name give the label indices (as torchvision's ImageFolder and MindSpore's
ImageFolderDataset). Layout problems are reported before training; an unreadable image met during
an epoch is skipped (replaced by the next readable one, so epochs keep their length), warned about
by file name and recorded in a log the trainer counts — or, with ``on_bad_image=error``, stops the run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from PIL import Image

from framework.data.pipeline import ClassList, ImageData, class_subset
from framework.errors import UserError
from framework.schema import Positive

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
MAX_CONSECUTIVE_BAD = 50
log = logging.getLogger(__name__)


class BadImageError(UserError, RuntimeError):
    """An image file cannot be decoded (with ``dataset.on_bad_image=error``, or too many in a row)."""

    kind = "data error"


def scan_split(split_dir: Path, classes: list[str] | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """(class names, file paths, labels) of one split folder; with ``classes``, labels index that list.

    Raises ValueError naming the folder when it is missing, has no class folders, has empty class
    folders, or (with ``classes``) has class folders the train split does not have.
    """
    if not split_dir.is_dir():
        raise ValueError(f"{split_dir}: no such folder; expected one sub-folder per class holding its images")
    found = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not found:
        raise ValueError(f"{split_dir}: no class folders; expected {split_dir}/<class name>/<image files>")
    if classes is not None:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(
                f"{split_dir}: {len(unknown)} class folder(s) not in the train split: {', '.join(unknown[:5])}"
            )
    index = {name: i for i, name in enumerate(classes if classes is not None else found)}
    files, labels, empty = [], [], []
    for name in found:
        images = sorted(
            entry.path
            for entry in os.scandir(split_dir / name)
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not images:
            empty.append(name)
        files += images
        labels += [index[name]] * len(images)
    if empty:
        raise ValueError(
            f"{split_dir}: {len(empty)} class folder(s) without images ({', '.join(IMAGE_EXTENSIONS)}): "
            f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}. Add images or remove the folder(s)"
        )
    return found, files, np.asarray(labels, dtype=np.int32)


class FolderSource:
    """Image files decoded with Pillow to RGB; unreadable files are skipped or fatal (``on_bad_image``)."""

    def __init__(self, files: list[str], labels: np.ndarray, on_bad_image: str, bad_image_log: Path | None) -> None:
        self.files, self.labels = files, labels
        self.on_bad_image, self.bad_image_log = on_bad_image, bad_image_log
        self._reported: set[str] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        """Hash of the file list (paths relative to the split folder) and labels; contents are not read."""
        root = os.path.commonpath(self.files) if len(self.files) > 1 else os.path.dirname(self.files[0])
        listing = "".join(f"{os.path.relpath(f, root)}\t{y}\n" for f, y in zip(self.files, self.labels, strict=True))
        return hashlib.sha256(listing.encode()).hexdigest()

    def __getitem__(self, key: int) -> tuple[np.ndarray, np.int32, np.int64]:
        index = int(key) % len(self.files)
        for _ in range(MAX_CONSECUTIVE_BAD):
            path = self.files[index]
            try:
                with Image.open(path) as image:
                    return np.asarray(image.convert("RGB")), self.labels[index], np.int64(key)
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                if self.on_bad_image == "error":
                    raise BadImageError(
                        f"cannot read image {path}: {err}. Replace or delete the file, "
                        "or set dataset.on_bad_image=skip to skip unreadable images"
                    ) from err
                self._report(path, err)
                index = (index + 1) % len(self.files)
        raise BadImageError(f"{MAX_CONSECUTIVE_BAD} unreadable images in a row up to {path}; is the dataset intact?")

    def _report(self, path: str, err: Exception) -> None:
        with self._lock:
            if path in self._reported:
                return
            self._reported.add(path)
            log.warning("skipping unreadable image %s (%s)", path, err)
            if self.bad_image_log is not None:
                self.bad_image_log.parent.mkdir(parents=True, exist_ok=True)
                with open(self.bad_image_log, "a") as out:
                    out.write(f"{path}\t{str(err).splitlines()[0] if str(err) else type(err).__name__}\n")


def read_bad_image_log(path: Path | None) -> list[str]:
    """Distinct files recorded as unreadable so far (worker processes append to the same log)."""
    if path is None or not path.is_file():
        return []
    return sorted({line.split("\t", 1)[0] for line in path.read_text().splitlines() if line})


class ImageFolderData(ImageData):
    """``path/train_dir`` and ``path/val_dir`` in ImageNet folder layout, checked before training."""

    def __init__(
        self,
        path: str,
        train_dir: str = "train",
        val_dir: str = "val",
        num_classes: Annotated[int, Positive] | None = None,
        on_bad_image: Literal["skip", "error"] = "skip",
        bad_image_log: str | None = None,
        classes: ClassList = None,
        **pipeline,
    ) -> None:
        super().__init__(**pipeline)
        root = Path(path).expanduser()
        if not root.is_dir():
            raise ValueError(
                f"dataset.path={path}: no such folder. Point it at a folder holding {train_dir}/ and {val_dir}/, "
                "each with one sub-folder of images per class (ImageNet layout)"
            )
        self.bad_image_log = Path(bad_image_log) if bad_image_log else None
        folders, train_files, train_labels = scan_split(root / train_dir)
        _, val_files, val_labels = scan_split(root / val_dir, folders)
        self.class_names, new_labels = class_subset(folders, classes, str(root / train_dir))
        if num_classes is not None and num_classes != len(self.class_names):
            kept = "dataset.classes keeps" if classes is not None else f"{root / train_dir} has"
            raise ValueError(
                f"dataset.num_classes={num_classes} but {kept} {len(self.class_names)} class folders. Fix "
                "dataset.num_classes (or null to take the folder count) or the dataset"
            )
        self.sources = {
            split: FolderSource(
                [f for f, keep in zip(files, new_labels[labels] >= 0, strict=True) if keep],
                new_labels[labels][new_labels[labels] >= 0],
                on_bad_image,
                self.bad_image_log,
            )
            for split, files, labels in (("train", train_files, train_labels), ("val", val_files, val_labels))
        }
        self.name = root.resolve().name
        self.locations = {"train": str((root / train_dir).resolve()), "val": str((root / val_dir).resolve())}

    def bad_images(self) -> list[str]:
        return read_bad_image_log(self.bad_image_log)

    def health_metrics(self) -> dict[str, float]:
        return {"data_bad_images": len(self.bad_images())}
