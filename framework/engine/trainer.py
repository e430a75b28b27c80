"""Training loop (``engine/`` configs): per-step lr, eval every N epochs, checkpoints, exact resume.

One epoch = ``steps_per_epoch`` micro-batches; the optimizer updates every ``accumulation_steps`` of
them and the lr schedule has one value per update, set before it. ``last.ckpt`` (every epoch, and every
``checkpoint_every_n_steps`` updates) holds the whole training state, so ``resume`` continues where
it stopped: same weights, optimizer moments, lr position, loss scale, EMA, RNG and data position.

A NaN/Inf loss skips its update; ``max_nonfinite_steps`` of them in a row stop the run (``TrainingDiverged``)
with the last checkpoint written before them. SIGTERM/SIGINT in a single process end the run after the
current step, with its state saved (``framework.launch.signals.deferred_stop``).

Data parallel (``World`` of several ranks): each rank trains on its shard of every epoch, gradients are
averaged in the step, validation is sharded and summed over ranks; only rank 0 logs and writes files.
"""

from __future__ import annotations

import signal
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mindspore as ms
import mindspore.nn as nn
import numpy as np
from mindspore import Parameter
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from framework.data.pipeline import ImageData
from framework.engine.checkpoint import restore_parameters, save_checkpoint
from framework.engine.evaluate import evaluate
from framework.engine.losses import HeadsLoss
from framework.engine.observers import EarlyStopping, Observer, Stop
from framework.engine.step import AMP_LEVELS, EMA, TrainStep, apply_amp, make_loss_scaler
from framework.launch.distributed import SINGLE_PROCESS, World
from framework.launch.signals import Interrupted, deferred_stop, signal_name, stop_requested
from framework.optim.schedules import Schedule, UpdateLr
from framework.tracking import MlflowRun

_FLOAT_TYPES = (ms.float16, ms.bfloat16, ms.float32, ms.float64)


class TrainingDiverged(RuntimeError):
    """The loss stayed NaN/Inf for ``max_nonfinite_steps`` consecutive steps."""


@dataclass
class FitResult:
    """What a training run produced: per-epoch val metrics, the best epoch and checkpoint files."""

    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] | None = None
    checkpoints: dict[str, Path] = field(default_factory=dict)
    stopped: dict[str, Any] | None = None  # an observer ended training early: its kind, reason and epoch

    @property
    def last(self) -> dict[str, float] | None:
        return self.history[-1] if self.history else None


@dataclass
class Prepared:
    """What training runs on, built before any MLflow run opens: the network (cast for AMP), its compiled
    step, the EMA weights, the optimizer's lr and the training state that checkpoints hold, by name."""

    network: nn.Cell
    step: TrainStep
    ema: EMA | None
    update_lr: UpdateLr
    state: dict[str, Parameter]


@dataclass
class TrainingState:
    """A training-state checkpoint as read (every tensor checked against its checksum): tensors and metadata."""

    params: dict[str, Parameter]
    meta: dict[str, Any]

    @property
    def micro_steps(self) -> int:
        return int(self.meta["global_step"])

    def mismatch(self, state: dict[str, Parameter]) -> str | None:
        """Why these tensors cannot be this run's state (the first missing tensor or differing shape), or None."""
        for name, target in state.items():
            if name not in self.params:
                return f"it lacks {name} (and {sum(n not in self.params for n in state) - 1} more of this run's state)"
            if tuple(self.params[name].shape) != tuple(target.shape):
                return f"{name} has shape {tuple(self.params[name].shape)} there, {tuple(target.shape)} in this run"
        return None


