"""RandAugment (Cubuk et al., 2020, arXiv:1909.13719) and AutoAugment (Cubuk et al., 2019, arXiv:1805.09501)
on one HWC uint8 RGB image, parsed from timm's strings (``rand-m9-mstd0.5-inc1``, ``original-mstd0.5``) with
timm's op set, magnitude→argument mapping and policy tables, in Pillow + NumPy. Every random draw of a call
comes from a generator seeded by (seed, sample key), so a seed fixes the augmentation under any worker count.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

LEVEL_DENOM = 10.0  # magnitude m maps to the fraction m / LEVEL_DENOM of each op's range (timm's _LEVEL_DENOM)
TRANSLATE_PCT = 0.45  # RandAugment's relative translation at m = 10 (timm's default hparam)
INTERPOLATIONS = {
    "bicubic": (Image.Resampling.BICUBIC,),
    "bilinear": (Image.Resampling.BILINEAR,),
    "nearest": (Image.Resampling.NEAREST,),
    "random": (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC),  # one drawn per geometric op, as timm
}
EXPECTED = (
    "expected rand-m<magnitude>[-n<ops>][-mstd<std>][-mmax<max>][-inc<0|1>][-p<prob>] "
    "or one of original, originalr, v0, v0r (optionally followed by -mstd<std>)"
)

RAND_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)  # fmt: skip

SubPolicy = tuple[tuple[str, float, int], ...]  # (op name, probability, magnitude) applied in order

# ImageNet policy of the AutoAugment paper (its Table 9, as timm transcribes it).
_ORIGINAL: tuple[SubPolicy, ...] = (
    (("PosterizeOriginal", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
    (("PosterizeOriginal", 0.6, 7), ("PosterizeOriginal", 0.6, 6)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, 4), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 7)),
    (("PosterizeOriginal", 0.8, 5), ("Equalize", 1.0, 2)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, 8), ("PosterizeOriginal", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, 2)),
    (("Equalize", 0.0, 7), ("Equalize", 0.8, 8)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, 8)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 9)),
    (("Color", 0.4, 0), ("Equalize", 0.6, 3)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
)
# ImageNet policy of the TPU EfficientNet implementation.
_V0: tuple[SubPolicy, ...] = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)),
    (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)),
    (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)),
    (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)),
    (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)),
    (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)),
    (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)),
    (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)),
    (("Rotate", 1.0, 7), ("TranslateYRel", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)),
    (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)),
    (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)),
    (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)


def _renamed(policy: tuple[SubPolicy, ...], old: str, new: str) -> tuple[SubPolicy, ...]:
    return tuple(tuple((new if name == old else name, p, m) for name, p, m in sub) for sub in policy)


# The "r" variants use the research Posterize, whose bits discarded increase with magnitude.
POLICIES: dict[str, tuple[SubPolicy, ...]] = {
    "original": _ORIGINAL,
    "originalr": _renamed(_ORIGINAL, "PosterizeOriginal", "PosterizeIncreasing"),
    "v0": _V0,
    "v0r": _renamed(_V0, "Posterize", "PosterizeIncreasing"),
}


@dataclass(frozen=True)
class AugmentSpec:
    """A parsed auto-augment string; for ``kind == "auto"`` the policy table gives each op's magnitude and
    probability, so only ``policy`` and ``magnitude_std`` (and the fixed ``magnitude_max`` 10) apply."""

    kind: str
    policy: str | None = None
    magnitude: float = LEVEL_DENOM
    num_ops: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = LEVEL_DENOM
    increasing: bool = False
    prob: float = 0.5


_NUMBER = re.compile(r"\d+(\.\d*)?|\.\d+")
_RAND_KEYS = ("mstd", "mmax", "inc", "m", "n", "p")  # longer keys first: "mstd0.5" is not "m" + "std0.5"


def _part_value(key: str, text: str) -> float | None:
    """The value of one ``<key><value>`` part, or None when it is not valid for the key."""
    if key == "mstd" and text == "inf":
        return math.inf
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    if key == "inc" and text not in ("0", "1"):
        return None
    if key == "n" and not (text.isdigit() and value >= 1):
        return None
    if (key == "mmax" and value == 0) or (key == "p" and value > 1):
        return None
    return value


def parse_auto_augment(spec: str) -> AugmentSpec:
    """Parse a timm auto-augment string (``rand-m9-mstd0.5-inc1``, ``original-mstd0.5``); ValueError if malformed."""

    def error(problem: str) -> ValueError:
        return ValueError(f"auto_augment '{spec}': {problem}; {EXPECTED}")

    kind, *parts = spec.split("-")
    if kind != "rand" and kind not in POLICIES:
        raise error(f"unknown kind '{kind}'")
    keys = _RAND_KEYS if kind == "rand" else ("mstd",)
    values: dict[str, float] = {}
    for part in parts:
        key = next((k for k in keys if part.startswith(k)), None)
        if key is None:
            raise error(f"unknown part '{part}'")
        if key in values:
            raise error(f"repeated part '{part}'")
        value = _part_value(key, part[len(key) :])
        if value is None:
            raise error(f"bad value in part '{part}'")
        values[key] = value
    std = values.get("mstd", 0.0)
    std = math.inf if std > 100 else std  # timm: mstd above 100 means uniform sampling
    if kind != "rand":
        return AugmentSpec(kind="auto", policy=kind, magnitude_std=std)
    if "m" not in values:
        raise error("missing part 'm<magnitude>'")
    return AugmentSpec(
        kind="rand",
        policy=None,
        magnitude=values["m"],
        num_ops=int(values.get("n", 2)),
        magnitude_std=std,
        magnitude_max=values.get("mmax", LEVEL_DENOM),
        increasing=values.get("inc", 0.0) == 1.0,
        prob=values.get("p", 0.5),
    )


def sample_magnitude(rng: np.random.Generator, magnitude: float, spec: AugmentSpec) -> float:
    """One op's magnitude as timm draws it: normal(m, mstd), or uniform(0, m) for mstd inf, clipped to [0, mmax]."""
    if spec.magnitude_std == math.inf:
        magnitude = rng.uniform(0.0, magnitude)
    elif spec.magnitude_std > 0:
        magnitude = rng.normal(magnitude, spec.magnitude_std)
    return float(min(max(magnitude, 0.0), spec.magnitude_max))


