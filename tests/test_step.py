"""The optimisation step and the training state: loss scaling, accumulation, clipping, EMA, AMP, exact resume."""

from __future__ import annotations

import mindspore as ms
import mindspore.nn as nn
import numpy as np
import pytest

from framework.config import build
from framework.engine.checkpoint import read_checkpoint
from framework.engine.step import EMA, TrainStep, apply_amp, make_loss_scaler
from framework.optim.schedules import UpdateLr
from framework.paths import PROJECT_ROOT
from framework.tasks.train import train
from tests.conftest import TEST_MODEL, all_runs, compose_config, mlflow_client

RNG = np.random.default_rng(0)
X = ms.Tensor(RNG.normal(size=(8, 6)).astype(np.float32))
Y = ms.Tensor(RNG.integers(0, 3, size=8).astype(np.int32))


def linear_step(scale="none", value=1.0, clip=None, accumulation=1, lr=0.1, seed=0):
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(seed)
    net = nn.Dense(6, 3)
    loss_net = nn.WithLossCell(net, nn.CrossEntropyLoss())
    optimizer = nn.SGD(net.trainable_params(), learning_rate=lr)
    return net, TrainStep(loss_net, optimizer, make_loss_scaler(scale, value, 2, 2), clip, accumulation)


def weights(net):
    return [p.asnumpy().copy() for p in net.trainable_params()]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_nonfinite_loss_skips_the_update_without_loss_scaling(accumulation):
    """A NaN input makes the loss NaN: nothing is applied or accumulated, and the next good batch trains normally."""
    net, step = linear_step(accumulation=accumulation)
    before = weights(net)
    bad = ms.Tensor(np.where(np.arange(6) == 2, np.nan, X.asnumpy()).astype(np.float32))
    for _ in range(accumulation):
        loss, finite = step(bad, Y)
        assert np.isnan(loss.asnumpy()) and not bool(finite.asnumpy())
    for old, new in zip(before, weights(net), strict=True):
        np.testing.assert_array_equal(old, new)
    for _ in range(accumulation):
        loss, finite = step(X, Y)
        assert bool(finite.asnumpy())
    reference, reference_step = linear_step(accumulation=accumulation)
    for _ in range(accumulation):
        reference_step(X, Y)
    for ours, theirs in zip(weights(net), weights(reference), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)  # the NaN batch left no trace


def test_overflowing_steps_are_skipped_and_reported():
    net, step = linear_step("static", 1e36)
    before = weights(net)
    for _ in range(3):
        loss, finite = step(X * 1e6, Y)  # gradients ~1e5 · scale 1e36 overflow float32
        assert not bool(finite.asnumpy())
    for old, new in zip(before, weights(net), strict=True):
        np.testing.assert_array_equal(old, new)  # no update was applied