class Trainer:
    """Runs ``epochs`` of training with a compiled train step, evaluating and checkpointing as configured."""

    def __init__(
        self,
        epochs: int,
        eval_every_n_epochs: int = 1,
        checkpoint_every_n_epochs: int = 0,
        checkpoint_every_n_steps: int = 0,
        keep_checkpoint_max: int = 1,
        monitor: str = "val_top1",
        monitor_mode: str = "max",
        limit_train_batches: int | None = None,
        amp_level: str = "O0",
        loss_scale: str = "none",
        loss_scale_value: float = 1024.0,
        loss_scale_factor: int = 2,
        loss_scale_window: int = 1000,
        clip_grad_norm: float | None = None,
        accumulation_steps: int = 1,
        ema_decay: float | None = None,
        eval_ema: bool = False,
        max_nonfinite_steps: int = 5,
        early_stopping: EarlyStopping | None = None,
    ) -> None:
        if eval_ema and ema_decay is None:
            raise ValueError("engine.eval_ema=true needs engine.ema_decay (e.g. 0.9998)")
        make_loss_scaler(loss_scale, loss_scale_value, loss_scale_factor, loss_scale_window)  # validate now
        if monitor_mode not in ("max", "min"):
            raise ValueError(f"engine.monitor_mode must be 'max' or 'min', got '{monitor_mode}'")
        if amp_level not in AMP_LEVELS:
            raise ValueError(f"engine.amp_level must be one of {', '.join(AMP_LEVELS)}, got '{amp_level}'")
        self.epochs = epochs
        self.eval_every_n_epochs = eval_every_n_epochs
        self.checkpoint_every_n_epochs = checkpoint_every_n_epochs
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.keep_checkpoint_max = keep_checkpoint_max
        self.monitor, self.monitor_sign = monitor, 1.0 if monitor_mode == "max" else -1.0
        self.limit_train_batches = limit_train_batches
        self.amp_level = amp_level
        self.loss_scale = (loss_scale, loss_scale_value, loss_scale_factor, loss_scale_window)
        self.clip_grad_norm = clip_grad_norm
        self.accumulation_steps = accumulation_steps
        self.ema_decay, self.eval_ema = ema_decay, eval_ema
        self.max_nonfinite_steps = max_nonfinite_steps
        self.early_stopping = early_stopping

    def steps_per_epoch(self, batches_per_epoch: int) -> int:
        """Micro-batches used per epoch: all full batches (or ``limit_train_batches``), whole accumulations only."""
        steps = min(batches_per_epoch, self.limit_train_batches) if self.limit_train_batches else batches_per_epoch
        return steps - steps % self.accumulation_steps

    def updates_per_epoch(self, batches_per_epoch: int) -> int:
        """Optimizer updates per epoch: the length of one epoch of the lr schedule."""
        return self.steps_per_epoch(batches_per_epoch) // self.accumulation_steps

    def prepare(
        self, network: nn.Cell, loss_fn: nn.Cell, optimizer: nn.Optimizer, world: World = SINGLE_PROCESS
    ) -> Prepared:
        """Everything ``fit`` trains with; the optimizer's lr must be an ``UpdateLr`` (set per update)."""
        update_lr = optimizer.learning_rate
        if not isinstance(update_lr, UpdateLr):
            raise TypeError("the optimizer's learning_rate must be an UpdateLr, which the trainer sets per update")
        network, step = self.train_step(network, loss_fn, optimizer, world)
        ema = EMA(network, self.ema_decay) if self.ema_decay else None
        return Prepared(network, step, ema, update_lr, _training_state(network, optimizer, step, ema))

    def ended(self, resume: TrainingState, steps_per_epoch: int) -> str | None:
        """Why a run resumed from ``resume`` has nothing left to do (all epochs trained, or stopped early)."""
        stopped = resume.meta.get("stopped")
        if stopped:
            return f"training ended early after epoch {stopped['epoch']} ({stopped['reason']})"
        if resume.micro_steps >= self.epochs * steps_per_epoch:
            epochs = resume.micro_steps // steps_per_epoch
            return f"it has trained all {epochs} epochs (engine.epochs={self.epochs})"
        return None

    def train_step(
        self, network: nn.Cell, loss_fn: nn.Cell, optimizer: nn.Optimizer, world: World = SINGLE_PROCESS
    ) -> tuple[nn.Cell, TrainStep]:
        """The network cast to ``amp_level``, and its step with this engine's scaling, clipping, accumulation
        and (over several ranks) gradient averaging."""
        network = apply_amp(network, self.amp_level)
        loss_scaler = make_loss_scaler(*self.loss_scale)
        step = TrainStep(
            HeadsLoss(network, loss_fn),
            optimizer,
            loss_scaler,
            self.clip_grad_norm,
            self.accumulation_steps,
            world.grad_reducer(optimizer.parameters),
        )
        return network, step

    def fit(
        self,
        prepared: Prepared,
        schedule: Schedule,
        data: ImageData,
        run: MlflowRun | None,
        checkpoint_dir: Path,
        checkpoint_meta: dict[str, Any],
        resume: TrainingState | None = None,
        world: World = SINGLE_PROCESS,
        observers: tuple[Observer, ...] = (),
    ) -> FitResult:
        """Train (from the training state ``resume`` if given), logging to ``run`` (None: don't log).

        The optimizer's learning rate is set to ``schedule[update]`` before each update. ``observers`` (and
        ``early_stopping``) hear each evaluation and may end training after it. Over several ranks each
        trains on its data shard; only the main rank writes checkpoints.
        """
        steps_per_epoch = self.steps_per_epoch(data.steps_per_epoch(world.size))
        network, step, ema, update_lr, state = (
            prepared.network, prepared.step, prepared.ema, prepared.update_lr, prepared.state
        )  # fmt: skip
        running_statistics = _running_statistics(network, ema)
        result, done = FitResult(), 0
        if resume is not None:
            done = self._resume(resume, state, result)
            if self.ended(resume, steps_per_epoch):  # the train task says so before it opens the run
                return result
        step.micro_step = done
        skipped = nonfinite = 0  # updates skipped by the loss scaler; consecutive steps with a NaN/Inf loss
        observers = (self.early_stopping, *observers) if self.early_stopping is not None else observers
        # several ranks must stop at the same step, which a signal to each cannot promise: they stop at once
        stop_at_step_end = deferred_stop() if world.size == 1 else nullcontext()
        with _progress() as progress, stop_at_step_end:
            total = self.epochs * steps_per_epoch
            task = progress.add_task("train", total=total, completed=done, loss=float("nan"), lr=0.0, ips=0.0)
            for epoch in range(done // steps_per_epoch + 1, self.epochs + 1):
                network.set_train(True)
                progress.update(task, description=f"epoch {epoch}/{self.epochs}")
                loader = data.loader("train", world.rank, world.size, epoch=epoch - 1)
                loader = loader.take(steps_per_epoch).skip(done % steps_per_epoch)
                images_seen, timed_since = 0, None
                for images, labels in loader.create_tuple_iterator(num_epochs=1):
                    lr = float(schedule[done // self.accumulation_steps])  # the update this micro-batch is part of
                    update_lr.set(lr)
                    loss, finite = step(images, labels)
                    loss, finite = float(loss.asnumpy()), bool(finite.asnumpy())
                    done = step.micro_step
                    updated = done % self.accumulation_steps == 0  # this micro-batch ended an accumulation
                    metrics = {"train_loss": loss, "lr": lr}
                    if updated:
                        if ema is not None and finite:
                            ema.update()
                        if step.loss_scaler is not None:  # overflowing updates are skipped, and counted
                            skipped += not finite
                            metrics.update(loss_scale=step.loss_scale, skipped_steps=skipped)
                    if run is not None:
                        run.log_metrics(metrics, step=done)
                    if timed_since is None:  # the first step of an epoch may include graph compilation
                        timed_since = time.perf_counter()
                    else:
                        images_seen += images.shape[0] * world.size  # all ranks: the job's throughput
                    ips = images_seen / max(time.perf_counter() - timed_since, 1e-9)
                    progress.update(task, advance=1, loss=loss, lr=lr, ips=ips)
                    self._report(progress, task, epoch, done, total, loss, lr, ips, steps_per_epoch)
                    nonfinite = 0 if np.isfinite(loss) else nonfinite + 1
                    if nonfinite >= self.max_nonfinite_steps:
                        raise TrainingDiverged(self._diverged_message(loss, nonfinite, done, epoch, result))
                    updates = done // self.accumulation_steps
                    every = self.checkpoint_every_n_steps
                    mid_epoch = done % steps_per_epoch != 0  # the epoch's end has its own checkpoint
                    periodic = updated and every and updates % every == 0 and mid_epoch
                    # a stop waits for the end of an accumulation: its partial gradient sum is not saved
                    stopping = stop_requested() and mid_epoch and updated
                    if (periodic or stopping) and world.is_main and not nonfinite:  # no state from a bad streak
                        self._save_state(
                            state, checkpoint_dir, checkpoint_meta, epoch - 1, done, result,
                            f"step_{done:08d}" if periodic else None,
                        )  # fmt: skip
                        _deliver_metrics(run, done)
                    if stopping:
                        raise Interrupted(self._stopped_message(done, epoch, result), stop_requested())
                world.average(running_statistics)  # same BatchNorm statistics on every rank, as timm's distribute_bn
                epoch_metrics = {"epoch": epoch, "train_img_per_s": ips, **data.health_metrics()}
                evaluated = epoch % self.eval_every_n_epochs == 0 or epoch == self.epochs
                if evaluated:
                    val = self._evaluate(network, data, ema, world)
                    epoch_metrics.update({f"val_{k}": v for k, v in val.items()})
                    progress.console.print(
                        f"epoch {epoch}: val_loss {val['loss']:.4f}  val_top1 {val['top1']:.4f}  "
                        f"val_top5 {val['top5']:.4f}  train {ips:.1f} img/s"
                    )
                if run is not None:
                    run.log_metrics({k: v for k, v in epoch_metrics.items() if k != "epoch"}, step=epoch, at=done)
                result.history.append(epoch_metrics)
                if evaluated:  # every evaluation is heard; after the last epoch there is nothing left to stop
                    stopped = _stop_decision(observers, epoch, done, result.history, world)
                    result.stopped = stopped if epoch < self.epochs else None
                if not nonfinite:
                    self._checkpoint_epoch(
                        network, ema, state, epoch, done, epoch_metrics, result, checkpoint_dir, checkpoint_meta, world
                    )
                    _deliver_metrics(run, done)
                if result.stopped is not None:
                    progress.console.print(
                        f"training ends after epoch {epoch}: {result.stopped['reason']}", soft_wrap=True
                    )
                    break
                if stop_requested() and epoch < self.epochs:  # after the last epoch the run is simply done
                    raise Interrupted(self._stopped_message(done, epoch, result), stop_requested())
        return result

    def _diverged_message(self, loss: float, count: int, done: int, epoch: int, result: FitResult) -> str:
        last_good = result.checkpoints.get("last")
        return (
            f"train loss was {loss} for {count} consecutive steps (steps {done - count + 1}-{done}, epoch {epoch}; "
            f"engine.max_nonfinite_steps={self.max_nonfinite_steps}); their updates were skipped. "
            f"Last good checkpoint: {last_good or 'none written yet'}. "
            "Lower scheduler.lr, set engine.clip_grad_norm, or check the data"
        )

    @staticmethod
    def _stopped_message(done: int, epoch: int, result: FitResult) -> str:
        saved, signum = result.checkpoints.get("last"), stop_requested() or signal.SIGTERM
        return f"stopped by {signal_name(signum)} at step {done} (epoch {epoch}); training state saved in {saved}"

    def _evaluated_weights(self, ema: EMA | None) -> AbstractContextManager[None]:
        """Within it the network holds the weights that are evaluated and saved as best: EMA's or its own."""
        return ema.swapped_in() if ema is not None and self.eval_ema else nullcontext()

    def _evaluate(self, network: nn.Cell, data: ImageData, ema: EMA | None, world: World) -> dict[str, float]:
        with self._evaluated_weights(ema):
            return evaluate(network, data.loader("val", world.rank, world.size), world)

    def _report(self, progress: Progress, task: int, epoch: int, done: int, total: int, loss: float, lr: float,
                ips: float, steps_per_epoch: int) -> None:  # fmt: skip
        """Logs and batch jobs get no live bar: a plain line ten times per epoch instead."""
        if not progress.console.is_terminal and done % max(1, steps_per_epoch // 10) == 0:
            remaining = progress.tasks[task].time_remaining
            progress.console.print(
                f"epoch {epoch}/{self.epochs} step {done}/{total} "
                f"loss {loss:.4f} lr {lr:.2e} {ips:.1f} img/s eta {remaining or 0:.0f} s"
            )

    def _save_state(
        self,
        state: dict[str, Parameter],
        directory: Path,
        meta: dict[str, Any],
        epoch: int,
        done: int,
        result: FitResult,
        periodic_name: str | None,
    ) -> None:
        """Write the training state to last.ckpt and, if named, a periodic file (newest few kept)."""
        meta = {
            **meta, "epoch": epoch, "global_step": done, "history": result.history, "best": result.best,
            "stopped": result.stopped, "rng_state": ms.get_rng_state().asnumpy().tolist(),
        }  # fmt: skip
        result.checkpoints["last"] = save_checkpoint(state, directory / "last.ckpt", meta)
        if periodic_name:
            save_checkpoint(state, directory / f"{periodic_name}.ckpt", meta)
            prefix = periodic_name.split("_")[0]
            for stale in sorted(directory.glob(f"{prefix}_*.ckpt"))[: -self.keep_checkpoint_max]:
                stale.unlink()

    def _checkpoint_epoch(
        self,
        network: nn.Cell,
        ema: EMA | None,
        state: dict[str, Parameter],
        epoch: int,
        done: int,
        metrics: dict[str, float],
        result: FitResult,
        directory: Path,
        meta: dict[str, Any],
        world: World,
    ) -> None:
        """last.ckpt every epoch, best.ckpt (the evaluated weights) when ``monitor`` improves, periodic files;
        every rank keeps the same record, the main rank writes the files."""
        value = metrics.get(self.monitor)
        improved = value is not None and (
            result.best is None or self.monitor_sign * (value - result.best[self.monitor]) > 0
        )
        if improved:
            result.best = metrics
        if not world.is_main:
            return
        if improved:
            best_meta = {**meta, "epoch": epoch, "global_step": done, "metrics": metrics, "ema": self.eval_ema}
            with self._evaluated_weights(ema):
                result.checkpoints["best"] = save_checkpoint(network, directory / "best.ckpt", best_meta)
        periodic = self.checkpoint_every_n_epochs and epoch % self.checkpoint_every_n_epochs == 0
        self._save_state(state, directory, meta, epoch, done, result, f"epoch_{epoch:04d}" if periodic else None)

    @staticmethod
    def _resume(resume: TrainingState, state: dict[str, Parameter], result: FitResult) -> int:
        """Restore the training state ``resume``; returns the number of micro-steps already done."""
        restore_parameters(state, resume.params)
        ms.set_rng_state(ms.Tensor(np.asarray(resume.meta["rng_state"], np.uint8)))
        result.history = list(resume.meta.get("history", []))
        result.best = resume.meta.get("best")
        result.stopped = resume.meta.get("stopped")
        return resume.micro_steps


def _stop_decision(
    observers: tuple[Observer, ...], epoch: int, done: int, history: list[dict[str, float]], world: World
) -> dict[str, Any] | None:
    """Every observer hears the evaluation; the first ``Stop`` ends training. Over several ranks all stop
    together: a stop only rank 0 can see (a sweep trial's pruning) reaches the others by an all-reduce."""
    stops = [o.on_evaluation(epoch, done, history[-1], history) for o in observers]
    stop = next((s for s in stops if s is not None), None)
    if world.size > 1 and world.all_reduce_sum(np.array([float(stop is not None)]))[0] > 0 and stop is None:
        stop = Stop("rank0", "rank 0 ended training")
    return stop.record(epoch) if stop is not None else None


def _deliver_metrics(run: MlflowRun | None, done: int) -> None:
    """A checkpoint of step ``done`` is on disk: what was logged up to it may go to MLflow now.

    Later metrics wait for the next checkpoint, so a job resumed from the newest one logs each step once.
    """
    if run is not None:
        run.checkpointed = done
        run.flush()


def _training_state(
    network: nn.Cell, optimizer: nn.Optimizer, step: TrainStep, ema: EMA | None
) -> dict[str, Parameter]:
    """Everything exact resume needs, by unique name: weights and BN statistics, optimizer state, loss scale, EMA.

    The current lr is not in it: the trainer sets it from the schedule before every update."""
    state = {p.name: p for p in network.get_parameters()}
    state.update({p.name: p for p in optimizer.get_parameters() if p is not optimizer.learning_rate.value})
    scaler = vars(step.loss_scaler) if step.loss_scaler is not None else {}
    state.update({f"loss_scaler.{k}": v for k, v in scaler.items() if isinstance(v, Parameter)})
    if ema is not None:
        state.update({p.name: p for p in ema.shadow})
    return state


def _running_statistics(network: nn.Cell, ema: EMA | None) -> list[Parameter]:
    """Float buffers each rank updates from its own data (BatchNorm moving mean/variance), with their EMA copies.

    Trainable weights take the same averaged update on every rank and stay identical; these drift apart.
    """
    params = list(network.get_parameters())
    shadows = list(ema.shadow) if ema is not None else [None] * len(params)
    buffers = [(p, s) for p, s in zip(params, shadows, strict=True) if not p.requires_grad and p.dtype in _FLOAT_TYPES]
    return [p for p, _ in buffers] + [s for _, s in buffers if s is not None]


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