@dataclass(frozen=True)
class _HParams:
    fill: tuple[int, int, int]
    resamples: tuple[Image.Resampling, ...]
    translate_const: int
    translate_pct: float = TRANSLATE_PCT


Op = Callable[[Image.Image, float, np.random.Generator, _HParams], Image.Image]


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _resample(rng: np.random.Generator, hp: _HParams) -> Image.Resampling:
    return hp.resamples[rng.integers(len(hp.resamples))] if len(hp.resamples) > 1 else hp.resamples[0]


def _affine(img: Image.Image, matrix: tuple[float, ...], rng: np.random.Generator, hp: _HParams) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=_resample(rng, hp), fillcolor=hp.fill)


def _rotate(img: Image.Image, level: float, rng: np.random.Generator, hp: _HParams) -> Image.Image:
    degrees = _signed(level / LEVEL_DENOM * 30.0, rng)
    return img.rotate(degrees, resample=_resample(rng, hp), fillcolor=hp.fill)


def _shear(axis: int, img: Image.Image, level: float, rng: np.random.Generator, hp: _HParams) -> Image.Image:
    factor = _signed(level / LEVEL_DENOM * 0.3, rng)
    return _affine(img, (1, factor, 0, 0, 1, 0) if axis == 0 else (1, 0, 0, factor, 1, 0), rng, hp)


def _translate(
    axis: int, relative: bool, img: Image.Image, level: float, rng: np.random.Generator, hp: _HParams
) -> Image.Image:
    reach = hp.translate_pct * img.size[axis] if relative else hp.translate_const
    pixels = _signed(level / LEVEL_DENOM * reach, rng)
    return _affine(img, (1, 0, pixels, 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, pixels), rng, hp)


def _enhance(
    enhancer: type[ImageEnhance._Enhance],
    increasing: bool,
    img: Image.Image,
    level: float,
    rng: np.random.Generator,
    _hp: _HParams,
) -> Image.Image:
    if increasing:  # 1.0 is "no change"; severity grows away from it on either side
        factor = max(0.1, 1.0 + _signed(level / LEVEL_DENOM * 0.9, rng))
    else:  # factor 0.1 .. 1.9 with magnitude
        factor = level / LEVEL_DENOM * 1.8 + 0.1
    return enhancer(img).enhance(factor)


def _posterize(variant: str, img: Image.Image, level: float, _rng: np.random.Generator, _hp: _HParams) -> Image.Image:
    steps = int(level / LEVEL_DENOM * 4)
    # bits kept: TPU "Posterize" 0..4 and "Original" 4..8 rise with magnitude; "Increasing" falls 4..0
    bits = {"tpu": steps, "original": steps + 4, "increasing": 4 - steps}[variant]
    if bits >= 8:
        return img
    mask = (0xFF << (8 - max(bits, 0))) & 0xFF  # 0 bits kept → black, as timm (Pillow's posterize wants 1..8)
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _solarize(
    increasing: bool, img: Image.Image, level: float, _rng: np.random.Generator, _hp: _HParams
) -> Image.Image:
    threshold = min(256, int(level / LEVEL_DENOM * 256))  # pixels >= threshold are inverted
    return ImageOps.solarize(img, 256 - threshold if increasing else threshold)


