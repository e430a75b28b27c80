"""The image pipeline on generated JPEG trees: layout checks, eval sizes, shards, determinism, bad files."""

from __future__ import annotations

import json
import logging
import shutil

import mindspore as ms
import numpy as np
import pytest

from framework.config import ConfigError, build, check_config
from framework.data.folder import scan_split
from framework.data.sampler import ShardSampler
from framework.data.synthetic import write_image_folder
from framework.data.transforms import eval_resize_size
from framework.engine.losses import CrossEntropy
from framework.tasks import run
from framework.tasks.train import train
from tests.conftest import TEST_MODEL, all_runs, compose_config, mlflow_client

NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 12, 5


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_image_folder(
        tmp_path_factory.mktemp("jpeg") / "tree", NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, size=(64, 48)
    )


def folder_config(tmp_path, path, *overrides):
    return compose_config(
        [
            TEST_MODEL,
            "dataset=folder",
            f"dataset.path={path}",
            "dataset.image_size=32",
            "dataset.batch_size=8",
            "dataset.eval_batch_size=4",
            "dataset.num_parallel_workers=2",
            *overrides,
        ],
        tmp_path,
    )


def batches(loader):
    return [(images.asnumpy(), labels.asnumpy()) for images, labels in loader.create_tuple_iterator(num_epochs=1)]


def test_folder_layout_gives_sorted_classes_and_shapes(tmp_path, tree):
    data = build(folder_config(tmp_path, tree), "dataset")
    assert data.class_names == [f"class_{i:03d}" for i in range(NUM_CLASSES)]
    assert data.num_samples("train") == NUM_CLASSES * TRAIN_PER_CLASS
    train_batches = batches(data.loader("train"))
    assert len(train_batches) == NUM_CLASSES * TRAIN_PER_CLASS // 8  # drop_remainder
    images, labels = train_batches[0]
    assert images.shape == (8, 3, 32, 32) and images.dtype == np.float32 and labels.dtype == np.int32
    val = batches(data.loader("val"))
    assert sum(len(labels) for _, labels in val) == NUM_CLASSES * VAL_PER_CLASS  # nothing dropped or padded
    assert sorted(np.concatenate([labels for _, labels in val]).tolist()) == sorted(
        [c for c in range(NUM_CLASSES) for _ in range(VAL_PER_CLASS)]
    )


@pytest.mark.parametrize(("size", "crop_pct", "resized"), [(224, 0.875, 256), (256, 0.9, 284), (224, 1.0, 224)])
def test_eval_resize_is_size_over_crop_pct(size, crop_pct, resized):
    assert eval_resize_size(size, crop_pct) == resized


def test_train_and_eval_sizes_differ_as_nfnet(tmp_path, tree):
    """NFNet-F0 trains at 192 and tests at 256: here 24 and 32 (with crop_pct 0.9)."""
    cfg = folder_config(tmp_path, tree, "dataset.image_size=24", "dataset.eval_image_size=32", "dataset.crop_pct=0.9")
    data = build(cfg, "dataset")
    assert batches(data.loader("train"))[0][0].shape[2:] == (24, 24)
    assert batches(data.loader("val"))[0][0].shape[2:] == (32, 32)


def test_eval_center_crop_keeps_the_middle(tmp_path):
    """A 40x20 image whose middle 20x20 is white and sides black: crop_pct 1 keeps only the white middle."""
    from PIL import Image

    root = tmp_path / "tree"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        pixels = np.zeros((20, 40, 3), np.uint8)
        pixels[:, 10:30] = 255
        Image.fromarray(pixels).save(root / split / "a" / "x.png")
    cfg = folder_config(
        tmp_path,
        root,
        "dataset.image_size=20",
        "dataset.crop_pct=1.0",
        "dataset.eval_batch_size=1",
        "dataset.mean=[0,0,0]",
        "dataset.std=[1,1,1]",
    )
    ((images, _),) = batches(build(cfg, "dataset").loader("val"))
    assert images.shape == (1, 3, 20, 20) and images.min() == 1.0  # white on the 0..1 scale


