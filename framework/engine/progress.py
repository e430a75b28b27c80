"""The progress display: a live bar in a terminal, a plain line ten times per epoch in logs and batch jobs."""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from framework.engine.observers import Observer


class ProgressDisplay(Observer):
    """Shows training as the trainer reports it: loss, lr and throughput per step, val metrics per epoch."""

    def __init__(self, console: Console | None = None) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=10),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e} {task.fields[ips]:.1f} img/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task, self.epochs, self.steps_per_epoch = 0, 0, 1

    @property
    def console(self) -> Console:
        return self.progress.console

    def on_fit_start(self, epochs: int, steps_per_epoch: int, micro_step: int) -> None:
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        total = epochs * steps_per_epoch
        self.task = self.progress.add_task(
            "train", total=total, completed=micro_step, loss=float("nan"), lr=0.0, ips=0.0
        )
        self.progress.start()

    def on_epoch_start(self, epoch: int) -> None:
        self.progress.update(self.task, description=f"epoch {epoch}/{self.epochs}")

    def on_step(self, epoch: int, micro_step: int, metrics: Mapping[str, float], img_per_s: float) -> None:
        loss, lr = metrics["train_loss"], metrics["lr"]
        self.progress.update(self.task, advance=1, loss=loss, lr=lr, ips=img_per_s)
        if not self.console.is_terminal and micro_step % max(1, self.steps_per_epoch // 10) == 0:
            remaining = self.progress.tasks[self.task].time_remaining
            self.console.print(
                f"epoch {epoch}/{self.epochs} step {micro_step}/{self.epochs * self.steps_per_epoch} "
                f"loss {loss:.4f} lr {lr:.2e} {img_per_s:.1f} img/s eta {remaining or 0:.0f} s"
            )

    def on_epoch_end(self, epoch: int, micro_step: int, metrics: Mapping[str, float]) -> None:
        if "val_loss" in metrics:
            self.console.print(
                f"epoch {epoch}: val_loss {metrics['val_loss']:.4f}  val_top1 {metrics['val_top1']:.4f}  "
                f"val_top5 {metrics['val_top5']:.4f}  train {metrics['train_img_per_s']:.1f} img/s"
            )

    def on_stop(self, epoch: int, stopped: Mapping[str, str | int]) -> None:
        self.console.print(f"training ends after epoch {epoch}: {stopped['reason']}", soft_wrap=True)

    def on_fit_end(self) -> None:
        self.progress.stop()
