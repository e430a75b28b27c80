"""The train task's MLflow observer: one step axis (the optimizer update), an epoch beside every point, and no
non-finite value in the charts."""

from __future__ import annotations

import math

import pytest

from framework.tasks.observers import TrackRun


class Recorded:
    """Stands in for an MlflowRun: keeps what is logged, as (step, micro_step, metrics)."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int, micro_step: int | None = None) -> None:
        self.logged.append((step, micro_step, dict(metrics)))


def test_train_metrics_are_logged_per_update_with_the_mean_loss_and_the_epoch():
    run = Recorded()
    track = TrackRun(run, accumulation_steps=2)
    track.on_fit_start(epochs=2, steps_per_epoch=4, micro_step=0)
    for micro_step, loss in enumerate([1.0, 3.0, 2.0, 4.0], start=1):
        track.on_step(1, micro_step, {"train_loss": loss, "lr": 0.1 * micro_step}, img_per_s=10.0)
    track.on_epoch_end(1, 4, {"epoch": 1, "val_top1": 0.5, "train_img_per_s": 10.0})
    assert run.logged == [
        (1, 2, {"train_loss": 2.0, "lr": pytest.approx(0.2), "epoch": 0.5}),
        (2, 4, {"train_loss": 3.0, "lr": pytest.approx(0.4), "epoch": 1.0}),
        (2, 4, {"val_top1": 0.5, "train_img_per_s": 10.0}),  # at the update that ended the epoch
    ]


def test_nonfinite_values_are_left_out_and_counted():
    run = Recorded()
    track = TrackRun(run, accumulation_steps=1)
    track.on_fit_start(epochs=1, steps_per_epoch=3, micro_step=0)
    for micro_step, loss in enumerate([1.0, math.nan, math.inf], start=1):
        track.on_step(1, micro_step, {"train_loss": loss, "lr": 0.1}, img_per_s=1.0)
    track.on_epoch_end(1, 3, {"epoch": 1, "val_loss": math.nan, "val_top1": 0.1})
    assert [metrics for _, _, metrics in run.logged] == [
        {"train_loss": 1.0, "lr": 0.1, "epoch": pytest.approx(1 / 3)},
        {"lr": 0.1, "epoch": pytest.approx(2 / 3), "nonfinite_values": 1},
        {"lr": 0.1, "epoch": 1.0, "nonfinite_values": 2},
        {"val_top1": 0.1, "nonfinite_values": 3},
    ]
