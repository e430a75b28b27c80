"""Learning-rate schedules (``scheduler/`` configs), one value per optimizer update.

Each schedule is a ``Schedule``: ``schedule[i]`` is the lr of update ``i`` (0-based), computed when asked from
its formula, so nothing grows with the length of the run (``engine.epochs=1000000`` costs no memory). The train
step reads the current value from ``UpdateLr``, which the trainer sets before each update. Warmup is linear from
``warmup_lr`` to ``lr`` over ``warmup_epochs`` (``cosine_annealing`` keeps its recipe's variant, see there). The
recipe schedules reproduce the MindSpore model zoo (github.com/mindspore-ai/models) ``src/lr_generator.py`` of
each seed recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Literal

import mindspore as ms
import mindspore.ops as ops
import numpy as np
from mindspore import Parameter, Tensor
from mindspore.nn.learning_rate_schedule import LearningRateSchedule

from framework.schema import NonNegative, Positive, Range, checked

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Formula = Callable[[np.ndarray], np.ndarray]  # float64 lrs of an int64 array of update indices
# Ranges of the scheduler/ settings, for every schedule alike (checked by framework.config before any task runs).
Lr = Annotated[float, Positive]  # a schedule's peak lr
FloorLr = Annotated[float, NonNegative]  # where it starts (warmup) or ends
Epochs = Annotated[float, NonNegative]  # warmup_epochs: 0 is none


class Schedule:
    """The lr of every optimizer update of a run, computed on demand: ``schedule[i]`` (a float32 scalar),
    ``schedule[a:b]`` (an array), ``len(schedule)``; ``np.asarray(schedule)`` builds the whole run.

    Values are the float64 formula rounded to float32, then multiplied by ``factor`` (lr scaling) in float32,
    elementwise: one update's value is the same whether it is computed alone or with the whole run.
    """

    def __init__(self, formula: Formula, total: int, factor: float = 1.0) -> None:
        self.formula, self.total, self.factor = formula, total, factor

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, index: int | slice) -> np.ndarray | np.float32:
        if isinstance(index, slice):
            return self.at(np.arange(*index.indices(self.total), dtype=np.int64))
        position = index + self.total if index < 0 else index
        if not 0 <= position < self.total:
            raise IndexError(f"update {index} is outside the schedule's {self.total} updates")
        return self.at(np.array([position], dtype=np.int64))[0]

    def __array__(self, dtype: np.dtype | None = None) -> np.ndarray:
        values = self[:]
        return values if dtype is None else values.astype(dtype)

    def at(self, updates: np.ndarray) -> np.ndarray:
        """The lrs of the given updates (an int64 array of indices), float32."""
        values = np.asarray(self.formula(updates), dtype=np.float64).astype(np.float32)
        return values if self.factor == 1.0 else (values * self.factor).astype(np.float32)

    def scaled(self, factor: float) -> Schedule:
        """The same schedule with every lr multiplied by ``factor`` (``lr_scaling``)."""
        return Schedule(self.formula, self.total, self.factor * factor)


class UpdateLr(LearningRateSchedule):
    """The optimizer's learning rate: the value of the current update, which the trainer sets from the host
    (``set``) before each step; the compiled step reads it, so its graph does not depend on the schedule."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.value = Parameter(Tensor(value, ms.float32), name="current_lr", requires_grad=False)

    def construct(self, update: Tensor) -> Tensor:  # MindSpore passes the optimizer's update count
        return self.value

    def set(self, value: float) -> None:
        ops.assign(self.value, Tensor(value, ms.float32))  # in place: the compiled step keeps reading it


class GroupLr(LearningRateSchedule):
    """A parameter group's learning rate: the update's (``UpdateLr``'s value) times the group's ``scale``
    (layer-wise decay, the head's multiplier), or 0 while the group is frozen (``LrGroups.start_epoch``)."""

    def __init__(self, base: UpdateLr, scale: float, frozen: bool, name: str) -> None:
        super().__init__()
        self.current_lr = base.value  # the one Parameter the trainer sets per update, shared by every group
        self.scale, self.frozen = float(scale), frozen
        self.factor = Parameter(Tensor(0.0 if frozen else scale, ms.float32), name=name, requires_grad=False)

    def construct(self, update: Tensor) -> Tensor:
        return self.current_lr * self.factor


class LrGroups:
    """The parameter groups' learning rates of an optimizer with lr multipliers or frozen parameters: frozen
    groups learn nothing (lr 0, so no weight decay either) through epoch ``unfreeze_epoch``, then at their scale
    (never with ``unfreeze_epoch`` None). Their state is a function of the epoch: a resumed job sets it again."""

    def __init__(self, base: UpdateLr, unfreeze_epoch: int | None) -> None:
        self.base, self.unfreeze_epoch, self.groups = base, unfreeze_epoch, []

    def group(self, scale: float, frozen: bool) -> GroupLr:
        lr = GroupLr(self.base, scale, frozen, f"lr_group_{len(self.groups)}.factor")
        self.groups.append(lr)
        return lr

    def start_epoch(self, epoch: int) -> None:
        """Set the frozen groups' lr for ``epoch`` (1-based)."""
        thawed = self.unfreeze_epoch is not None and epoch > self.unfreeze_epoch
        for lr in self.groups:
            if lr.frozen:
                ops.assign(lr.factor, Tensor(lr.scale if thawed else 0.0, ms.float32))

    @property
    def factors(self) -> list[Parameter]:
        return [lr.factor for lr in self.groups]