@pytest.mark.parametrize("num_items", [10, 11, 12])
def test_shards_are_disjoint_and_cover_the_split(num_items):
    def shards(pad):
        return [[key % num_items for key in ShardSampler(num_items, True, 7, shard, 3, pad=pad)] for shard in range(3)]

    assert sorted(sum(shards(pad=False), [])) == list(range(num_items))  # eval: disjoint and complete
    train = shards(pad=True)
    assert set(sum(train, [])) == set(range(num_items))
    assert len({len(shard) for shard in train}) == 1  # equal steps on every rank
    assert sum(map(len, train)) - num_items < 3  # at most num_shards - 1 items repeat
    second_epoch = ShardSampler(num_items, True, 7, 0, 3)
    first_keys, next_keys = list(second_epoch), list(second_epoch)
    assert min(next_keys) >= num_items > max(first_keys)  # keys carry the epoch


def test_sharded_loaders_split_the_val_images(tmp_path, tree):
    data = build(folder_config(tmp_path, tree), "dataset")
    whole = np.concatenate([images for images, _ in batches(data.loader("val"))])
    parts = [np.concatenate([im for im, _ in batches(data.loader("val", shard, 2))]) for shard in range(2)]
    assert sum(len(p) for p in parts) == len(whole)
    fingerprint = lambda images: sorted(np.round(images.reshape(len(images), -1).sum(1), 2).tolist())  # noqa: E731
    assert fingerprint(np.concatenate(parts)) == fingerprint(whole)
    assert len(batches(data.loader("train", 0, 2))) == len(batches(data.loader("train", 1, 2)))


def test_epochs_reshuffle(tmp_path, tree):
    data = build(folder_config(tmp_path, tree), "dataset")
    iterator = data.loader("train").create_tuple_iterator(num_epochs=2, output_numpy=True)
    first = [labels.tolist() for _, labels in iterator]
    second = [labels.tolist() for _, labels in iterator]
    assert len(first) == len(second) and first != second


HEAVY = [
    "dataset.augment.auto_augment=rand-m9-mstd0.5-inc1",
    "dataset.augment.re_prob=0.5",
    "dataset.mixup.mixup_alpha=0.8",
    "dataset.mixup.cutmix_alpha=1.0",
]


def test_augmented_pipeline_is_deterministic_given_the_seed(tmp_path, tree):
    def first_batches(seed):
        data = build(folder_config(tmp_path, tree, *HEAVY, f"seed={seed}"), "dataset")
        return batches(data.loader("train"))[:2]

    run_a, run_b, other = first_batches(1), first_batches(1), first_batches(2)
    for (images_a, labels_a), (images_b, labels_b) in zip(run_a, run_b, strict=True):
        np.testing.assert_array_equal(images_a, images_b)
        np.testing.assert_array_equal(labels_a, labels_b)
    assert not np.array_equal(run_a[0][0], other[0][0])


def test_mixup_gives_soft_targets_for_train_only(tmp_path, tree):
    data = build(folder_config(tmp_path, tree, *HEAVY), "dataset")
    _, targets = batches(data.loader("train"))[0]
    assert targets.shape == (8, NUM_CLASSES) and targets.dtype == np.float32
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
    assert targets.min() >= 0.1 / NUM_CLASSES - 1e-6  # label smoothing 0.1 folded in
    _, labels = batches(data.loader("val"))[0]
    assert labels.ndim == 1 and labels.dtype == np.int32


def test_soft_target_loss_matches_smoothed_hard_loss():
    logits = ms.Tensor(np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32))
    labels = np.array([0, 3, 1, 4], np.int32)
    soft = np.full((4, 5), 0.1 / 5, np.float32)
    soft[np.arange(4), labels] += 0.9
    hard_loss = CrossEntropy(0.1)(logits, ms.Tensor(labels)).asnumpy()
    soft_loss = CrossEntropy(0.1)(logits, ms.Tensor(soft)).asnumpy()  # smoothing not applied twice
    np.testing.assert_allclose(soft_loss, hard_loss, rtol=1e-5)


@pytest.fixture
def tree_with_bad_files(tmp_path):
    root = write_image_folder(tmp_path / "bad", 2, 8, 2, size=(40, 30))
    garbage = root / "train" / "class_000" / "garbage.jpg"
    garbage.write_bytes(b"this is not a JPEG file at all")
    truncated = root / "train" / "class_001" / "truncated.JPEG"
    whole = (root / "train" / "class_001" / "train_00000.JPEG").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 3])
    return root, {str(garbage), str(truncated)}


