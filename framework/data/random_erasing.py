"""Random Erasing (Zhong et al., 2020, arXiv:1708.04896) of one normalised CHW image, in NumPy for the
``mindspore.dataset`` pipeline. Semantics follow timm's ``timm/data/random_erasing.py`` (per-image probability,
1..count boxes sharing the erased area, log-uniform aspect ratio, up to 10 attempts per box, const/rand/pixel
fill); randomness comes only from the caller's ``np.random.Generator``.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, get_args

import numpy as np

from framework.schema import Fraction, Positive, checked

ErasingMode = Literal["pixel", "rand", "const"]  # dataset.augment.re_mode
MODES = get_args(ErasingMode)
ATTEMPTS = 10


class RandomErasing:
    """Random Erasing (Zhong et al., 2020, arXiv:1708.04896) on a normalised CHW image, as timm's RandomErasing.

    ``probability`` (``dataset.augment.re_prob``) erases an image at all; ``mode`` (``re_mode``) fills each box
    with per-pixel N(0, 1) noise (``pixel``), one N(0, 1) value per channel (``rand``) or zeros (``const``);
    each box covers a uniform fraction in [``min_area``, ``max_area``] of the image divided by the box count,
    drawn per image in [``min_count``, ``max_count``] (``re_count``); the aspect ratio (height / width) is
    log-uniform in [``min_aspect``, ``max_aspect``] (default ``1 / min_aspect``).
    """

    @checked("dataset.augment", probability="re_prob", mode="re_mode", max_count="re_count")
    def __init__(
        self,
        probability: Annotated[float, Fraction] = 0.25,
        mode: ErasingMode = "pixel",
        min_area: float = 0.02,
        max_area: float = 1 / 3,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        min_count: int = 1,
        max_count: Annotated[int, Positive] | None = None,
    ) -> None:
        # the settings of dataset.augment are checked from their annotations; these others are not config keys
        if not 0.0 <= min_area < max_area <= 1.0:
            raise ValueError(f"RandomErasing needs 0 <= min_area < max_area <= 1, got {min_area} and {max_area}")
        max_aspect = 1.0 / min_aspect if max_aspect is None and min_aspect > 0 else max_aspect
        if not 0.0 < min_aspect <= max_aspect:
            raise ValueError(f"RandomErasing needs 0 < min_aspect <= max_aspect, got {min_aspect} and {max_aspect}")
        if not isinstance(min_count, (int, np.integer)) or min_count < 1:
            raise ValueError(f"RandomErasing min_count must be an integer >= 1, got {min_count}")
        max_count = min_count if max_count is None else max_count
        if not isinstance(max_count, (int, np.integer)) or max_count < min_count:
            raise ValueError(
                f"dataset.augment.re_count (max boxes per image) must be an integer >= {min_count}, got {max_count}"
            )
        self.probability, self.mode = float(probability), mode
        self.min_area, self.max_area = float(min_area), float(max_area)
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.min_count, self.max_count = int(min_count), int(max_count)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Return a float32 copy of the (C, H, W) ``image`` with 0..count boxes erased."""
        out = np.array(image, dtype=np.float32)
        if out.ndim != 3:
            raise ValueError(f"RandomErasing needs a (C, H, W) image, got shape {out.shape}")
        if rng.random() >= self.probability:
            return out
        channels, height, width = out.shape
        if self.min_count == self.max_count:
            count = self.min_count
        else:
            count = int(rng.integers(self.min_count, self.max_count + 1))
        for _ in range(count):
            for _ in range(ATTEMPTS):
                area = rng.uniform(self.min_area, self.max_area) * height * width / count
                aspect = math.exp(rng.uniform(*self.log_aspect))
                h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if h < height and w < width:
                    top, left = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
                    out[:, top : top + h, left : left + w] = self._fill((channels, h, w), rng)
                    break
        return out

    def _fill(self, shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
        if self.mode == "pixel":
            return rng.standard_normal(shape, dtype=np.float32)
        if self.mode == "rand":
            return rng.standard_normal((shape[0], 1, 1), dtype=np.float32)
        return np.zeros((shape[0], 1, 1), dtype=np.float32)
