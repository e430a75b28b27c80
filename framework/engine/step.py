"""The optimisation step: mixed precision, loss scaling, gradient accumulation, clipping, EMA.

Built on MindSpore's functional API (``value_and_grad`` + ``jit``) rather than ``TrainOneStepCell``
so every knob of the seed recipes acts in one place, on CPU as on GPU/Ascend:

- ``amp_level`` O0–O3 through ``mindspore.amp.auto_mixed_precision`` (O2 keeps BatchNorm in fp32);
- loss scaling ``none`` / ``static`` / ``dynamic`` (``mindspore.amp`` loss scalers); a step whose
  gradients are not finite is skipped (no update) and reported, the dynamic scale shrinks;
- gradient accumulation over ``accumulation_steps`` micro-batches (the update uses their mean);
- global-norm gradient clipping (Conformer: 5.0);
- an exponential moving average of all weights (``ema_decay``), for evaluation with EMA weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
from mindspore import ParameterTuple, Tensor, amp

AMP_LEVELS = ("O0", "O1", "O2", "O3")
LOSS_SCALES = ("none", "static", "dynamic")


def make_loss_scaler(kind: str, value: float, factor: int, window: int) -> amp.LossScaler:
    """``none`` (scale 1), ``static`` (fixed ``value``) or ``dynamic`` (start at ``value``, ×/÷ ``factor``)."""
    if kind not in LOSS_SCALES:
        raise ValueError(f"engine.loss_scale must be one of {', '.join(LOSS_SCALES)}, got '{kind}'")
    if kind == "none":
        return amp.StaticLossScaler(1.0)
    if value <= 0:
        raise ValueError(f"engine.loss_scale_value must be > 0, got {value}")
    if kind == "static":
        return amp.StaticLossScaler(float(value))
    if factor <= 1 or window < 1:
        raise ValueError(f"engine.loss_scale_factor must be > 1 and loss_scale_window >= 1, got {factor}, {window}")
    return amp.DynamicLossScaler(float(value), int(factor), int(window))


class TrainStep:
    """``step(images, labels)`` → (loss, grads finite); the optimizer updates every ``accumulation_steps`` calls."""

    def __init__(
        self,
        loss_net: nn.Cell,
        optimizer: nn.Optimizer,
        loss_scaler: amp.LossScaler,
        clip_grad_norm: float | None = None,
        accumulation_steps: int = 1,
    ) -> None:
        if accumulation_steps < 1:
            raise ValueError(f"engine.accumulation_steps must be >= 1, got {accumulation_steps}")
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"engine.clip_grad_norm must be > 0 or null, got {clip_grad_norm}")
        self.loss_scaler, self.optimizer = loss_scaler, optimizer
        self.accumulation_steps, self.micro_step = accumulation_steps, 0
        weights = optimizer.parameters
        accumulated = weights.clone(prefix="accumulated", init="zeros") if accumulation_steps > 1 else None
        self.accumulated = accumulated

        def scaled_loss(images: Tensor, labels: Tensor) -> Tensor:
            return loss_scaler.scale(loss_net(images, labels))

        grad_fn = ms.value_and_grad(scaled_loss, None, weights)

        @ms.jit
        def accumulate(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
            loss, grads = grad_fn(images, labels)
            grads = loss_scaler.unscale(grads)
            for total, grad in zip(accumulated, grads):
                ops.assign_add(total, grad)
            return loss_scaler.unscale(loss), amp.all_finite(grads)

        @ms.jit
        def update(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
            loss, grads = grad_fn(images, labels)
            loss, grads = loss_scaler.unscale(loss), loss_scaler.unscale(grads)  # before the scale adjusts
            if accumulated is not None:
                grads = tuple((total + grad) / accumulation_steps for total, grad in zip(accumulated, grads))
                for total in accumulated:
                    ops.assign(total, ops.zeros_like(total))
            finite = amp.all_finite(grads)
            if finite:
                if clip_grad_norm is not None:
                    grads = ops.clip_by_global_norm(grads, clip_grad_norm)
                optimizer(grads)
            loss_scaler.adjust(finite)
            return loss, finite

        self._accumulate, self._update = accumulate, update

    @property
    def updates(self) -> bool:
        """Whether the next call applies an optimizer update (the last micro-batch of an accumulation)."""
        return (self.micro_step + 1) % self.accumulation_steps == 0

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        step = self._update if self.updates else self._accumulate
        self.micro_step += 1
        return step(images, labels)

    @property
    def loss_scale(self) -> float:
        return float(self.loss_scaler.scale_value.asnumpy())


class EMA:
    """Exponential moving average of every network weight, BatchNorm statistics included (as timm's ModelEmaV2)."""

    def __init__(self, network: nn.Cell, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"engine.ema_decay must be in (0, 1) or null, got {decay}")
        self.params = ParameterTuple(network.get_parameters())
        self.shadow = self.params.clone(prefix="ema", init="same")
        params, shadow = self.params, self.shadow

        @ms.jit
        def update() -> Tensor:
            for average, value in zip(shadow, params):
                ops.assign(average, average * decay + value * (1.0 - decay))
            return ops.ones((), ms.float32)

        self.update = update

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the network holds the EMA weights; its own weights come back afterwards."""
        saved = [Tensor(p.asnumpy()) for p in self.params]
        for param, average in zip(self.params, self.shadow):
            ops.assign(param, average)  # in place: set_data would detach the weights from compiled graphs
        try:
            yield
        finally:
            for param, value in zip(self.params, saved):
                ops.assign(param, value)


def apply_amp(network: nn.Cell, amp_level: str) -> nn.Cell:
    """Cast ``network`` for mixed precision; O0 leaves it in fp32."""
    if amp_level not in AMP_LEVELS:
        raise ValueError(f"engine.amp_level must be one of {', '.join(AMP_LEVELS)}, got '{amp_level}'")
    return network if amp_level == "O0" else amp.auto_mixed_precision(network, amp_level)
