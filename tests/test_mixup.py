"""Mixup/CutMix soft targets and pixels, and Random Erasing boxes, on small NumPy batches."""

from __future__ import annotations

import re

import numpy as np
import pytest

from framework.data.mixup import Mixup, one_hot_smoothed
from framework.data.random_erasing import RandomErasing

N, C, H, W = 8, 3, 16, 20
MODES = ("batch", "pair", "elem")
KINDS = {
    "mixup": {"mixup_alpha": 0.8},
    "cutmix": {"cutmix_alpha": 1.0},
    "switch": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5},
    "minmax": {"cutmix_minmax": (0.25, 0.75)},
}


def indexed_batch(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """Image i filled with the value i, label i: every pixel and target tells where it came from."""
    images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, C, H, W)).copy()
    return images, np.arange(n, dtype=np.int32)


def random_batch(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, C, H, W), dtype=np.float32), np.arange(n, dtype=np.int32)


def implied_lam(targets: np.ndarray, labels: np.ndarray, smoothing: float) -> np.ndarray:
    """Lambda of each row, read from its own label's weight (labels are distinct from their flipped partner)."""
    off = smoothing / targets.shape[1]
    on = 1.0 - smoothing + off
    return (targets[np.arange(len(labels)), labels] - off) / (on - off)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("mode", MODES)
def test_soft_targets_sum_to_one(mode, kind, smoothing):
    mixup = Mixup(**KINDS[kind], prob=0.7, mode=mode, label_smoothing=smoothing)
    images, labels = random_batch()
    for seed in range(5):
        mixed, targets = mixup(images, labels, 10, np.random.default_rng(seed))
        assert mixed.shape == images.shape and mixed.dtype == np.float32
        assert targets.shape == (N, 10) and targets.dtype == np.float32
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)
        assert (targets >= 0).all()


@pytest.mark.parametrize("minmax", [None, (0.25, 0.75), (0.4, 0.5)])
@pytest.mark.parametrize("mode", MODES)
def test_cutmix_lam_is_the_unreplaced_pixel_fraction(mode, minmax):
    mixup = Mixup(cutmix_alpha=1.0, cutmix_minmax=minmax, mode=mode, label_smoothing=0.1)
    images, labels = indexed_batch()
    replaced_any = False
    for seed in range(10):
        mixed, targets = mixup(images, labels, N, np.random.default_rng(seed))
        lam = implied_lam(targets, labels, 0.1)
        for i in range(N):
            replaced = mixed[i] != i
            assert np.isin(mixed[i], [i, N - 1 - i]).all()  # pasted only from the flipped partner
            np.testing.assert_allclose(1.0 - replaced.mean(), lam[i], atol=1e-5)
            replaced_any |= bool(replaced.any())
            if minmax is not None:  # one rectangle, same in every channel, sides within [min, max) of the image
                rows, cols = np.nonzero(replaced[0])
                assert (replaced == replaced[0]).all()
                side_h, side_w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
                assert replaced[0].sum() == side_h * side_w
                assert int(H * minmax[0]) <= side_h <= max(int(H * minmax[1]) - 1, int(H * minmax[0]))
                assert int(W * minmax[0]) <= side_w <= max(int(W * minmax[1]) - 1, int(W * minmax[0]))
    assert replaced_any


@pytest.mark.parametrize("mode", MODES)
def test_mixup_blends_with_the_flipped_batch(mode):
    mixup = Mixup(mixup_alpha=0.4, mode=mode, label_smoothing=0.1)
    images, labels = random_batch()
    for seed in range(5):
        mixed, targets = mixup(images, labels, N, np.random.default_rng(seed))
        lam = implied_lam(targets, labels, 0.1)[:, None, None, None]
        assert ((lam > 0) & (lam < 1)).all()
        np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], atol=1e-5)


