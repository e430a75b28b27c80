"""The optimisation step: mixed precision, loss scaling, gradient accumulation, clipping, EMA.

One compiled cell per kind of micro-step (rather than ``TrainOneStepCell``), so every knob of the seed
recipes acts in one place, on CPU as on GPU/Ascend:

- ``amp_level`` O0–O3 through ``mindspore.amp.auto_mixed_precision`` (O2 keeps BatchNorm in fp32);
- loss scaling ``none`` / ``static`` / ``dynamic`` (``mindspore.amp`` loss scalers); a step whose
  gradients are not finite is skipped (no update) and reported, the dynamic scale shrinks;
- gradient accumulation over ``accumulation_steps`` micro-batches (the update uses their mean);
- global-norm gradient clipping (Conformer: 5.0);
- an exponential moving average of all weights (``ema_decay``), for evaluation with EMA weights.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Literal, get_args

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
from mindspore import ParameterTuple, Tensor, amp
from mindspore.communication import get_group_size
from mindspore.rewrite.common import namespace

from framework.config import ConfigError

AmpLevel = Literal["O0", "O1", "O2", "O3"]  # engine.amp_level, checked by the schema (framework.engine.Trainer)
LossScale = Literal["none", "static", "dynamic"]  # engine.loss_scale
AMP_LEVELS, LOSS_SCALES = get_args(AmpLevel), get_args(LossScale)


def make_loss_scaler(kind: LossScale, value: float, factor: int, window: int) -> amp.LossScaler | None:
    """None for ``none``, else ``static`` (fixed ``value``) or ``dynamic`` (start at ``value``, ×/÷ ``factor``
    after ``window`` finite steps); the values are ``Trainer``'s, in the ranges its signature declares."""
    if kind == "none":
        return None
    if kind == "static":
        return amp.StaticLossScaler(float(value))
    return amp.DynamicLossScaler(float(value), int(factor), int(window))


