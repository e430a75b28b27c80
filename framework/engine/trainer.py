"""Training loop (``engine/`` configs): per-step lr, eval every N epochs, last/best/periodic checkpoints."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mindspore.dataset as ds
import mindspore.nn as nn
import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from framework.engine.checkpoint import save_checkpoint
from framework.engine.evaluate import evaluate
from framework.engine.losses import HeadsLoss
from framework.tracking import MlflowRun


@dataclass
class FitResult:
    """What a training run produced: per-epoch val metrics, the best epoch and checkpoint files."""

    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] | None = None
    checkpoints: dict[str, Path] = field(default_factory=dict)

    @property
    def last(self) -> dict[str, float] | None:
        return self.history[-1] if self.history else None


class Trainer:
    """Runs ``epochs`` of training with a compiled train step, evaluating and checkpointing as configured."""

    def __init__(
        self,
        epochs: int,
        eval_every_n_epochs: int = 1,
        checkpoint_every_n_epochs: int = 0,
        keep_checkpoint_max: int = 1,
        monitor: str = "val_top1",
        limit_train_batches: int | None = None,
    ) -> None:
        self.epochs = epochs
        self.eval_every_n_epochs = eval_every_n_epochs
        self.checkpoint_every_n_epochs = checkpoint_every_n_epochs
        self.keep_checkpoint_max = keep_checkpoint_max
        self.monitor = monitor
        self.limit_train_batches = limit_train_batches

    def steps_per_epoch(self, train_loader: ds.Dataset) -> int:
        steps = train_loader.get_dataset_size()
        return min(steps, self.limit_train_batches) if self.limit_train_batches else steps

    def fit(
        self,
        network: nn.Cell,
        loss_fn: nn.Cell,
        optimizer: nn.Optimizer,
        lr_per_step: np.ndarray,
        train_loader: ds.Dataset,
        val_loader: ds.Dataset,
        run: MlflowRun,
        checkpoint_dir: Path,
        checkpoint_meta: dict[str, Any],
        data_metrics: Callable[[], dict[str, float]] | None = None,
    ) -> FitResult:
        """Train; ``data_metrics()`` adds data-health figures (e.g. skipped images) to each epoch's metrics."""
        steps_per_epoch = self.steps_per_epoch(train_loader)
        if self.limit_train_batches:
            train_loader = train_loader.take(steps_per_epoch)
        train_step = nn.TrainOneStepCell(HeadsLoss(network, loss_fn), optimizer)
        batches = train_loader.create_tuple_iterator(num_epochs=self.epochs)
        result = FitResult()
        global_step, report_every = 0, max(1, steps_per_epoch // 10)
        with _progress() as progress:
            task = progress.add_task("train", total=self.epochs * steps_per_epoch, loss=float("nan"), lr=0.0, ips=0.0)
            for epoch in range(1, self.epochs + 1):
                network.set_train(True)
                progress.update(task, description=f"epoch {epoch}/{self.epochs}")
                images_seen, timed_since = 0, None
                for images, labels in batches:
                    loss = float(train_step(images, labels).asnumpy())
                    lr = float(lr_per_step[global_step])
                    global_step += 1
                    run.log_metrics({"train_loss": loss, "lr": lr}, step=global_step)
                    if timed_since is None:  # the first step of an epoch may include graph compilation
                        timed_since = time.perf_counter()
                    else:
                        images_seen += images.shape[0]
                    ips = images_seen / max(time.perf_counter() - timed_since, 1e-9)
                    progress.update(task, advance=1, loss=loss, lr=lr, ips=ips)
                    if not progress.console.is_terminal and global_step % report_every == 0:
                        # Logs and batch jobs get no live bar: a plain line ten times per epoch instead.
                        remaining = progress.tasks[task].time_remaining
                        progress.console.print(
                            f"epoch {epoch}/{self.epochs} step {global_step}/{self.epochs * steps_per_epoch} "
                            f"loss {loss:.4f} lr {lr:.2e} {ips:.1f} img/s eta {remaining or 0:.0f} s"
                        )
                    if not np.isfinite(loss):
                        raise FloatingPointError(f"train loss is {loss} at step {global_step} (epoch {epoch})")
                epoch_metrics = {"epoch": epoch, "train_img_per_s": ips, **(data_metrics() if data_metrics else {})}
                if epoch % self.eval_every_n_epochs == 0 or epoch == self.epochs:
                    val = evaluate(network, val_loader)
                    epoch_metrics.update({f"val_{k}": v for k, v in val.items()})
                    progress.console.print(
                        f"epoch {epoch}: val_loss {val['loss']:.4f}  val_top1 {val['top1']:.4f}  "
                        f"val_top5 {val['top5']:.4f}  train {ips:.1f} img/s"
                    )
                run.log_metrics({k: v for k, v in epoch_metrics.items() if k != "epoch"}, step=epoch)
                run.flush()
                result.history.append(epoch_metrics)
                self._checkpoint(network, epoch, global_step, epoch_metrics, result, checkpoint_dir, checkpoint_meta)
        return result

    def _checkpoint(
        self,
        network: nn.Cell,
        epoch: int,
        global_step: int,
        metrics: dict[str, float],
        result: FitResult,
        directory: Path,
        meta: dict[str, Any],
    ) -> None:
        """Write last.ckpt every epoch, best.ckpt when the monitored metric improves, and periodic files."""
        meta = {**meta, "epoch": epoch, "global_step": global_step, "metrics": metrics}
        result.checkpoints["last"] = save_checkpoint(network, directory / "last.ckpt", meta)
        value = metrics.get(self.monitor)
        if value is not None and (result.best is None or value > result.best[self.monitor]):
            result.best = metrics
            result.checkpoints["best"] = save_checkpoint(network, directory / "best.ckpt", meta)
        if self.checkpoint_every_n_epochs and epoch % self.checkpoint_every_n_epochs == 0:
            save_checkpoint(network, directory / f"epoch_{epoch:04d}.ckpt", meta)
            for stale in sorted(directory.glob("epoch_*.ckpt"))[: -self.keep_checkpoint_max]:
                stale.unlink()


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=10),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e} {task.fields[ips]:.1f} img/s"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
