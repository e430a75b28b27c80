"""What the trainer tells the rest of the job, and how the rest may end training early.

The trainer has no side effect but its checkpoints: it emits events to its observers, which the train task
wires (MLflow tracking, the progress display, early stopping, a sweep trial's pruning). After each
evaluation an observer may return a ``Stop``: training ends after that epoch, with its checkpoints written
as usual (best.ckpt, last.ckpt) and the stop recorded in last.ckpt, so a resumed job knows the run is over.

Steps are micro-steps: micro-batches trained since the run began (an optimizer update every
``engine.accumulation_steps`` of them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

from framework.schema import NonNegative, Positive


@dataclass(frozen=True)
class Stop:
    """A request to end training after the current epoch: ``kind`` (``early_stopping``, ``pruned``) and why."""

    kind: str
    reason: str

    def record(self, epoch: int) -> dict[str, str | int]:
        """The stop as checkpoint metadata and result (``kind``, ``reason``, ``epoch``)."""
        return {**asdict(self), "epoch": epoch}


class Observer:
    """Receives the trainer's events, in this order; every event does nothing unless overridden."""

    def on_fit_start(self, epochs: int, steps_per_epoch: int, micro_step: int) -> None:
        """Training of ``epochs`` × ``steps_per_epoch`` micro-steps begins (or resumes) at ``micro_step``."""

    def on_epoch_start(self, epoch: int) -> None:
        """Epoch ``epoch`` (from 1) begins."""

    def on_step(self, epoch: int, micro_step: int, metrics: Mapping[str, float], img_per_s: float) -> None:
        """A micro-step is done: ``train_loss``, ``lr`` (and at updates the loss scaler's ``loss_scale``,
        ``skipped_steps``); ``img_per_s`` is the epoch's throughput so far over all ranks."""

    def on_epoch_end(self, epoch: int, micro_step: int, metrics: Mapping[str, float]) -> None:
        """The epoch's record: ``epoch``, ``train_img_per_s``, data health, and ``val_*`` when it was evaluated."""

    def on_evaluation(
        self, epoch: int, micro_step: int, metrics: Mapping[str, float], history: Sequence[Mapping[str, float]]
    ) -> Stop | None:
        """``metrics`` of the evaluation after ``epoch``; ``history`` holds every epoch so far, this one last.
        Return a ``Stop`` to end training after this epoch."""
        return None

    def on_checkpoint(self, micro_step: int, path: Path) -> None:
        """The training state at ``micro_step`` is on disk at ``path`` (a resumed job starts there)."""

    def on_stop(self, epoch: int, stopped: Mapping[str, str | int]) -> None:
        """An observer's ``Stop`` ends training after ``epoch`` (``stopped``: its kind, reason and epoch)."""

    def on_fit_end(self) -> None:
        """Training ended, also when an error or a signal ended it."""


class EarlyStopping(Observer):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` evaluations.

    Decided from the run's history alone, so a resumed run counts on where it stopped. ``patience`` null is off.
    """

    def __init__(
        self,
        monitor: str = "val_top1",
        mode: Literal["max", "min"] = "max",
        patience: Annotated[int, Positive] | None = None,
        min_delta: Annotated[float, NonNegative] = 0.0,
    ) -> None:
        self.monitor, self.sign = monitor, 1.0 if mode == "max" else -1.0
        self.patience, self.min_delta = patience, min_delta

    def on_evaluation(
        self, epoch: int, micro_step: int, metrics: Mapping[str, float], history: Sequence[Mapping[str, float]]
    ) -> Stop | None:
        if self.patience is None:
            return None
        values = [(int(h["epoch"]), float(h[self.monitor])) for h in history if self.monitor in h]
        best_epoch, best, waited = 0, None, 0
        for epoch_done, value in values:
            if best is None or self.sign * (value - best) > self.min_delta:
                best_epoch, best, waited = epoch_done, value, 0
            else:
                waited += 1
        if best is None or waited < self.patience:
            return None
        return Stop(
            "early_stopping",
            f"early stopping: {self.monitor} did not improve by more than {self.min_delta:g} in {waited} "
            f"evaluations (engine.early_stopping.patience={self.patience}); best {best:.4f} at epoch {best_epoch}",
        )