def test_batch_mode_uses_one_lam():
    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode="batch")
    images, labels = indexed_batch()
    for seed in range(5):
        _, targets = mixup(images, labels, N, np.random.default_rng(seed))
        lam = implied_lam(targets, labels, 0.1)
        np.testing.assert_allclose(lam, lam[0], atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"mixup_alpha": 0.0, "cutmix_alpha": 0.0}, {"mixup_alpha": 1.0, "prob": 0.0}])
def test_inactive_mixup_is_identity_with_smoothed_one_hot(kwargs):
    mixup = Mixup(**kwargs, label_smoothing=0.1)
    assert not mixup.active
    images, labels = random_batch()
    mixed, targets = mixup(images, labels, 10, np.random.default_rng(0))
    np.testing.assert_array_equal(mixed, images)
    assert mixed is not images
    np.testing.assert_array_equal(targets, one_hot_smoothed(labels, 10, 0.1))


@pytest.mark.parametrize(
    ("kwargs", "active"),
    [
        ({}, False),
        ({"mixup_alpha": 0.2}, True),
        ({"cutmix_alpha": 1.0}, True),
        ({"cutmix_minmax": (0.2, 0.8)}, True),
        ({"mixup_alpha": 0.2, "prob": 0.0}, False),
    ],
)
def test_active(kwargs, active):
    assert Mixup(**kwargs).active is active


def test_prob_miss_leaves_images_and_targets_unmixed():
    mixup = Mixup(mixup_alpha=1.0, prob=0.5, mode="elem", label_smoothing=0.1)
    images, labels = random_batch(16)
    mixed, targets = mixup(images, labels, 16, np.random.default_rng(3))
    lam = implied_lam(targets, labels, 0.1)
    unmixed = np.isclose(lam, 1.0, atol=1e-6)
    assert 0 < unmixed.sum() < 16
    np.testing.assert_array_equal(mixed[unmixed], images[unmixed])
    np.testing.assert_allclose(targets[unmixed], one_hot_smoothed(labels, 16, 0.1)[unmixed], atol=1e-7)