def _warmup_steps(warmup_epochs: float, steps_per_epoch: int, total: int) -> int:
    return min(int(round(warmup_epochs * steps_per_epoch)), total)


def _with_warmup(updates: np.ndarray, decay: np.ndarray, lr: float, warmup_lr: float, warmup_steps: int) -> np.ndarray:
    """``decay`` (lr per update) with its first ``warmup_steps`` updates replaced by a linear ramp to ``lr``."""
    if warmup_steps <= 0:
        return decay
    return np.where(updates < warmup_steps, warmup_lr + (lr - warmup_lr) * updates / warmup_steps, decay)


def _require(ok: bool, key: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"scheduler.{key} must be {rule}, got {value}")


def _check_run(epochs: int, steps_per_epoch: int) -> None:
    """The run length, passed at run time (``engine.epochs``, the dataset's batches): both positive."""
    _require(epochs > 0, "epochs", "> 0", epochs)
    _require(steps_per_epoch > 0, "steps_per_epoch", "> 0", steps_per_epoch)


@checked("scheduler")
def cosine(
    lr: Lr,
    epochs: int,
    steps_per_epoch: int,
    min_lr: FloorLr = 0.0,
    warmup_epochs: Epochs = 0.0,
    warmup_lr: FloorLr = 0.0,
) -> Schedule:
    """Cosine decay from ``lr`` to ``min_lr`` over the steps after warmup (Loshchilov & Hutter 2017)."""
    _check_run(epochs, steps_per_epoch)
    total = epochs * steps_per_epoch
    warmup_steps = _warmup_steps(warmup_epochs, steps_per_epoch, total)

    def formula(updates: np.ndarray) -> np.ndarray:
        progress = np.clip((updates - warmup_steps) / max(total - warmup_steps, 1), 0.0, 1.0)
        decay = min_lr + 0.5 * (lr - min_lr) * (1.0 + np.cos(np.pi * progress))
        return _with_warmup(updates, decay, lr, warmup_lr, warmup_steps)

    return Schedule(formula, total)


