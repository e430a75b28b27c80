"""The train task's observers of the trainer (``framework.engine.Observer``): MLflow tracking and sweep pruning."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from framework.engine import Observer, Stop
from framework.tracking import MlflowRun
from framework.tracking.study import StudyTrial


class TrackRun(Observer):
    """Logs the trainer's metrics into the job's MLflow run; what a checkpoint covers is delivered at it."""

    def __init__(self, run: MlflowRun) -> None:
        self.run = run

    def on_step(self, epoch: int, micro_step: int, metrics: Mapping[str, float], img_per_s: float) -> None:
        self.run.log_metrics(metrics, step=micro_step)

    def on_epoch_end(self, epoch: int, micro_step: int, metrics: Mapping[str, float]) -> None:
        """Per-epoch metrics are plotted by epoch; they belong to the epoch's last micro-step."""
        self.run.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch, micro_step=micro_step)

    def on_checkpoint(self, micro_step: int, path: Path) -> None:
        self.run.checkpointed(micro_step)


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