def _solarize_add(img: Image.Image, level: float, _rng: np.random.Generator, _hp: _HParams) -> Image.Image:
    add = min(128, int(level / LEVEL_DENOM * 110))
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _no_level(fn: Callable[[Image.Image], Image.Image]) -> Op:
    return lambda img, _level, _rng, _hp: fn(img)


OPS: dict[str, Op] = {
    "AutoContrast": _no_level(ImageOps.autocontrast),
    "Equalize": _no_level(ImageOps.equalize),
    "Invert": _no_level(ImageOps.invert),
    "Rotate": _rotate,
    "Posterize": partial(_posterize, "tpu"),
    "PosterizeIncreasing": partial(_posterize, "increasing"),
    "PosterizeOriginal": partial(_posterize, "original"),
    "Solarize": partial(_solarize, False),
    "SolarizeIncreasing": partial(_solarize, True),
    "SolarizeAdd": _solarize_add,
    "Color": partial(_enhance, ImageEnhance.Color, False),
    "ColorIncreasing": partial(_enhance, ImageEnhance.Color, True),
    "Contrast": partial(_enhance, ImageEnhance.Contrast, False),
    "ContrastIncreasing": partial(_enhance, ImageEnhance.Contrast, True),
    "Brightness": partial(_enhance, ImageEnhance.Brightness, False),
    "BrightnessIncreasing": partial(_enhance, ImageEnhance.Brightness, True),
    "Sharpness": partial(_enhance, ImageEnhance.Sharpness, False),
    "SharpnessIncreasing": partial(_enhance, ImageEnhance.Sharpness, True),
    "ShearX": partial(_shear, 0),
    "ShearY": partial(_shear, 1),
    "TranslateX": partial(_translate, 0, False),
    "TranslateY": partial(_translate, 1, False),
    "TranslateXRel": partial(_translate, 0, True),
    "TranslateYRel": partial(_translate, 1, True),
}


class AutoAugment:
    """Map op ``(image, key) → (augmented image, key)``: RandAugment or an AutoAugment policy, as timm's
    ``create_transform`` builds it for ``image_size`` (translate 45%, geometric fill = ``mean`` colour)."""

    def __init__(
        self, spec: str, image_size: int, mean: Sequence[float], interpolation: str = "bicubic", seed: int = 0
    ) -> None:
        self.spec = parse_auto_augment(spec)
        if interpolation not in INTERPOLATIONS:
            choices = ", ".join(INTERPOLATIONS)
            raise ValueError(f"auto_augment interpolation must be one of {choices}, got '{interpolation}'")
        if len(mean) != 3:
            raise ValueError(f"auto_augment needs an RGB mean (3 values), got {list(mean)}")
        r, g, b = (min(255, max(0, round(255 * m))) for m in mean)
        # as timm's create_transform: translate_const = 45% of the image size, fill = mean colour
        self.hparams = _HParams((r, g, b), INTERPOLATIONS[interpolation], int(image_size * 0.45))
        self.ops = RAND_INCREASING_OPS if self.spec.increasing else RAND_OPS
        self.seed = seed

    def __call__(self, image: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"auto_augment expects an HWC uint8 RGB image, got {image.dtype} {image.shape}")
        rng = np.random.default_rng([self.seed, int(np.asarray(key).item())])
        img = Image.fromarray(np.ascontiguousarray(image))
        spec = self.spec
        if spec.kind == "rand":
            steps = [(self.ops[i], spec.prob, spec.magnitude) for i in rng.integers(len(self.ops), size=spec.num_ops)]
        else:
            policy = POLICIES[spec.policy]
            steps = list(policy[rng.integers(len(policy))])
        for name, prob, magnitude in steps:
            if prob < 1.0 and rng.random() >= prob:
                continue
            img = self.apply_op(img, name, sample_magnitude(rng, magnitude, spec), rng)
        return np.array(img, dtype=np.uint8), key

    def apply_op(self, img: Image.Image, name: str, magnitude: float, rng: np.random.Generator) -> Image.Image:
        """Apply op ``name`` at exactly ``magnitude`` (no probability, no magnitude noise)."""
        return OPS[name](img, magnitude, rng, self.hparams)
