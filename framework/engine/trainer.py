"""Training loop (``engine/`` configs): per-step lr, eval every N epochs, checkpoints, exact resume.

One epoch = ``steps_per_epoch`` micro-batches; the optimizer updates every ``accumulation_steps`` of
them and the lr schedule has one value per update, set before it. ``last.ckpt`` (every epoch, and every
``checkpoint_every_n_steps`` updates) holds the whole training state, so ``resume`` continues where
it stopped: same weights, optimizer moments, lr position, loss scale, EMA, RNG and data position.

A NaN/Inf loss skips its update; ``max_nonfinite_steps`` of them in a row stop the run (``TrainingDiverged``)
with the last checkpoint written before them. SIGTERM/SIGINT in a single process end the run after the
current step, with its state saved (``framework.runtime.signals.deferred_stop``).

Data parallel (``World`` of several ranks): each rank trains on its shard of every epoch, gradients are
averaged in the step, validation is sharded and summed over ranks; only rank 0 logs and writes files.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import mindspore as ms
import mindspore.nn as nn
import numpy as np
from mindspore import Parameter

from framework.data.pipeline import ImageData
from framework.engine.checkpoint import MICRO_STEP, checkpoint_micro_step, restore_parameters, save_checkpoint
from framework.engine.evaluate import evaluate
from framework.engine.losses import HeadsLoss
from framework.engine.observers import EarlyStopping, Observer, Stop
from framework.engine.step import EMA, AmpLevel, LossScale, TrainStep, apply_amp, make_loss_scaler, recompute_cells
from framework.errors import UserError
from framework.optim.schedules import LrGroups, Schedule, UpdateLr
from framework.runtime.signals import Interrupted, signal_name, stop_requested
from framework.runtime.world import SINGLE_PROCESS, World
from framework.schema import NonNegative, OpenFraction, Positive, Range

_FLOAT_TYPES = (ms.float16, ms.bfloat16, ms.float32, ms.float64)


class TrainingDiverged(UserError, RuntimeError):
    """The loss stayed NaN/Inf for ``max_nonfinite_steps`` consecutive steps."""

    kind = "training error"


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
    lr_groups: LrGroups | None = None  # per-group lr multipliers and frozen groups (optimizer fine-tuning settings)


@dataclass
class TrainingState:
    """A training-state checkpoint as read (every tensor checked against its checksum): tensors and metadata."""

    params: dict[str, Parameter]
    meta: dict[str, Any]

    @property
    def micro_step(self) -> int:
        """The micro-step (micro-batches trained) the state was written at."""
        return checkpoint_micro_step(self.meta)

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
        epochs: Annotated[int, Positive],
        eval_every_n_epochs: Annotated[int, Positive] = 1,
        checkpoint_every_n_epochs: Annotated[int, NonNegative] = 0,
        checkpoint_every_n_steps: Annotated[int, NonNegative] = 0,
        keep_checkpoint_max: Annotated[int, Positive] = 1,
        monitor: str = "val_top1",
        monitor_mode: Literal["max", "min"] = "max",
        limit_train_batches: Annotated[int, NonNegative] | None = None,
        amp_level: AmpLevel = "O0",
        loss_scale: LossScale = "none",
        loss_scale_value: Annotated[float, Positive] = 1024.0,
        loss_scale_factor: Annotated[int, Range(1, low_inclusive=False)] = 2,
        loss_scale_window: Annotated[int, Positive] = 1000,
        clip_grad_norm: Annotated[float, Positive] | None = None,
        accumulation_steps: Annotated[int, Positive] = 1,
        ema_decay: Annotated[float, OpenFraction] | None = None,
        eval_ema: bool = False,
        max_nonfinite_steps: Annotated[int, Positive] = 5,
        early_stopping: EarlyStopping | None = None,
        freeze_bn_stats: bool = False,
        recompute: Sequence[str] = (),
    ) -> None:
        # Types, choices and ranges are the schema's (framework.config, before any task runs); this pair is not.
        if eval_ema and ema_decay is None:
            raise ValueError("engine.eval_ema=true needs engine.ema_decay (e.g. 0.9998)")
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
        self.freeze_bn_stats = freeze_bn_stats
        self.recompute = list(recompute)

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
        """Everything ``fit`` trains with; the optimizer's lr must be an ``UpdateLr`` (set per update).
        ``freeze_bn_stats``: BatchNorm layers normalise with their running statistics and never update them;
        ``recompute``: regexes of the cells whose activations the backward recomputes."""
        update_lr, lr_groups = (
            getattr(optimizer, "update_lr", optimizer.learning_rate),
            getattr(optimizer, "lr_groups", None),
        )
        if not isinstance(update_lr, UpdateLr):
            raise TypeError("the optimizer's learning_rate must be an UpdateLr, which the trainer sets per update")
        if self.freeze_bn_stats:
            for _, cell in network.cells_and_names():
                if isinstance(cell, nn.BatchNorm2d):
                    cell.use_batch_statistics = False
        recompute_cells(network, self.recompute)
        network, step = self.train_step(network, loss_fn, optimizer, world)
        ema = EMA(network, self.ema_decay) if self.ema_decay else None
        lrs = [update_lr.value, *(lr_groups.factors if lr_groups is not None else [])]
        state = _training_state(network, optimizer, step, ema, lrs)
        return Prepared(network, step, ema, update_lr, state, lr_groups)

    def ended(self, resume: TrainingState, steps_per_epoch: int) -> str | None:
        """Why a run resumed from ``resume`` has nothing left to do (all epochs trained, or stopped early)."""
        stopped = resume.meta.get("stopped")
        if stopped:
            return f"training ended early after epoch {stopped['epoch']} ({stopped['reason']})"
        if resume.micro_step >= self.epochs * steps_per_epoch:
            epochs = resume.micro_step // steps_per_epoch
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

    def evaluated_weights(self, ema: EMA | None) -> AbstractContextManager[None]:
        """Within it the network holds the weights that are evaluated and saved as best: EMA's or its own."""
        return ema.swapped_in() if ema is not None and self.eval_ema else nullcontext()

    def fit(
        self,
        prepared: Prepared,
        schedule: Schedule,
        data: ImageData,
        checkpoint_dir: Path,
        checkpoint_meta: dict[str, Any],
        resume: TrainingState | None = None,
        world: World = SINGLE_PROCESS,
        observers: Sequence[Observer] = (),
    ) -> FitResult:
        """Train (from the training state ``resume`` if given), telling ``observers`` what happens.

        The optimizer's learning rate is set to ``schedule[update]`` before each update. Observers hear each
        step, evaluation, epoch end and checkpoint (see ``Observer``) and may end training after an
        evaluation. Over several ranks each trains on its data shard; only the main rank writes checkpoints.
        A stop signal recorded by ``framework.runtime.signals.deferred_stop`` (entered by the caller) ends
        training after the current accumulation, with its state saved.
        """
        result, micro_step = FitResult(), 0
        if resume is not None:
            micro_step = self._resume(resume, prepared.state, result)
            if self.ended(resume, self.steps_per_epoch(data.steps_per_epoch(world.size))):
                return result  # the train task says so before it opens the run
        prepared.step.micro_step = micro_step
        fit = _Fit(
            self, prepared, schedule, data, world, tuple(observers), result, micro_step, checkpoint_dir, checkpoint_meta
        )
        return fit.run()

    @staticmethod
    def _resume(resume: TrainingState, state: dict[str, Parameter], result: FitResult) -> int:
        """Restore the training state ``resume``; returns the micro-step it was written at."""
        restore_parameters(state, resume.params)
        ms.set_rng_state(ms.Tensor(np.asarray(resume.meta["rng_state"], np.uint8)))
        result.history = list(resume.meta.get("history", []))
        result.best = resume.meta.get("best")
        result.stopped = resume.meta.get("stopped")
        return resume.micro_step