class _StepCell(nn.Cell):
    """One compiled micro-step: (scaled) backward, then accumulate, or (``update``) check, clip and apply.

    A Cell built on ``GradOperation`` with the loss scale as sensitivity, as MindSpore's TrainOneStepCell.
    Without a loss scaler nothing is scaled and gradients are not checked for overflow (on this CPU the
    per-tensor finiteness check of ResNeXt-50's 161 gradients costs 30 % of the step); a non-finite loss
    still skips the update. With a
    ``grad_reducer`` (data parallel) the update averages the gradients over all ranks first, so every
    rank applies the same update (and sees the same overflow); the returned loss is the mean over ranks.
    """

    def __init__(
        self,
        loss_net: nn.Cell,
        optimizer: nn.Optimizer,
        loss_scaler: amp.LossScaler | None,
        clip_grad_norm: float | None,
        accumulated: ParameterTuple | None,
        accumulation_steps: int,
        grad_reducer: nn.Cell | None,
        update: bool,
    ) -> None:
        super().__init__(auto_prefix=False)
        self.loss_net, self.optimizer = loss_net, optimizer
        self.scaled = loss_scaler is not None
        self.loss_scaler = loss_scaler if loss_scaler is not None else amp.StaticLossScaler(1.0)
        self.weights = optimizer.parameters
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.clip = clip_grad_norm is not None
        self.clip_grad_norm = clip_grad_norm if clip_grad_norm is not None else 0.0
        self.accumulate = accumulated is not None
        self.accumulated = accumulated if accumulated is not None else ParameterTuple(())
        self.accumulation_steps = float(accumulation_steps)
        self.reduce = grad_reducer is not None
        self.grad_reducer = grad_reducer if grad_reducer is not None else nn.Identity()
        self.loss_sum = ops.AllReduce(ops.ReduceOp.SUM) if self.reduce else ops.Identity()
        self.world_size = float(get_group_size()) if self.reduce else 1.0
        self.update = update

    def construct(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        loss = self.loss_net(images, labels)
        if self.scaled:
            sens = ops.fill(loss.dtype, loss.shape, self.loss_scaler.scale_value)
            grads = self.loss_scaler.unscale(self.grad(self.loss_net, self.weights)(images, labels, sens))
        else:
            grads = self.grad(self.loss_net, self.weights)(images, labels, ops.ones_like(loss))
        local_loss = loss
        if self.reduce:  # every rank sees the mean loss: same metric, same NaN decisions on all ranks
            loss = self.loss_sum(loss) / self.world_size
        if not self.update:  # an accumulation micro-step; a non-finite loss adds nothing
            finite = amp.all_finite(grads) if self.scaled else ops.isfinite(local_loss)
            if finite:
                for total, grad in zip(self.accumulated, grads):  # noqa: B905 (compiled by MindSpore, whose graph syntax has no zip keywords)
                    ops.assign_add(total, grad)
            return loss, finite
        if self.accumulate:
            grads = tuple((total + grad) / self.accumulation_steps for total, grad in zip(self.accumulated, grads))  # noqa: B905 (compiled by MindSpore, whose graph syntax has no zip keywords)
            for total in self.accumulated:
                ops.assign(total, ops.zeros_like(total))
        if self.reduce:
            grads = self.grad_reducer(grads)
        if not self.scaled:  # a non-finite loss (NaN/Inf) skips the update: the weights stay as they were
            finite = ops.isfinite(loss)
            if finite:
                if self.clip:
                    grads = ops.clip_by_global_norm(grads, self.clip_grad_norm)
                self.optimizer(grads)
            return loss, finite
        finite = amp.all_finite(grads)
        if finite:
            if self.clip:
                grads = ops.clip_by_global_norm(grads, self.clip_grad_norm)
            self.optimizer(grads)
        self.loss_scaler.adjust(finite)
        return loss, finite


def compile_and_trim(cell: nn.Cell, *args: Tensor) -> None:
    """Compile ``cell`` for ``args``, then give the compiler's freed scratch memory back to the OS.

    The graph compile frees hundreds of MiB of small allocations that glibc keeps in its heap, while the step's
    buffers then come from fresh pages: untrimmed, that scratch stays resident through training (peak RSS,
    64 px, batch 32: EfficientNet-B2 1,851 → 1,736 MiB, ResNeXt-50 1,512 → 1,454). PyNative mode compiles
    nothing ahead; off glibc there is no trim.
    """
    if ms.get_context("mode") != ms.GRAPH_MODE:
        return
    cell.compile(*args)
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)  # the process's own symbols: glibc's malloc_trim on Linux
    except (OSError, TypeError):  # Windows has no CDLL(None)
        return None


class TrainStep:
    """``step(images, labels)`` → (loss, finite); the optimizer updates every ``accumulation_steps`` calls.

    ``finite`` says whether the update was applied (gradients finite) with a loss scaler, else whether
    the loss is finite. ``grad_reducer`` (``World.grad_reducer``) averages gradients across data-parallel ranks.
    """

    def __init__(
        self,
        loss_net: nn.Cell,
        optimizer: nn.Optimizer,
        loss_scaler: amp.LossScaler | None,
        clip_grad_norm: float | None = None,
        accumulation_steps: int = 1,
        grad_reducer: nn.Cell | None = None,
    ) -> None:
        self.loss_scaler, self.optimizer = loss_scaler, optimizer
        self.accumulation_steps, self.micro_step = accumulation_steps, 0
        accumulated = optimizer.parameters.clone(prefix="accumulated", init="zeros") if accumulation_steps > 1 else None
        cell = partial(
            _StepCell, loss_net, optimizer, loss_scaler, clip_grad_norm, accumulated, accumulation_steps, grad_reducer
        )
        self._update = cell(update=True)
        self._accumulate = cell(update=False) if accumulated is not None else None
        self._compiled: set[int] = set()

    @property
    def updates(self) -> bool:
        """Whether the next call applies an optimizer update (the last micro-batch of an accumulation)."""
        return (self.micro_step + 1) % self.accumulation_steps == 0

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        step = self._update if self.updates else self._accumulate
        if id(step) not in self._compiled:
            compile_and_trim(step, images, labels)
            self._compiled.add(id(step))
        self.micro_step += 1
        return step(images, labels)

    @property
    def loss_scale(self) -> float:
        return float(self.loss_scaler.scale_value.asnumpy()) if self.loss_scaler is not None else 1.0