def test_dynamic_scale_grows_after_its_window_and_gives_the_same_update():
    net, step = linear_step("dynamic", 1024.0)
    reference, plain = linear_step()
    for _ in range(4):
        step(X, Y)
        plain(X, Y)
    assert step.loss_scale == 1024.0 * 2 * 2  # window 2: doubled twice in 4 finite steps
    for a, b in zip(weights(net), weights(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # scaling does not change the maths


def test_accumulating_two_halves_equals_one_full_batch():
    net, step = linear_step(accumulation=2)
    reference, full = linear_step()
    step(X[:4], Y[:4])
    assert weights(net)[0].tolist() == weights(reference)[0].tolist()  # nothing applied mid-accumulation
    step(X[4:], Y[4:])
    full(X, Y)
    for a, b in zip(weights(net), weights(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_global_norm_clipping_bounds_the_update():
    net, step = linear_step(clip=1e-3, lr=1.0)
    before = weights(net)
    step(X, Y)
    change = np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(weights(net), before, strict=True)))
    assert change == pytest.approx(1e-3, rel=1e-3)  # plain SGD: |Δw| = lr · clip_norm


def test_ema_follows_the_weights_and_swaps_in():
    net, step = linear_step()
    ema = EMA(net, 0.5)
    start = weights(net)
    step(X, Y)
    ema.update()
    after = weights(net)
    expected = [0.5 * a + 0.5 * b for a, b in zip(start, after, strict=True)]
    with ema.swapped_in():
        for value, want in zip(weights(net), expected, strict=True):
            np.testing.assert_allclose(value, want, rtol=1e-6)
    for value, own in zip(weights(net), after, strict=True):
        np.testing.assert_array_equal(value, own)  # restored after the block
    step(X, Y)  # the compiled step still trains the network's own weights
    assert not np.array_equal(weights(net)[0], after[0])


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
def test_mixed_precision_levels_train_on_cpu(level, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ms.set_context(mode=ms.GRAPH_MODE)
    net = nn.SequentialCell(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dense(4 * 8 * 8, 3))
    net = apply_amp(net, level)
    optimizer = nn.Momentum(net.trainable_params(), 0.01, 0.9)
    step = TrainStep(nn.WithLossCell(net, nn.CrossEntropyLoss()), optimizer, make_loss_scaler("dynamic", 1024, 2, 50))
    images = ms.Tensor(RNG.normal(size=(4, 3, 8, 8)).astype(np.float32))
    losses = [float(step(images, Y[:4])[0].asnumpy()) for _ in range(5)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert {p.dtype for p in net.get_parameters()} == {ms.float32}  # weights and BN statistics stay fp32
    assert list(tmp_path.iterdir()) == [] and not (PROJECT_ROOT / "framework" / "rewritten_network").exists()


@pytest.mark.parametrize(("override", "message"), [
    ("engine.amp_level=O4", "engine.amp_level must be one of 'O0', 'O1', 'O2', 'O3', got 'O4'. Fix: "),
    ("engine.loss_scale=auto", "engine.loss_scale must be one of 'none', 'static', 'dynamic', got 'auto'. Fix: "),
    ("engine.eval_ema=true", "engine.eval_ema=true needs engine.ema_decay"),
])  # fmt: skip
def test_bad_engine_values_fail_before_training(tmp_path, override, message):
    from framework.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        train(compose_config([override], tmp_path))


RESUME = [
    TEST_MODEL, "dataset.image_size=16", "engine.epochs=2", "engine.limit_train_batches=4",
    "engine.checkpoint_every_n_epochs=1", "engine.checkpoint_every_n_steps=3", "engine.keep_checkpoint_max=5",
    "engine.ema_decay=0.9", "engine.eval_ema=true", "engine.loss_scale=dynamic", "engine.loss_scale_window=2",
]  # fmt: skip


@pytest.mark.slow  # trains and checkpoints through the train task
def test_resume_continues_exactly(tmp_path):
    """8 steps straight vs. resumed from the mid-epoch (step 3) checkpoint: same final state. (Resuming from
    epoch ends and after kills: tests/test_reliability.py.)"""
    straight = compose_config([*RESUME, f"paths.run_dir={tmp_path / 'a'}"], tmp_path)
    train(straight)
    checkpoints = tmp_path / "a" / "checkpoints"
    final = {name: value.asnumpy().copy() for name, value in read_checkpoint(checkpoints / "last.ckpt")[0].items()}
    client = mlflow_client(tmp_path)
    (run,) = all_runs(client)
    for start, name in ((checkpoints / "step_00000003.ckpt", "c"),):
        resumed_cfg = compose_config([*RESUME, f"paths.run_dir={tmp_path / name}", f"resume={start}"], tmp_path)
        result = train(resumed_cfg)
        assert len(result.history) == 2  # the history before the checkpoint came back with it
        resumed, meta = read_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt")
        assert meta["micro_step"] == 8
        for key in final:  # weights, BN statistics, moments, optimizer step, loss scale, EMA
            np.testing.assert_array_equal(resumed[key].asnumpy(), final[key], err_msg=key)
    assert len(all_runs(client)) == 1  # the resumed jobs continued the same MLflow run
    last_losses = {m.value for m in client.get_metric_history(run.info.run_id, "train_loss") if m.step == 8}
    assert len(last_losses) == 1  # every job logged the same loss at the last step
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


@pytest.mark.slow  # trains and checkpoints through the train task
def test_same_seed_gives_the_same_loss_curve_and_logs_what_defines_the_run(tmp_path):
    overrides = [
        TEST_MODEL, "dataset.image_size=16", "engine.epochs=1", "engine.limit_train_batches=4",
        "dataset.augment.auto_augment=rand-m9-mstd0.5-inc1", "dataset.augment.re_prob=0.5",
        "dataset.mixup.mixup_alpha=0.8", "dataset.mixup.cutmix_alpha=1.0",
    ]  # fmt: skip
    for name in ("a", "b"):
        train(compose_config([*overrides, f"paths.run_dir={tmp_path / name}"], tmp_path))
    client = mlflow_client(tmp_path)
    runs = all_runs(client)
    curves = [[m.value for m in client.get_metric_history(r.info.run_id, "train_loss")] for r in runs]
    assert len(curves[0]) == 4 and curves[0] == curves[1]
    run = runs[0]
    assert run.data.tags["seed"] == "42" and len(run.data.tags["mlflow.source.git.commit"]) == 40
    fingerprint = client.download_artifacts(run.info.run_id, "data/fingerprint.json", str(tmp_path))
    assert '"train_items": 1437' in open(fingerprint).read()
    frozen = open(client.download_artifacts(run.info.run_id, "environment/requirements-frozen.txt", str(tmp_path)))
    assert any(line.startswith("mindspore==") for line in frozen.read().splitlines())


@pytest.mark.slow  # trains and checkpoints through the train task
def test_best_checkpoint_follows_the_monitored_metric_and_mode(tmp_path):
    overrides = [TEST_MODEL, "dataset.image_size=16", "engine.epochs=3", "engine.limit_train_batches=2",
                 "engine.monitor=val_loss", "engine.monitor_mode=min"]  # fmt: skip
    result = train(compose_config(overrides, tmp_path))
    losses = [h["val_loss"] for h in result.history]
    _, meta = read_checkpoint(result.checkpoints["best"])
    assert meta["epoch"] == 1 + int(np.argmin(losses)) and result.best["val_loss"] == min(losses)


def _three_steps(cfg) -> tuple[list[float], list[str]]:
    """The losses of three steps of ``cfg``'s prepared training, and the cells marked for recomputation."""
    build(cfg, "hardware").setup(cfg.seed)  # as training: MindSpore, NumPy and Python seeded
    network = build(cfg, "model")
    optimizer = build(cfg, "optimizer", params=network.trainable_params(), learning_rate=UpdateLr(0.05))
    prepared = build(cfg, "engine").prepare(network, build(cfg, "loss"), optimizer)
    prepared.network.set_train(True)
    images = ms.Tensor(np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32))
    labels = ms.Tensor(np.array([0, 1, 2, 3], np.int32))
    losses = [float(prepared.step(images, labels)[0].asnumpy()) for _ in range(3)]
    return losses, [name for name, cell in network.cells_and_names() if cell._has_config_recompute]


def test_recompute_marks_the_matched_cells_and_trains_to_the_same_losses(tmp_path):
    """engine.recompute marks the cells its regexes match in full (their inner cells with them) and changes no
    number: three steps give the losses they give without it."""
    losses, marked = _three_steps(compose_config([TEST_MODEL], tmp_path))
    recompute = r"engine.recompute=['layer[12]', 'layer1\.0', 'conv1']"
    losses_recomputed, marked_recomputed = _three_steps(compose_config([TEST_MODEL, recompute], tmp_path))
    assert marked == []
    assert {name.split(".")[0] for name in marked_recomputed} == {"layer1", "layer2", "conv1"}
    assert "layer1.0.conv1" in marked_recomputed and "layer3" not in marked_recomputed
    np.testing.assert_allclose(losses_recomputed, losses, rtol=1e-6)
