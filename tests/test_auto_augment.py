"""timm-string RandAugment/AutoAugment on real images: parsing, determinism per key, what each op does."""

from __future__ import annotations

import math
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from framework.data.auto_augment import (
    OPS,
    POLICIES,
    RAND_INCREASING_OPS,
    RAND_OPS,
    AugmentSpec,
    AutoAugment,
    parse_auto_augment,
    sample_magnitude,
)

MEAN = (0.485, 0.456, 0.406)
FILL = (124, 116, 104)  # round(255 * MEAN)
SIZE = 64


def gradient_image() -> np.ndarray:
    """64×64 RGB: red rises along x, green along y, blue along the diagonal (every pixel distinct)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)


def ramp_image() -> np.ndarray:
    """64×64 RGB holding every value 0..255 in each channel (for LUT ops)."""
    values = np.arange(SIZE * SIZE) % 256
    return np.stack([values, values[::-1], (values * 7) % 256], axis=-1).reshape(SIZE, SIZE, 3).astype(np.uint8)


def apply(name: str, magnitude: float, image: np.ndarray, seed: int = 0, interpolation: str = "nearest") -> np.ndarray:
    aug = AutoAugment("rand-m9", SIZE, MEAN, interpolation)
    return np.array(aug.apply_op(Image.fromarray(image), name, magnitude, np.random.default_rng(seed)))


def recorded_calls(aug: AutoAugment, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float]]:
    """Make ``aug`` log every op it applies as (name, magnitude)."""
    calls: list[tuple[str, float]] = []
    apply_op = aug.apply_op

    def logging_apply_op(img: Image.Image, name: str, magnitude: float, rng: np.random.Generator) -> Image.Image:
        calls.append((name, magnitude))
        return apply_op(img, name, magnitude, rng)

    monkeypatch.setattr(aug, "apply_op", logging_apply_op)
    return calls


# ---------------------------------------------------------------- parser


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("rand-m9-mstd0.5-inc1", dict(magnitude=9, num_ops=2, magnitude_std=0.5, increasing=True, prob=0.5)),
        ("rand-m5-n4-mstd0.5-inc1", dict(magnitude=5, num_ops=4, magnitude_std=0.5, increasing=True)),
        ("rand-m9-n2", dict(magnitude=9, num_ops=2, magnitude_std=0.0, magnitude_max=10, increasing=False)),
        ("rand-m7-mstd0.5", dict(magnitude=7, magnitude_std=0.5, increasing=False)),
        ("rand-m9-mmax15", dict(magnitude=9, magnitude_max=15)),
        ("rand-m9-p0.7", dict(magnitude=9, prob=0.7)),
        ("rand-m9-mstdinf", dict(magnitude=9, magnitude_std=math.inf)),
        ("rand-m9-mstd101", dict(magnitude=9, magnitude_std=math.inf)),  # timm: mstd > 100 means uniform
        ("rand-m9-inc0", dict(increasing=False)),
        ("rand-inc1-n3-m6", dict(magnitude=6, num_ops=3, increasing=True)),  # parts in any order
    ],
)
def test_parse_rand(spec: str, expected: dict) -> None:
    parsed = parse_auto_augment(spec)
    assert parsed.kind == "rand" and parsed.policy is None
    for field, value in expected.items():
        assert getattr(parsed, field) == value, field


@pytest.mark.parametrize("policy", ["original", "originalr", "v0", "v0r"])
def test_parse_policies(policy: str) -> None:
    assert parse_auto_augment(policy) == AugmentSpec(kind="auto", policy=policy)
    noisy = parse_auto_augment(f"{policy}-mstd0.5")
    assert (noisy.kind, noisy.policy, noisy.magnitude_std, noisy.magnitude_max) == ("auto", policy, 0.5, 10)


@pytest.mark.parametrize(
    ("spec", "bad_part"),
    [
        ("rand", "m<magnitude>"),
        ("rand-x9", "x9"),
        ("rand-m", "m"),
        ("rand-mfoo", "mfoo"),
        ("autoaug", "autoaug"),
        ("v1", "v1"),
        ("rand-m9-inc2", "inc2"),
        ("rand-m9-p1.5", "p1.5"),
        ("rand-m9-n0", "n0"),
        ("rand-m9-m5", "m5"),
        ("original-m9", "m9"),
        ("rand-m9-", ""),
    ],
)
def test_bad_strings_name_the_bad_part(spec: str, bad_part: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_auto_augment(spec)
    message = str(error.value)
    assert f"auto_augment '{spec}'" in message
    assert f"'{bad_part}'" in message
    assert "rand-m<magnitude>[-n<ops>]" in message and "original, originalr, v0, v0r" in message


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="x9"):
        AutoAugment("rand-x9", SIZE, MEAN)
    with pytest.raises(ValueError, match="lanczos"):
        AutoAugment("rand-m9", SIZE, MEAN, interpolation="lanczos")
    with pytest.raises(ValueError, match="RGB mean"):
        AutoAugment("rand-m9", SIZE, (0.5,))
    with pytest.raises(ValueError, match="HWC uint8"):
        AutoAugment("rand-m9", SIZE, MEAN)(gradient_image().astype(np.float32), np.int64(0))


# ---------------------------------------------------------------- determinism and output contract


def test_output_contract_with_non_contiguous_input() -> None:
    image = gradient_image()[:, ::-1]  # a flipped view, as after RandomHorizontalFlip
    assert not image.flags.c_contiguous
    aug = AutoAugment("rand-m9-mstd0.5-inc1", SIZE, MEAN)
    for key in (np.int64(3), np.array(3, dtype=np.int64), np.array([3], dtype=np.int64)):
        out, returned_key = aug(image, key)
        assert returned_key is key
        assert out.dtype == np.uint8 and out.shape == image.shape and out.flags.c_contiguous and out.flags.writeable
        np.testing.assert_array_equal(out, aug(np.ascontiguousarray(image), np.int64(3))[0])


def test_same_seed_and_key_give_the_same_image_in_any_thread() -> None:
    image, keys = gradient_image(), range(40)
    serial = [AutoAugment("rand-m9-mstd0.5-inc1", SIZE, MEAN, "random", seed=7)(image, np.int64(k))[0] for k in keys]
    aug = AutoAugment("rand-m9-mstd0.5-inc1", SIZE, MEAN, "random", seed=7)
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda k: aug(image, np.int64(k))[0], reversed(keys)))[::-1]
    for a, b in zip(serial, threaded, strict=True):
        np.testing.assert_array_equal(a, b)


def test_keys_and_seeds_change_the_augmentation() -> None:
    image, keys = gradient_image(), range(40)
    aug = AutoAugment("rand-m9-mstd0.5-inc1", SIZE, MEAN, seed=0)
    outputs = [aug(image, np.int64(k))[0] for k in keys]
    # a quarter of the keys apply no op (p = 0.5 twice) and give the input back; the rest differ
    assert sum(not np.array_equal(out, image) for out in outputs) >= 24
    assert len({out.tobytes() for out in outputs}) >= 20
    other_seed = AutoAugment("rand-m9-mstd0.5-inc1", SIZE, MEAN, seed=1)
    assert sum(not np.array_equal(other_seed(image, np.int64(k))[0], outputs[k]) for k in keys) >= 30


def test_global_random_state_is_left_alone() -> None:
    np_state, py_state = np.random.get_state(), random.getstate()
    aug = AutoAugment("original-mstd0.5", SIZE, MEAN, "random")
    for key in range(20):
        aug(gradient_image(), np.int64(key))
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


# ---------------------------------------------------------------- what the ops do


def test_rotate_moves_pixels_and_fills_corners_with_the_mean() -> None:
    image = gradient_image()
    for seed in range(6):  # both rotation directions
        out = apply("Rotate", 9, image, seed, interpolation="bicubic")
        assert not np.array_equal(out, image)
        for corner in (out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]):
            assert tuple(corner) == FILL
        assert tuple(out[SIZE // 2, SIZE // 2]) != FILL  # the centre stays image


@pytest.mark.parametrize(("name", "axis"), [("ShearX", 1), ("ShearY", 0)])
def test_shear_keeps_the_first_line_and_fills_one_far_corner(name: str, axis: int) -> None:
    image = gradient_image()
    corners_filled = set()
    for seed in range(8):
        out = apply(name, 9, image, seed)
        # shear by ±0.27 pivots on the first row (ShearX) / column (ShearY)
        np.testing.assert_array_equal(np.take(out, 0, axis=1 - axis), np.take(image, 0, axis=1 - axis))
        far = (out[-1, 0], out[-1, -1]) if name == "ShearX" else (out[0, -1], out[-1, -1])
        filled = [tuple(px) == FILL for px in far]
        assert sum(filled) == 1
        corners_filled.add(filled.index(True))
    assert corners_filled == {0, 1}  # both shear directions happen


@pytest.mark.parametrize(
    ("name", "axis", "shift"),
    [
        ("TranslateXRel", 1, 26),  # 0.9 * 0.45 * 64 = 25.9 px
        ("TranslateYRel", 0, 26),
        ("TranslateX", 1, 25),  # AutoAugment: 0.9 * translate_const, int(64 * 0.45) = 28 → 25.2 px
        ("TranslateY", 0, 25),
    ],
)
def test_translate_shifts_the_image_and_fills_with_the_mean(name: str, axis: int, shift: int) -> None:
    image = gradient_image()
    directions = set()
    for seed in range(8):
        out = apply(name, 9, image, seed)
        filled = (out == np.array(FILL)).all(axis=-1).all(axis=1 - axis)  # whole rows/columns of fill
        if filled[-1]:  # content moved towards the origin: out[i] = image[i + shift]
            directions.add(-1)
            kept = SIZE - shift
            np.testing.assert_array_equal(np.take(out, range(kept), axis), np.take(image, range(shift, SIZE), axis))
            assert filled[kept:].all() and not filled[:kept].any()
        else:  # moved away: out[i] = image[i - shift] (the first sub-pixel line may be cut to fill)
            directions.add(1)
            np.testing.assert_array_equal(
                np.take(out, range(shift + 1, SIZE), axis), np.take(image, range(1, SIZE - shift), axis)
            )
            assert filled[:shift].all() and not filled[shift + 1 :].any()
    assert directions == {-1, 1}


def test_random_interpolation_draws_bilinear_and_bicubic() -> None:
    image = gradient_image()
    outputs = {apply("Rotate", 9, image, seed, interpolation="random").tobytes() for seed in range(40)}
    assert len(outputs) == 4  # 2 directions × 2 resampling filters


def test_invert() -> None:
    image = ramp_image()
    np.testing.assert_array_equal(apply("Invert", 9, image), 255 - image)


@pytest.mark.parametrize(
    ("name", "magnitude", "bits"),
    [
        ("PosterizeIncreasing", 0, 4),
        ("PosterizeIncreasing", 3, 3),
        ("PosterizeIncreasing", 5, 2),
        ("PosterizeIncreasing", 9, 1),
        ("PosterizeIncreasing", 10, 0),
        ("PosterizeIncreasing", 15, 0),  # beyond 10 (mmax15) stays all-black, as timm
        ("PosterizeOriginal", 9, 7),
        ("PosterizeOriginal", 10, 8),
        ("Posterize", 9, 3),
    ],
)
def test_posterize_keeps_the_top_bits(name: str, magnitude: float, bits: int) -> None:
    image = ramp_image()
    out = apply(name, magnitude, image)
    mask = (0xFF << (8 - bits)) & 0xFF
    np.testing.assert_array_equal(out, image & mask)
    assert len(np.unique(out[..., 0])) == 2**bits


def test_posterize_increasing_keeps_fewer_bits_as_magnitude_rises() -> None:
    image = ramp_image()
    levels = [len(np.unique(apply("PosterizeIncreasing", m, image))) for m in range(0, 11)]
    assert levels == sorted(levels, reverse=True) and levels[0] == 16 and levels[-1] == 1


@pytest.mark.parametrize(
    ("name", "magnitude", "threshold"),
    [
        ("Solarize", 5, 128),
        ("Solarize", 9, 230),
        ("Solarize", 10, 256),  # no pixel reaches 256: unchanged
        ("SolarizeIncreasing", 9, 26),
        ("SolarizeIncreasing", 0, 256),
    ],
)
def test_solarize_inverts_pixels_at_or_above_the_threshold(name: str, magnitude: float, threshold: int) -> None:
    image = ramp_image()
    expected = np.where(image >= threshold, 255 - image, image)
    np.testing.assert_array_equal(apply(name, magnitude, image), expected)


def test_solarize_add_brightens_only_dark_pixels() -> None:
    image = ramp_image()
    add = 99  # int(0.9 * 110)
    expected = np.where(image < 128, np.minimum(255, image.astype(int) + add), image)
    np.testing.assert_array_equal(apply("SolarizeAdd", 9, image), expected)


def test_enhance_ops_follow_the_magnitude() -> None:
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)  # texture for Sharpness
    darker = apply("Brightness", 0, image)  # factor 0.1
    assert np.abs(darker.astype(int) - np.round(image * 0.1)).max() <= 1
    for name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        np.testing.assert_array_equal(apply(name, 0, image), image)  # factor 1.0: no change at m0
        assert np.abs(apply(name, 9, image).astype(int) - image).mean() > 10, name
    grey = apply("Color", 0, image).astype(int)  # factor 0.1: close to grey
    spread = np.abs(grey - grey.mean(axis=-1, keepdims=True)).mean()
    assert spread < 0.15 * np.abs(image - image.mean(axis=-1, keepdims=True)).mean()


def test_autocontrast_and_equalize_stretch_a_dull_image() -> None:
    dull = (100 + gradient_image() // 8).astype(np.uint8)  # values 100..131
    for name in ("AutoContrast", "Equalize"):
        out = apply(name, 9, dull)
        assert out.min() <= 10 and out.max() >= 245


def test_every_op_keeps_size_and_dtype() -> None:
    image = gradient_image()
    for name in OPS:
        out = apply(name, 9, image, interpolation="bicubic")
        assert out.shape == image.shape and out.dtype == np.uint8, name


# ---------------------------------------------------------------- RandAugment and AutoAugment selection


def test_prob_zero_returns_the_image_unchanged() -> None:
    image = gradient_image()
    aug = AutoAugment("rand-m9-p0", SIZE, MEAN)
    for key in range(20):
        np.testing.assert_array_equal(aug(image, np.int64(key))[0], image)


@pytest.mark.parametrize(("spec", "ops"), [("rand-m5-n4-p1-inc1", RAND_INCREASING_OPS), ("rand-m5-n4-p1", RAND_OPS)])
def test_rand_augment_draws_n_ops_from_its_op_set(spec: str, ops: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    aug = AutoAugment(spec, SIZE, MEAN)
    assert aug.ops == ops
    calls = recorded_calls(aug, monkeypatch)
    for key in range(50):
        before = len(calls)
        aug(gradient_image(), np.int64(key))
        assert len(calls) - before == 4  # p1: every drawn op applies
    assert {name for name, _ in calls} <= set(ops)
    assert len({name for name, _ in calls}) >= 12  # 200 draws with replacement cover most of the 15
    assert {m for _, m in calls} == {5.0}


def test_rand_augment_applies_each_op_with_prob(monkeypatch: pytest.MonkeyPatch) -> None:
    aug = AutoAugment("rand-m9-p0.7", SIZE, MEAN)
    calls = recorded_calls(aug, monkeypatch)
    for key in range(300):
        aug(gradient_image(), np.int64(key))
    assert abs(len(calls) / 600 - 0.7) < 0.06


def test_increasing_and_standard_op_sets_differ_only_in_direction() -> None:
    assert len(RAND_OPS) == len(RAND_INCREASING_OPS) == 15
    changed = {(a, b) for a, b in zip(RAND_OPS, RAND_INCREASING_OPS, strict=True) if a != b}
    assert changed == {
        ("Posterize", "PosterizeIncreasing"),
        ("Solarize", "SolarizeIncreasing"),
        ("Color", "ColorIncreasing"),
        ("Contrast", "ContrastIncreasing"),
        ("Brightness", "BrightnessIncreasing"),
        ("Sharpness", "SharpnessIncreasing"),
    }


def test_policy_tables() -> None:
    assert set(POLICIES) == {"original", "originalr", "v0", "v0r"}
    for name, policy in POLICIES.items():
        assert len(policy) == 25, name
        for sub_policy in policy:
            assert len(sub_policy) == 2
            for op, prob, magnitude in sub_policy:
                assert op in OPS and 0 <= prob <= 1 and 0 <= magnitude <= 10
    # the paper's first sub-policy; the "r" variants swap only the Posterize flavour
    assert POLICIES["original"][0] == (("PosterizeOriginal", 0.4, 8), ("Rotate", 0.6, 9))
    assert POLICIES["originalr"][0] == (("PosterizeIncreasing", 0.4, 8), ("Rotate", 0.6, 9))
    assert POLICIES["v0"][12][0] == ("Posterize", 0.4, 6) and POLICIES["v0r"][12][0] == ("PosterizeIncreasing", 0.4, 6)


def test_original_policy_applies_published_sub_policies(monkeypatch: pytest.MonkeyPatch) -> None:
    aug = AutoAugment("original", SIZE, MEAN)
    calls = recorded_calls(aug, monkeypatch)
    table = [tuple((op, float(m)) for op, _, m in sub) for sub in POLICIES["original"]]
    seen = set()
    for key in range(400):
        before = len(calls)
        aug(gradient_image(), np.int64(key))
        applied = tuple(calls[before:])
        # what ran is a sub-policy of the table, or the part of one that passed its probabilities
        matches = [sub for sub in table if applied in (sub, sub[:1], sub[1:], ())]
        assert matches, applied
        if len(applied) == 2:
            seen.add(applied)
    assert len(seen) >= 15  # most of the 25 (some have an op that never or rarely fires)


# ---------------------------------------------------------------- magnitude noise


def draw(spec: str, count: int = 20000, magnitude: float | None = None) -> np.ndarray:
    parsed = parse_auto_augment(spec)
    rng = np.random.default_rng(0)
    m = parsed.magnitude if magnitude is None else magnitude
    return np.array([sample_magnitude(rng, m, parsed) for _ in range(count)])


def test_magnitude_is_fixed_without_mstd() -> None:
    assert set(draw("rand-m9", 100)) == {9.0}
    assert set(draw("rand-m15", 100)) == {10.0}  # clipped to the default max, as timm
    assert set(draw("rand-m15-mmax15", 100)) == {15.0}


def test_magnitude_noise_is_normal_with_mstd() -> None:
    samples = draw("rand-m5-mstd0.5")
    assert abs(samples.mean() - 5) < 0.02 and abs(samples.std() - 0.5) < 0.02


def test_magnitude_noise_is_clipped_to_the_range() -> None:
    samples = draw("rand-m9-mstd3")
    assert samples.min() == 0.0 and samples.max() == 10.0
    assert 0.3 < (samples == 10.0).mean() < 0.4  # P(N(9, 3) > 10) = 0.37
    wide = draw("rand-m9-mstd3-mmax15")
    assert wide.max() == 15.0 and abs(wide.mean() - 9) < 0.1


def test_mstd_inf_is_uniform_up_to_m() -> None:
    samples = draw("rand-m9-mstdinf")
    assert samples.min() >= 0 and samples.max() <= 9
    assert abs(samples.mean() - 4.5) < 0.05 and abs(samples.std() - 9 / math.sqrt(12)) < 0.05
    histogram, _ = np.histogram(samples, bins=9, range=(0, 9))
    assert histogram.min() > 0.9 * len(samples) / 9


def test_auto_augment_policy_noise_uses_the_table_magnitude(monkeypatch: pytest.MonkeyPatch) -> None:
    aug = AutoAugment("original-mstd0.5", SIZE, MEAN)
    calls = recorded_calls(aug, monkeypatch)
    for key in range(200):
        aug(gradient_image(), np.int64(key))
    table_magnitudes = {float(m) for sub in POLICIES["original"] for _, _, m in sub}
    assert not {m for _, m in calls} <= table_magnitudes  # noise moved them off the table's integers
    assert all(0 <= m <= 10 for _, m in calls)