class _Fit:
    """One call of ``Trainer.fit``: what it trains and the loop's running state (micro-step, streaks, speed)."""

    def __init__(
        self,
        trainer: Trainer,
        prepared: Prepared,
        schedule: Schedule,
        data: ImageData,
        world: World,
        observers: tuple[Observer, ...],
        result: FitResult,
        micro_step: int,
        checkpoint_dir: Path,
        checkpoint_meta: dict[str, Any],
    ) -> None:
        self.trainer, self.prepared, self.schedule, self.data, self.world = trainer, prepared, schedule, data, world
        self.checkpoint_dir, self.checkpoint_meta = checkpoint_dir, checkpoint_meta
        self.observers, self.result, self.micro_step = observers, result, micro_step
        self.steps_per_epoch = trainer.steps_per_epoch(data.steps_per_epoch(world.size))
        self.running_statistics = _running_statistics(prepared.network, prepared.ema)
        self.skipped = 0  # updates skipped by the loss scaler
        self.nonfinite = 0  # consecutive micro-steps with a NaN/Inf loss
        self.img_per_s = 0.0

    def run(self) -> FitResult:
        self._emit("on_fit_start", self.trainer.epochs, self.steps_per_epoch, self.micro_step)
        try:
            for epoch in range(self.micro_step // self.steps_per_epoch + 1, self.trainer.epochs + 1):
                self._train_epoch(epoch)
                if self._end_epoch(epoch):
                    break
        finally:
            self._emit("on_fit_end")
        return self.result

    def _emit(self, event: str, *args: Any) -> None:
        for observer in self.observers:
            getattr(observer, event)(*args)

    def _train_epoch(self, epoch: int) -> None:
        """The epoch's micro-batches from where the run stands (a resumed job skips those done)."""
        self.prepared.network.set_train(True)
        if self.prepared.lr_groups is not None:
            self.prepared.lr_groups.start_epoch(epoch)
        self._emit("on_epoch_start", epoch)
        loader = self.data.loader("train", self.world.rank, self.world.size, epoch=epoch - 1)
        loader = loader.take(self.steps_per_epoch).skip(self.micro_step % self.steps_per_epoch)
        images_seen, timed_since = 0, None
        for images, labels in loader.create_tuple_iterator(num_epochs=1):
            metrics = self._step(images, labels)
            if timed_since is None:  # the first step of an epoch may include graph compilation
                timed_since = time.perf_counter()
            else:
                images_seen += images.shape[0] * self.world.size  # all ranks: the job's throughput
            self.img_per_s = images_seen / max(time.perf_counter() - timed_since, 1e-9)
            self._emit("on_step", epoch, self.micro_step, metrics, self.img_per_s)
            self._after_step(epoch, metrics["train_loss"])

    def _step(self, images: ms.Tensor, labels: ms.Tensor) -> dict[str, float]:
        """One micro-batch at the lr of the update it is part of; its metrics (and the loss scaler's)."""
        step, accumulation_steps = self.prepared.step, self.trainer.accumulation_steps
        lr = float(self.schedule[self.micro_step // accumulation_steps])
        self.prepared.update_lr.set(lr)
        loss, finite = step(images, labels)
        loss, finite = float(loss.asnumpy()), bool(finite.asnumpy())
        self.micro_step = step.micro_step
        metrics = {"train_loss": loss, "lr": lr}
        if self._updated():
            if self.prepared.ema is not None and finite:
                self.prepared.ema.update()
            if step.loss_scaler is not None:  # overflowing updates are skipped, and counted
                self.skipped += not finite
                metrics.update(loss_scale=step.loss_scale, skipped_steps=self.skipped)
        self.nonfinite = 0 if np.isfinite(loss) else self.nonfinite + 1
        return metrics

    def _updated(self) -> bool:
        """The micro-step just done ended an accumulation: the optimizer updated."""
        return self.micro_step % self.trainer.accumulation_steps == 0

    def _after_step(self, epoch: int, loss: float) -> None:
        """End a diverged run; write a mid-epoch checkpoint when one is due or a stop signal waits for it."""
        trainer = self.trainer
        if self.nonfinite >= trainer.max_nonfinite_steps:
            raise TrainingDiverged(self._diverged_message(loss, epoch))
        every = trainer.checkpoint_every_n_steps
        mid_epoch = self.micro_step % self.steps_per_epoch != 0  # the epoch's end has its own checkpoint
        updated = self._updated()
        periodic = updated and every and (self.micro_step // trainer.accumulation_steps) % every == 0 and mid_epoch
        # a stop waits for the end of an accumulation: its partial gradient sum is not saved
        stopping = stop_requested() and mid_epoch and updated
        if (periodic or stopping) and self.world.is_main and not self.nonfinite:  # no state from a bad streak
            self._save_state(epoch - 1, f"step_{self.micro_step:08d}" if periodic else None)
        if stopping:
            raise Interrupted(self._stopped_message(epoch), stop_requested())

    def _end_epoch(self, epoch: int) -> bool:
        """Average BatchNorm statistics over ranks, evaluate when due, checkpoint; True when training ends here."""
        trainer, result = self.trainer, self.result
        self.world.average(self.running_statistics)  # same statistics on every rank, as timm's distribute_bn
        metrics = {"epoch": epoch, "train_img_per_s": self.img_per_s, **self.data.health_metrics()}
        evaluated = epoch % trainer.eval_every_n_epochs == 0 or epoch == trainer.epochs
        if evaluated:
            with trainer.evaluated_weights(self.prepared.ema):
                val = evaluate(
                    self.prepared.network, self.data.loader("val", self.world.rank, self.world.size), self.world
                )
            metrics.update({f"val_{k}": v for k, v in val.items()})
        self._emit("on_epoch_end", epoch, self.micro_step, metrics)
        result.history.append(metrics)
        if evaluated:  # every evaluation is heard; after the last epoch there is nothing left to stop
            stopped = _stop_decision(self.observers, epoch, self.micro_step, result.history, self.world)
            result.stopped = stopped if epoch < trainer.epochs else None
        if not self.nonfinite:
            self._checkpoint_epoch(epoch, metrics)
        if result.stopped is not None:
            self._emit("on_stop", epoch, result.stopped)
            return True
        if stop_requested() and epoch < trainer.epochs:  # after the last epoch the run is simply done
            raise Interrupted(self._stopped_message(epoch), stop_requested())
        return False

    def _diverged_message(self, loss: float, epoch: int) -> str:
        last_good, count, micro_step = self.result.checkpoints.get("last"), self.nonfinite, self.micro_step
        return (
            f"train loss was {loss} for {count} consecutive steps (steps {micro_step - count + 1}-{micro_step}, "
            f"epoch {epoch}; engine.max_nonfinite_steps={self.trainer.max_nonfinite_steps}); their updates were "
            f"skipped. Last good checkpoint: {last_good or 'none written yet'}. "
            "Lower scheduler.lr, set engine.clip_grad_norm, or check the data"
        )

    def _stopped_message(self, epoch: int) -> str:
        saved, signum = self.result.checkpoints.get("last"), stop_requested() or signal.SIGTERM
        return (
            f"stopped by {signal_name(signum)} at step {self.micro_step} (epoch {epoch}); "
            f"training state saved in {saved}"
        )

    def _save_state(self, epoch: int, periodic_name: str | None) -> None:
        """Write the training state to last.ckpt and, if named, a periodic file (newest few kept)."""
        directory, result = self.checkpoint_dir, self.result
        meta = {
            **self.checkpoint_meta, "epoch": epoch, MICRO_STEP: self.micro_step, "history": result.history,
            "best": result.best, "stopped": result.stopped, "rng_state": ms.get_rng_state().asnumpy().tolist(),
        }  # fmt: skip
        result.checkpoints["last"] = save_checkpoint(self.prepared.state, directory / "last.ckpt", meta)
        if periodic_name:
            save_checkpoint(self.prepared.state, directory / f"{periodic_name}.ckpt", meta)
            prefix = periodic_name.split("_")[0]
            for stale in sorted(directory.glob(f"{prefix}_*.ckpt"))[: -self.trainer.keep_checkpoint_max]:
                stale.unlink()
        self._emit("on_checkpoint", self.micro_step, result.checkpoints["last"])

    def _checkpoint_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """last.ckpt every epoch, best.ckpt (the evaluated weights) when ``monitor`` improves, periodic files;
        every rank keeps the same record, the main rank writes the files."""
        trainer, result = self.trainer, self.result
        value = metrics.get(trainer.monitor)
        improved = value is not None and (
            result.best is None or trainer.monitor_sign * (value - result.best[trainer.monitor]) > 0
        )
        if improved:
            result.best = metrics
        if not self.world.is_main:
            return
        if improved:
            best_meta = {
                **self.checkpoint_meta, "epoch": epoch, MICRO_STEP: self.micro_step, "metrics": metrics,
                "ema": trainer.eval_ema,
            }  # fmt: skip
            with trainer.evaluated_weights(self.prepared.ema):
                result.checkpoints["best"] = save_checkpoint(
                    self.prepared.network, self.checkpoint_dir / "best.ckpt", best_meta
                )
        periodic = trainer.checkpoint_every_n_epochs and epoch % trainer.checkpoint_every_n_epochs == 0
        self._save_state(epoch, f"epoch_{epoch:04d}" if periodic else None)


def _stop_decision(
    observers: tuple[Observer, ...], epoch: int, micro_step: int, history: list[dict[str, float]], world: World
) -> dict[str, Any] | None:
    """Every observer hears the evaluation; the first ``Stop`` ends training. Over several ranks all stop
    together: a stop only rank 0 can see (a sweep trial's pruning) reaches the others by an all-reduce."""
    stops = [o.on_evaluation(epoch, micro_step, history[-1], history) for o in observers]
    stop = next((s for s in stops if s is not None), None)
    if world.size > 1 and world.all_reduce_sum(np.array([float(stop is not None)]))[0] > 0 and stop is None:
        stop = Stop("rank0", "rank 0 ended training")
    return stop.record(epoch) if stop is not None else None


def _training_state(
    network: nn.Cell, optimizer: nn.Optimizer, step: TrainStep, ema: EMA | None, lrs: list[Parameter]
) -> dict[str, Parameter]:
    """Everything exact resume needs, by unique name: weights and BN statistics, optimizer state, loss scale, EMA.

    The lr Parameters ``lrs`` are not in it: the trainer sets them from the schedule before every update (and the
    groups' by epoch)."""
    left_out = {id(lr) for lr in lrs}
    state = {p.name: p for p in network.get_parameters()}
    state.update({p.name: p for p in optimizer.get_parameters() if id(p) not in left_out})
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