class EMA:
    """Exponential moving average of every network weight, BatchNorm statistics included (as timm's ModelEmaV2)."""

    def __init__(self, network: nn.Cell, decay: float) -> None:
        self.params = ParameterTuple(network.get_parameters())
        self.shadow = self.params.clone(prefix="ema", init="same")
        params, shadow = self.params, self.shadow

        @ms.jit
        def update() -> Tensor:
            for average, value in zip(shadow, params):  # noqa: B905 (compiled by MindSpore, whose graph syntax has no zip keywords)
                ops.assign(average, average * decay + value * (1.0 - decay))
            return ops.ones((), ms.float32)

        self.update = update

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the network holds the EMA weights; its own weights come back afterwards."""
        saved = [Tensor(p.asnumpy()) for p in self.params]
        for param, average in zip(self.params, self.shadow, strict=True):
            ops.assign(param, average)  # in place: set_data would detach the weights from compiled graphs
        try:
            yield
        finally:
            for param, value in zip(self.params, saved, strict=True):
                ops.assign(param, value)


def apply_amp(network: nn.Cell, amp_level: AmpLevel) -> nn.Cell:
    """Cast ``network`` for mixed precision; O0 leaves it in fp32."""
    if amp_level == "O0":
        return network
    # MindSpore's AMP rewrite parses the source of every function the network calls, except "third-party" ones,
    # counts as the user's own code everything under the working directory (with a virtual environment inside the
    # project, .venv/, MindSpore's own functions, which it cannot parse, would be), and writes the rewritten
    # classes to ./rewritten_network/. It runs in a private temporary folder: nothing is written into the project
    # or the user's folder, and our package counts as the user's code wherever it is installed.
    previous = os.getcwd()
    os.chdir(_rewrite_workspace())
    try:
        return amp.auto_mixed_precision(network, amp_level)
    finally:
        os.chdir(previous)


@functools.cache
def _rewrite_workspace() -> str:
    """A folder for MindSpore's rewritten classes, kept while the process runs (compiling reads their source)."""
    path = tempfile.mkdtemp(prefix="framework-amp-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    package = str(Path(__file__).resolve().parents[1])
    namespace._ignore_third_party_paths.append(package)  # no public setter (MindSpore 2.7-2.8)
    return path


def recompute_cells(network: nn.Cell, patterns: Sequence[str]) -> None:
    """Mark for recomputation (MindSpore's ``Cell.recompute``) the cells whose names a ``patterns`` regex matches
    in full: the backward pass recomputes their activations instead of keeping them, memory for time. A cell
    inside a marked one is recomputed with it."""
    cells = {name: cell for name, cell in network.cells_and_names() if name}
    names = list(cells)
    marked: list[str] = []
    for pattern in patterns:
        try:
            matched = [name for name in names if re.fullmatch(str(pattern), name)]
        except re.error as err:
            raise ConfigError(f"engine.recompute: {pattern!r} is no regular expression ({err})") from err
        if not matched:
            raise ConfigError(
                f"engine.recompute: {pattern!r} matches no cell name in full (e.g. {names[0]}, {names[-1]}). "
                "Fix: a regex over the model's cell names, e.g. engine.recompute=['stages\\.\\d+']"
            )
        marked += [name for name in matched if name not in marked]
    for name in marked:
        if not any(name.startswith(f"{outer}.") for outer in marked):
            cells[name].recompute()