def test_corrupt_images_are_skipped_and_counted(tmp_path, tree_with_bad_files, caplog):
    root, bad = tree_with_bad_files
    data = build(folder_config(tmp_path, root, "dataset.batch_size=6"), "dataset")
    with caplog.at_level(logging.WARNING):
        epoch = batches(data.loader("train"))
    assert len(epoch) == 18 // 6 and all(len(labels) == 6 for _, labels in epoch)  # the epoch kept its length
    assert set(data.bad_images()) == bad
    assert all(any(path in record.getMessage() for record in caplog.records) for path in bad)


def test_worker_processes_skip_and_count_bad_images(tmp_path, tree_with_bad_files):
    root, bad = tree_with_bad_files
    cfg = folder_config(tmp_path, root, "dataset.batch_size=6", "dataset.python_multiprocessing=true", *HEAVY)
    data = build(cfg, "dataset")
    epoch = batches(data.loader("train"))
    assert len(epoch) == 3 and all(len(labels) == 6 for _, labels in epoch)
    assert set(data.bad_images()) == bad  # recorded by the worker processes in the shared log


def test_corrupt_image_is_fatal_when_configured(tmp_path, tree_with_bad_files, capsys):
    root, bad = tree_with_bad_files
    cfg = folder_config(
        tmp_path, root, "dataset.on_bad_image=error", "dataset.batch_size=6", "dataset.image_size=16", "engine.epochs=1"
    )
    with pytest.raises(SystemExit) as exit_info:
        run(cfg)
    assert exit_info.value.code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]  # one line, not MindSpore's worker-error report
    assert message.startswith("data error: cannot read image ") and message.split()[5].rstrip(":") in bad
    assert message.endswith("or set dataset.on_bad_image=skip to skip unreadable images")
    (failed,) = all_runs(mlflow_client(tmp_path))
    assert failed.info.status == "FAILED"


@pytest.mark.slow  # trains a job (the train task)
def test_training_logs_class_map_and_bad_images(tmp_path, tree_with_bad_files):
    root, bad = tree_with_bad_files
    cfg = folder_config(tmp_path, root, "dataset.batch_size=6", "dataset.image_size=16", "engine.epochs=1", *HEAVY)
    result = train(cfg)
    assert len(result.history) == 1
    client = mlflow_client(tmp_path)
    (run,) = all_runs(client)
    assert client.get_metric_history(run.info.run_id, "data_bad_images")[-1].value == len(bad)
    classes = json.loads(open(client.download_artifacts(run.info.run_id, "data/classes.json", str(tmp_path))).read())
    assert classes == {"classes": ["class_000", "class_001"]}
    listed = open(client.download_artifacts(run.info.run_id, "data/bad_images.txt", str(tmp_path))).read().split()
    assert set(listed) == bad


