"""The train task's observers of the trainer (``framework.engine.Observer``): MLflow tracking and sweep pruning."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from framework.engine import Observer, Stop
from framework.tracking import MlflowRun
from framework.tracking.study import StudyTrial


class TrackRun(Observer):
    """Logs the trainer's metrics into the job's MLflow run, all on one step axis: the optimizer update.

    A micro-step's ``train_loss`` is averaged over its update; an epoch's metrics (``val_*`` among them) are
    logged at the update that ended the epoch, and every point has ``epoch`` (fractional during an epoch) at its
    step, so train and val curves overlay on either axis. Non-finite values are left out (one diverged trial
    would flatten every chart it shares) and counted in ``nonfinite_values``. What a checkpoint covers is
    delivered at it.
    """

    def __init__(self, run: MlflowRun, accumulation_steps: int) -> None:
        self.run, self.accumulation_steps = run, accumulation_steps
        self.steps_per_epoch, self.nonfinite, self.losses = 1, 0, []

    def on_fit_start(self, epochs: int, steps_per_epoch: int, micro_step: int) -> None:
        self.steps_per_epoch = steps_per_epoch

    def on_step(self, epoch: int, micro_step: int, metrics: Mapping[str, float], img_per_s: float) -> None:
        self.losses.append(metrics["train_loss"])
        if micro_step % self.accumulation_steps:  # the update is not done yet
            return
        update = {**metrics, "train_loss": sum(self.losses) / len(self.losses)}
        self.losses = []
        self._log({**update, "epoch": micro_step / self.steps_per_epoch}, micro_step)

    def on_epoch_end(self, epoch: int, micro_step: int, metrics: Mapping[str, float]) -> None:
        """At the epoch's last update, where its last step already put ``epoch``."""
        self._log({k: v for k, v in metrics.items() if k != "epoch"}, micro_step)

    def on_checkpoint(self, micro_step: int, path: Path) -> None:
        self.run.checkpointed(micro_step)

    def _log(self, metrics: Mapping[str, float], micro_step: int) -> None:
        finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
        if len(finite) < len(metrics):
            self.nonfinite += len(metrics) - len(finite)
            finite["nonfinite_values"] = self.nonfinite
        self.run.log_metrics(finite, step=micro_step // self.accumulation_steps, micro_step=micro_step)


class PruneTrial(Observer):
    """Reports ``engine.monitor`` after each evaluation to the Optuna trial this job runs for, and ends
    training when the trial's pruner prunes it (the sweeper then records the trial as PRUNED)."""

    def __init__(self, trial: StudyTrial, monitor: str) -> None:
        self.trial, self.monitor = trial, monitor

    def on_evaluation(
        self, epoch: int, micro_step: int, metrics: Mapping[str, float], history: Sequence[Mapping[str, float]]
    ) -> Stop | None:
        value = metrics.get(self.monitor)
        if value is None or not self.trial.pruned(value, epoch):
            return None
        pruner = type(self.trial.pruner).__name__
        return Stop("pruned", f"pruned by {pruner} (Optuna trial {self.trial.number}): {self.monitor} {value:.4f}")


def stop_tags(stopped: Mapping) -> dict[str, str]:
    """MLflow tags of a run that ended early: at which epoch, why, and ``pruned=true`` for a pruned trial."""
    tags = {"stopped_epoch": str(stopped["epoch"]), "stop_reason": str(stopped["reason"])}
    if stopped["kind"] == "pruned":
        tags["pruned"] = "true"
    return tags