@checked("scheduler")
def multistep(
    lr: Lr,
    epochs: int,
    steps_per_epoch: int,
    milestones: Sequence[Annotated[int, NonNegative]] = (),
    gamma: Annotated[float, Positive] = 0.1,
    warmup_epochs: Epochs = 0.0,
    warmup_lr: FloorLr = 0.0,
) -> Schedule:
    """Multiply ``lr`` by ``gamma`` at each epoch in ``milestones`` (the ResNeXt recipe's ``lr_epochs``)."""
    _check_run(epochs, steps_per_epoch)
    total = epochs * steps_per_epoch
    warmup_steps = _warmup_steps(warmup_epochs, steps_per_epoch, total)
    boundaries = np.asarray(sorted(milestones))

    def formula(updates: np.ndarray) -> np.ndarray:
        decay = lr * gamma ** np.searchsorted(boundaries, updates // steps_per_epoch, side="right")
        return _with_warmup(updates, decay.astype(np.float64), lr, warmup_lr, warmup_steps)

    return Schedule(formula, total)


@checked("scheduler")
def cosine_annealing(
    lr: Lr,
    epochs: int,
    steps_per_epoch: int,
    t_max: Annotated[float, Positive],
    eta_min: FloorLr = 0.0,
    warmup_epochs: Epochs = 0.0,
    warmup_lr: FloorLr = 0.0,
) -> Schedule:
    """ResNeXt50 recipe's ``lr_scheduler: cosine_annealing``.

    Reproduces ``warmup_cosine_annealing_lr`` in ``research/cv/ResNeXt/src/lr_generator.py``.
    After warmup, step ``i`` gets ``eta_min + (lr - eta_min) * (1 + cos(pi * e / t_max)) / 2`` with the
    integer epoch ``e = i // steps_per_epoch`` counted from the start of the run (not from the end of
    warmup): the lr is constant within an epoch, and rises again past ``t_max`` as in the reference.
    Warmup step ``i`` gets ``warmup_lr + (lr - warmup_lr) * (i + 1) / warmup_steps``, so it reaches
    ``lr`` on the last warmup step.
    """
    _check_run(epochs, steps_per_epoch)
    _require(eta_min <= lr, "eta_min", f"<= scheduler.lr ({lr})", eta_min)
    total = epochs * steps_per_epoch
    warmup_steps = _warmup_steps(warmup_epochs, steps_per_epoch, total)

    def formula(updates: np.ndarray) -> np.ndarray:
        decay = eta_min + (lr - eta_min) * (1.0 + np.cos(np.pi * (updates // steps_per_epoch) / t_max)) / 2
        if warmup_steps <= 0:
            return decay
        return np.where(updates < warmup_steps, warmup_lr + (lr - warmup_lr) * (updates + 1) / warmup_steps, decay)

    return Schedule(formula, total)


@checked("scheduler")
def linear(
    lr_init: FloorLr,
    lr_max: Lr,
    lr_end: FloorLr,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: Epochs = 0.0,
) -> Schedule:
    """EfficientNet-B2 recipe's ``lr_decay_mode: liner``: linear warmup to ``lr_max``, then linear decay to ``lr_end``.

    Reproduces the fallback branch of ``get_lr`` in ``official/cv/Efficientnet/efficientnet-b2/src/lr_generator.py``:
    ``lr_init + (lr_max - lr_init) * i / w`` for steps ``i < w``, then
    ``lr_max - (lr_max - lr_end) * (i - w) / (total - w)``: ``lr_max`` exactly at step ``w``, and the
    last step is one decrement above ``lr_end`` (the reference never reaches ``lr_end`` itself).
    """
    _check_run(epochs, steps_per_epoch)
    _require(lr_init <= lr_max, "lr_init", f"<= scheduler.lr_max ({lr_max})", lr_init)
    _require(lr_end <= lr_max, "lr_end", f"<= scheduler.lr_max ({lr_max})", lr_end)
    total = epochs * steps_per_epoch
    warmup_steps = _warmup_steps(warmup_epochs, steps_per_epoch, total)

    def formula(updates: np.ndarray) -> np.ndarray:
        decay = lr_max - (lr_max - lr_end) * (updates - warmup_steps) / max(total - warmup_steps, 1)
        return _with_warmup(updates, decay, lr_max, lr_init, warmup_steps)

    return Schedule(formula, total)


@checked("scheduler")
def exponential(
    lr: Lr,
    epochs: int,
    steps_per_epoch: int,
    decay_rate: Annotated[float, Range(0, 1, low_inclusive=False)],
    decay_epochs: Annotated[float, Positive],
    staircase: bool = True,
    min_lr: FloorLr = 0.0,
    warmup_epochs: Epochs = 0.0,
    warmup_lr: FloorLr = 0.0,
) -> Schedule:
    """NASNet-A-Mobile recipe's decay (``lr_decay_rate``, ``num_epoch_per_decay``), TF's ``exponential_decay``.

    Reproduces ``get_lr`` in ``research/cv/nasnet/src/lr_generator.py``: step ``i`` gets
    ``max(lr * decay_rate ** p, min_lr)`` with ``p = i / (steps_per_epoch * decay_epochs)``, floored when
    ``staircase`` (the recipe trains with ``is_stair=True``). The decay counts from step 0; warmup (absent
    from the recipe) replaces its first steps.
    """
    _check_run(epochs, steps_per_epoch)
    _require(min_lr <= lr, "min_lr", f"<= scheduler.lr ({lr})", min_lr)
    total = epochs * steps_per_epoch
    warmup_steps = _warmup_steps(warmup_epochs, steps_per_epoch, total)

    def formula(updates: np.ndarray) -> np.ndarray:
        power = updates / (steps_per_epoch * decay_epochs)
        if staircase:
            power = np.floor(power)
        decay = np.maximum(lr * decay_rate**power, min_lr)
        return _with_warmup(updates, decay, lr, warmup_lr, warmup_steps)

    return Schedule(formula, total)


def plot_schedule(schedule: Schedule, steps_per_epoch: int, title: str, points: int = 4000) -> Figure:
    """Line plot of lr against epoch (``update / steps_per_epoch``) at up to ``points`` evenly spaced updates
    (every update of a shorter run); log y when the positive lrs span > 2 decades.

    Built on ``matplotlib.figure.Figure`` (no pyplot state, renders with Agg), e.g. for ``log_figure``.
    """
    from matplotlib.figure import Figure

    _require(steps_per_epoch > 0, "steps_per_epoch", "> 0", steps_per_epoch)
    updates = np.unique(np.linspace(0, len(schedule) - 1, min(points, len(schedule))).astype(np.int64))
    lr = schedule.at(updates)
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(updates / steps_per_epoch, lr)
    positive = lr[lr > 0]
    if positive.size and positive.max() > 100 * positive.min():
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    return fig


class LrScaling:
    """``lr_scaling/`` configs: scale the whole lr schedule with the global batch size.

    ``linear`` (Goyal et al., 2017, "Accurate, Large Minibatch SGD"): × global / reference batch;
    ``sqrt`` (Krizhevsky, 2014; common with Adam-type optimizers): × √(global / reference);
    ``none``: the configured lrs as they are. The global batch is per-device batch × devices ×
    accumulation steps, so a recipe's lr stated for ``reference_batch_size`` holds on any device count.
    """

    @checked("lr_scaling")
    def __init__(
        self, rule: Literal["none", "linear", "sqrt"] = "none", reference_batch_size: Annotated[int, Positive] = 256
    ) -> None:
        self.rule, self.reference_batch_size = rule, reference_batch_size

    def factor(self, global_batch_size: int) -> float:
        ratio = global_batch_size / self.reference_batch_size
        return {"none": 1.0, "linear": ratio, "sqrt": float(np.sqrt(ratio))}[self.rule]