def test_one_hot_smoothed_values():
    targets = one_hot_smoothed(np.array([2, 0]), 4, 0.2)
    np.testing.assert_allclose(targets, [[0.05, 0.05, 0.85, 0.05], [0.85, 0.05, 0.05, 0.05]], atol=1e-7)
    np.testing.assert_array_equal(one_hot_smoothed(np.array([1]), 3, 0.0), [[0.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match="labels must be in"):
        one_hot_smoothed(np.array([3]), 3, 0.0)


def test_pair_mode_pairs_i_with_its_mirror():
    mixup = Mixup(cutmix_alpha=1.0, mode="pair")
    images, labels = indexed_batch()
    mixed, targets = mixup(images, labels, N, np.random.default_rng(1))
    lam = implied_lam(targets, labels, 0.1)
    for i in range(N // 2):
        j = N - 1 - i
        assert np.isin(mixed[i], [i, j]).all() and np.isin(mixed[j], [i, j]).all()
        np.testing.assert_array_equal(mixed[i] == j, mixed[j] == i)  # the same box, swapped
        assert lam[i] == pytest.approx(lam[j], abs=1e-6)
        assert targets[i, j] == pytest.approx(targets[j, i], abs=1e-6)
    assert len(np.unique(np.round(lam[: N // 2], 5))) > 1  # one lam per pair, not per batch


def test_pair_mode_rejects_an_odd_batch():
    images, labels = random_batch(7)
    with pytest.raises(ValueError, match="even batch size"):
        Mixup(mixup_alpha=1.0, mode="pair")(images, labels, 7, np.random.default_rng(0))


def test_elem_mode_draws_lam_per_element():
    mixup = Mixup(mixup_alpha=1.0, mode="elem")
    images, labels = random_batch(16)
    _, targets = mixup(images, labels, 16, np.random.default_rng(0))
    lam = implied_lam(targets, labels, 0.1)
    assert len(np.unique(np.round(lam, 5))) > 8
    assert not np.allclose(lam, lam[::-1])  # element i and its partner draw separately


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("mode", MODES)
def test_same_seed_same_output_and_inputs_untouched(mode, kind):
    mixup = Mixup(**KINDS[kind], mode=mode)
    images, labels = random_batch()
    images_before, labels_before = images.copy(), labels.copy()
    first = mixup(images, labels, N, np.random.default_rng(42))
    second = mixup(images, labels, N, np.random.default_rng(42))
    other = mixup(images, labels, N, np.random.default_rng(43))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[1], other[1])
    np.testing.assert_array_equal(images, images_before)
    np.testing.assert_array_equal(labels, labels_before)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mixup_alpha": -0.1}, "mixup_alpha"),
        ({"cutmix_alpha": -1.0}, "cutmix_alpha"),
        ({"prob": 1.5}, "prob"),
        ({"prob": -0.1}, "prob"),
        ({"switch_prob": 2.0}, "switch_prob"),
        ({"mode": "x"}, "mode"),
        ({"cutmix_minmax": (0.5,)}, "cutmix_minmax"),
        ({"cutmix_minmax": 0.5}, "cutmix_minmax"),
        ({"cutmix_minmax": (0.6, 0.4)}, "cutmix_minmax"),
        ({"cutmix_minmax": (0.0, 0.5)}, "cutmix_minmax"),
        ({"cutmix_minmax": (0.2, 1.2)}, "cutmix_minmax"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
    ],
)
def test_bad_mixup_arguments_name_the_config_key(kwargs, name):
    with pytest.raises(ValueError, match=re.escape(f"dataset.mixup.{name} ")):
        Mixup(**kwargs)


def test_bad_mode_lists_the_choices():
    with pytest.raises(ValueError, match=re.escape("mixup.mode must be one of 'batch', 'pair', 'elem', got 'x'")):
        Mixup(mode="x")


def test_bad_batch_shapes():
    mixup = Mixup(mixup_alpha=1.0)
    images, labels = random_batch()
    with pytest.raises(ValueError, match="N, C, H, W"):
        mixup(images[0], labels, N, np.random.default_rng(0))
    with pytest.raises(ValueError, match="N, C, H, W"):
        mixup(images, labels[:-1], N, np.random.default_rng(0))
    with pytest.raises(ValueError, match="labels must be in"):
        mixup(images, labels, N - 1, np.random.default_rng(0))


# ---- Random Erasing ----

RH, RW = 40, 48


def erased_mask(image: np.ndarray, out: np.ndarray) -> np.ndarray:
    return (out != image).any(axis=0)


def test_erasing_probability_zero_is_identity():
    image = np.random.default_rng(0).standard_normal((C, RH, RW), dtype=np.float32)
    erasing = RandomErasing(probability=0.0)
    for seed in range(20):
        out = erasing(image, np.random.default_rng(seed))
        assert out is not image and out.dtype == np.float32
        np.testing.assert_array_equal(out, image)


def test_erasing_one_box_area_within_bounds_const_zeros():
    image = np.ones((C, RH, RW), dtype=np.float32)
    erasing = RandomErasing(probability=1.0, mode="const", min_area=0.05, max_area=0.3)
    erased = 0
    for seed in range(100):
        out = erasing(image, np.random.default_rng(seed))
        mask = erased_mask(image, out)
        if not mask.any():
            continue
        erased += 1
        rows, cols = np.nonzero(mask)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert mask.sum() == h * w  # one rectangle
        assert (out[:, mask] == 0).all() and (out[:, ~mask] == 1).all()
        slack = 0.5 * (h + w) + 0.75  # rounding each side to whole pixels
        assert 0.05 * RH * RW - slack <= h * w <= 0.3 * RH * RW + slack
    assert erased >= 90  # probability 1: only ten failed attempts in a row leave an image untouched


def test_erasing_rand_mode_one_value_per_channel():
    image = np.full((C, RH, RW), 7.0, dtype=np.float32)
    erasing = RandomErasing(probability=1.0, mode="rand", min_area=0.1, max_area=0.3)
    for seed in range(20):
        out = erasing(image, np.random.default_rng(seed))
        mask = erased_mask(image, out)
        assert mask.any()
        values = out[:, mask]
        assert (values == values[:, :1]).all()  # constant inside the box per channel
        assert len(np.unique(values[:, 0])) == C  # different across channels
        assert (np.abs(values[:, 0]) < 6).all()


def test_erasing_pixel_mode_is_standard_normal_noise():
    image = np.full((C, RH, RW), 7.0, dtype=np.float32)
    erasing = RandomErasing(probability=1.0, mode="pixel", min_area=0.1, max_area=0.3)
    noise = []
    for seed in range(20):
        out = erasing(image, np.random.default_rng(seed))
        mask = erased_mask(image, out)
        assert mask.any() and (out[:, ~mask] == 7.0).all()
        noise.append(out[:, mask].ravel())
    noise = np.concatenate(noise)
    assert len(np.unique(noise)) > 0.99 * noise.size
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1.0) < 0.05


def test_erasing_count_gives_up_to_count_boxes():
    image = np.full((C, RH, RW), 7.0, dtype=np.float32)
    exact = RandomErasing(probability=1.0, mode="rand", min_count=3, max_count=3)
    upto = RandomErasing(probability=1.0, mode="rand", max_count=3)
    exact_boxes, upto_boxes, exact_areas = [], [], []
    for seed in range(40):
        for erasing, boxes in ((exact, exact_boxes), (upto, upto_boxes)):
            out = erasing(image, np.random.default_rng(seed))
            # each box has its own random colour; overlaps can hide a box, never add one
            boxes.append(len(np.unique(out[0][erased_mask(image, out)])))
        exact_areas.append(erased_mask(image, exact(image, np.random.default_rng(seed))).sum())
    assert max(exact_boxes) == 3 and np.mean(exact_boxes) > 2.5
    # the area is shared: each box is at most max_area / 3 of the image (sides <= 27 px, plus rounding slack)
    assert max(exact_areas) <= 3 * (RH * RW / 9 + 0.5 * 54 + 0.75)
    assert set(upto_boxes) <= {0, 1, 2, 3} and len(set(upto_boxes)) >= 2


def test_erasing_same_seed_same_output():
    image = np.random.default_rng(0).standard_normal((C, RH, RW), dtype=np.float32)
    erasing = RandomErasing(probability=0.5, mode="pixel", max_count=2)
    outs = [[erasing(image, np.random.default_rng(seed)) for seed in range(10)] for _ in range(2)]
    for first, second in zip(*outs, strict=True):
        np.testing.assert_array_equal(first, second)
    assert any(not np.array_equal(out, image) for out in outs[0])
    assert any(np.array_equal(out, image) for out in outs[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"probability": 1.5}, "re_prob"),
        ({"probability": -0.1}, "re_prob"),
        ({"mode": "noise"}, "re_mode must be one of 'pixel', 'rand', 'const', got 'noise'"),
        ({"min_area": 0.5, "max_area": 0.2}, "min_area < max_area"),
        ({"max_area": 1.5}, "min_area < max_area"),
        ({"min_aspect": 0.0}, "min_aspect"),
        ({"min_aspect": 2.0, "max_aspect": 1.0}, "min_aspect"),
        ({"max_count": 0}, "re_count"),
        ({"min_count": 2, "max_count": 1}, "re_count"),
        ({"min_count": 0}, "min_count"),
    ],
)
def test_bad_erasing_arguments(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        RandomErasing(**kwargs)


def test_erasing_needs_a_chw_image():
    with pytest.raises(ValueError, match="C, H, W"):
        RandomErasing(probability=1.0)(np.zeros((2, C, RH, RW), dtype=np.float32), np.random.default_rng(0))
