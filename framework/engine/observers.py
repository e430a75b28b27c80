"""What the trainer tells the rest of the job, and how the rest may end training early.

After each evaluation the trainer calls ``on_evaluation`` of its observers; one that returns a ``Stop``
ends training after that epoch, with its checkpoints written as usual (best.ckpt, last.ckpt) and the stop
recorded in last.ckpt, so a resumed job knows the run is over. ``EarlyStopping`` (``engine.early_stopping``)
is one; a sweep trial's pruning is another (wired by the train task).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal


@dataclass(frozen=True)
class Stop:
    """A request to end training after the current epoch: ``kind`` (``early_stopping``, ``pruned``) and why."""

    kind: str
    reason: str

    def record(self, epoch: int) -> dict[str, str | int]:
        """The stop as checkpoint metadata and result (``kind``, ``reason``, ``epoch``)."""
        return {**asdict(self), "epoch": epoch}


class Observer:
    """Receives the trainer's events; every event does nothing unless overridden."""

    def on_evaluation(
        self, epoch: int, step: int, metrics: Mapping[str, float], history: Sequence[Mapping[str, float]]
    ) -> Stop | None:
        """``metrics`` of the evaluation after ``epoch`` (micro-step ``step``); ``history`` holds every epoch
        so far, this one last. Return a ``Stop`` to end training after this epoch."""
        return None


class EarlyStopping(Observer):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` evaluations.

    Decided from the run's history alone, so a resumed run counts on where it stopped. ``patience`` null is off.
    """

    def __init__(
        self,
        monitor: str = "val_top1",
        mode: Literal["max", "min"] = "max",
        patience: int | None = None,
        min_delta: float = 0.0,
    ) -> None:
        self.monitor, self.sign = monitor, 1.0 if mode == "max" else -1.0
        self.patience, self.min_delta = patience, min_delta

    def on_evaluation(
        self, epoch: int, step: int, metrics: Mapping[str, float], history: Sequence[Mapping[str, float]]
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