@pytest.mark.slow  # trains a job (the train task)
def test_a_val_split_lacking_a_class_is_warned_and_counts_are_logged(tmp_path, capsys):
    root = write_image_folder(tmp_path / "tree", 2, 8, 2, size=(40, 30))
    shutil.rmtree(root / "val" / "class_001")
    train(folder_config(tmp_path, root, "dataset.batch_size=4", "dataset.image_size=16", "engine.epochs=1"))
    assert (
        "warning: the val split has no images of 1 class(es) the train split has (class_001): their accuracy is never "
        "measured" in capsys.readouterr().out
    )
    client = mlflow_client(tmp_path)
    (run,) = all_runs(client)
    counts = json.loads(
        open(client.download_artifacts(run.info.run_id, "data/class_counts.json", str(tmp_path))).read()
    )
    assert counts == {"class_000": {"train": 8, "val": 2}, "class_001": {"train": 8, "val": 0}}


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: None, r"dataset.path=.*: no such folder"),
        (lambda root: (root / "train").mkdir(parents=True), r"train: no class folders"),
        (lambda root: [(root / "train" / c).mkdir(parents=True) for c in ("a", "b")], r"2 class folder\(s\) without"),
    ],
)
def test_bad_layout_is_reported_before_training(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(ConfigError, match=message):
        train(folder_config(tmp_path, root))
    assert not (tmp_path / "mlflow" / "mlflow.db").exists() or all_runs(mlflow_client(tmp_path)) == []


def test_val_classes_must_exist_in_train(tmp_path, tree):
    root = write_image_folder(tmp_path / "t", 2, 2, 1, size=(20, 20))
    (root / "val" / "class_xyz").mkdir()
    (root / "val" / "class_001" / "val_00000.JPEG").rename(root / "val" / "class_xyz" / "x.JPEG")
    with pytest.raises(ValueError, match="class folder\\(s\\) not in the train split: class_xyz"):
        scan_split(root / "val", ["class_000", "class_001"])


def test_a_class_subset_of_digits_is_relabelled_in_the_order_given(tmp_path):
    cfg = compose_config([TEST_MODEL, "dataset.classes=[9,5,7]"], tmp_path)
    assert cfg.dataset.num_classes == 3 and cfg.model.num_classes == 3  # the model's head follows
    data, full = build(cfg, "dataset"), build(compose_config([TEST_MODEL], tmp_path), "dataset")
    assert data.class_names == ["9", "5", "7"]
    for split in ("train", "val"):  # the same images as in the full split, label 9 → 0, 5 → 1, 7 → 2
        source, whole = data.sources[split], full.sources[split]
        for label, digit in enumerate((9, 5, 7)):
            assert np.array_equal(source.images[source.labels == label], whole.images[whole.labels == digit])
        assert set(source.labels.tolist()) == {0, 1, 2}


def test_a_class_subset_of_folders(tmp_path, tree):
    data = build(folder_config(tmp_path, tree, "dataset.classes=[class_002,class_000]"), "dataset")
    assert data.class_names == ["class_002", "class_000"] and data.num_classes == 2
    assert data.num_samples("train") == 2 * TRAIN_PER_CLASS and data.num_samples("val") == 2 * VAL_PER_CLASS
    for split in ("train", "val"):
        source = data.sources[split]
        assert all(f"/class_00{2 if y == 0 else 0}/" in f for f, y in zip(source.files, source.labels, strict=True))


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ("[3,11]", r"dataset.classes=\['3', '11'\]: no class '11' in digits \(its classes: 0, 1, 2, .*9\)"),
        ("[3,3]", r"dataset.classes=\['3', '3'\]: must name distinct classes of digits"),
    ],
)
def test_a_class_subset_naming_no_class_is_one_line(tmp_path, classes, message):
    with pytest.raises(ConfigError, match=message):
        build(compose_config([TEST_MODEL, f"dataset.classes={classes}"], tmp_path), "dataset")


def test_num_classes_is_checked_against_the_folders(tmp_path, tree):
    with pytest.raises(ConfigError, match="dataset.num_classes=1000 but .* has 3 class folders"):
        build(folder_config(tmp_path, tree, "dataset.num_classes=1000"), "dataset")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+dataset.augment.re_probability=0.5", r"unknown key 'dataset.augment.re_probability'.*Did you mean"),
        ("+dataset.shuffle_bufer=4", r"unknown key 'dataset.shuffle_bufer'"),
        ("dataset.augment.auto_augment=rand-x9", r"rand-x9"),
        ("dataset.augment.scale=[0.5,0.1]", r"dataset.augment.scale must be \[min, max\]"),
        ("dataset.interpolation=cubic", r"dataset.interpolation must be one of"),
        ("dataset.mixup.mode=pairs", r"mixup.mode must be one of"),
        ("dataset.on_bad_image=ignore", r"dataset.on_bad_image must be one of 'skip', 'error', got 'ignore'"),
    ],
)
def test_bad_pipeline_settings_fail_at_build(tmp_path, tree, override, message):
    cfg = folder_config(tmp_path, tree, override)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)
        build(cfg, "dataset")


def test_a_path_with_spaces_and_accents_is_given_in_hydra_quotes(tmp_path):
    """README: `python run.py dataset=folder "dataset.path='/data/my photos/été'"` reaches the dataset intact."""
    root = write_image_folder(tmp_path / "my photos" / "été", 2, 4, 2, size=(20, 20))
    cfg = folder_config(tmp_path, f"'{root}'")
    assert cfg.dataset.path == str(root)
    assert build(cfg, "dataset").class_counts() == {"train": [4, 4], "val": [2, 2]}
