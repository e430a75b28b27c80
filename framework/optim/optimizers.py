"""Optimizer factory for the ``optimizer/`` configs.

``create_optimizer(params, learning_rate, name=...)`` builds one of:

- ``sgd`` (``nn.SGD``), ``momentum`` (``nn.Momentum``), ``adamw`` (``nn.AdamWeightDecay``);
- ``rmsprop_tf``: RMSProp in TensorFlow's form (``tf.compat.v1.train.RMSPropOptimizer``, timm's ``RMSpropTF``)::

      ms  = rho * ms + (1 - rho) * g**2        # ms initialised to ONES
      mom = momentum * mom + lr * g / sqrt(ms + eps)
      w   = w - mom

  ``nn.RMSProp`` documents this form and initialises the mean square to ones, but MindSpore 2.8's CPU
  ``ApplyRMSProp`` kernel puts eps outside the square root (``sqrt(ms) + eps``) for all but the last
  ``size % 8`` elements of a tensor (its SIMD path): a ~30% smaller step at eps 1.0 (NASNet). :class:`RMSPropTF`
  keeps ``nn.RMSProp``'s state and computes the update with plain tensor ops instead;
- ``sgd_agc``: SGD with momentum and Adaptive Gradient Clipping (Brock, De, Smith, Simonyan 2021, "High-Performance
  Large-Scale Image Recognition Without Normalization", arXiv:2102.06171), see :class:`AGCMomentum`.

Weight decay: with ``filter_bias_and_norm`` biases, norm weights/biases (``gamma``/``beta``), NFNet gains
(``gain``, ``skipinit_gain``) and every parameter with ``ndim <= 1`` are put in a parameter group with weight decay
0. Without it the parameters are passed ungrouped and MindSpore's own rule applies: every parameter is decayed
except those whose name contains ``gamma`` or ``beta``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal, get_args

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
from mindspore import Parameter, Tensor

from framework.optim.schedules import LrGroups, UpdateLr
from framework.schema import HalfOpenFraction, NonNegative, Positive, Range, checked

OptimizerName = Literal["sgd", "momentum", "adamw", "rmsprop_tf", "sgd_agc"]
OPTIMIZERS = get_args(OptimizerName)
Decay = Annotated[float, HalfOpenFraction]  # momentum, AdamW's betas, RMSProp's rho: [0, 1)

# Last name component of parameters that are never decayed when filtering (besides every ndim <= 1 parameter).
NO_DECAY_NAMES = ("bias", "gain", "skipinit_gain")

_agc_clip = ops.MultitypeFuncGraph("agc_clip")
_rmsprop_tf = ops.MultitypeFuncGraph("rmsprop_tf")


def _unitwise_norm(x: Tensor) -> Tensor:
    """L2 norm per output unit (over all dims but the first, kept for broadcasting); whole-tensor norm if ndim <= 1."""
    if x.ndim <= 1:
        return ops.sqrt(ops.square(x).sum())
    return ops.sqrt(ops.square(x).sum(axis=tuple(range(1, x.ndim)), keepdims=True))


@_agc_clip.register("Number", "Number", "Tensor", "Bool", "Tensor", "Tensor")
def _agc_clip_tensor(clipping, eps, inv_loss_scale, clip, weight, grad):
    """``grad · min(1, clipping · max(‖w‖, eps) / max(‖grad‖, 1e-6))`` unit-wise; ``grad`` may carry the loss scale."""
    if not clip:
        return grad
    max_norm = ops.maximum(_unitwise_norm(weight.astype(grad.dtype)), eps) * clipping
    grad_norm = ops.maximum(_unitwise_norm(grad) * inv_loss_scale.astype(grad.dtype), 1e-6)
    return grad * ops.minimum(max_norm / grad_norm, 1.0)


@_rmsprop_tf.register("Number", "Number", "Number", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _rmsprop_tf_update(decay, momentum, eps, lr, weight, mean_square, moment, grad):
    """TF's ApplyRMSProp on one parameter."""
    mean_square_new = mean_square * decay + ops.square(grad) * (1.0 - decay)
    moment_new = moment * momentum + lr.astype(grad.dtype) * grad / ops.sqrt(mean_square_new + eps)
    success = ops.depend(True, ops.assign(mean_square, mean_square_new))
    success = ops.depend(success, ops.assign(moment, moment_new))
    return ops.depend(success, ops.assign_sub(weight, moment_new))


class RMSPropTF(nn.RMSProp):
    """RMSProp in TensorFlow's form: mean square starts at ones, eps inside the square root, lr in the momentum."""

    def __init__(
        self,
        params: list,
        learning_rate,
        decay: float = 0.9,
        momentum: float = 0.9,
        epsilon: float = 1e-3,
        loss_scale: float = 1.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            params, learning_rate, decay, momentum, epsilon, loss_scale=loss_scale, weight_decay=weight_decay
        )

    @ms.jit
    def construct(self, gradients):
        gradients = self.decay_weight(gradients)
        gradients = self.gradients_centralization(gradients)
        gradients = self.scale_grad(gradients)
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        if self.is_group_lr:
            update = ops.partial(_rmsprop_tf, self.decay, self.momentum, self.epsilon)
            return self.hyper_map(update, lr, self._parameters, self.ms, self.moment, gradients)
        update = ops.partial(_rmsprop_tf, self.decay, self.momentum, self.epsilon, lr)
        return self.hyper_map(update, self._parameters, self.ms, self.moment, gradients)


class AGCMomentum(nn.Momentum):
    """``nn.Momentum`` that applies Adaptive Gradient Clipping to the gradients before its update.

    Clipping acts on the raw gradient, before weight decay is added (as timm's ``adaptive_clip_grad`` before the
    optimizer step); with a static ``loss_scale`` the norms are taken of the un-scaled gradient. Parameters whose
    name is one of ``exclude`` or starts with ``<exclude>.`` (the final classifier) are not clipped.
    """

    def __init__(
        self,
        params: list,
        learning_rate,
        momentum: float,
        clipping: float,
        eps: float,
        exclude: Sequence[str] = (),
        weight_decay: float = 0.0,
        loss_scale: float = 1.0,
        use_nesterov: bool = False,
    ) -> None:
        super().__init__(params, learning_rate, momentum, weight_decay, loss_scale, use_nesterov)
        self.clipping, self.clip_eps = float(clipping), float(eps)
        self.clip_flags = tuple(not _excluded(p.name, exclude) for p in self._parameters)

    @ms.jit
    def construct(self, gradients):
        clip = ops.partial(_agc_clip, self.clipping, self.clip_eps, self.reciprocal_scale)
        gradients = self.hyper_map(clip, self.clip_flags, self._parameters, gradients)
        return super().construct(gradients)


# long: its signature is the optimizer configs' schema (one annotated keyword per setting), one branch per optimizer
@checked("optimizer")
def create_optimizer(
    params: list[Parameter],
    learning_rate: Tensor | float,
    name: OptimizerName,
    weight_decay: Annotated[float, NonNegative] = 0.0,
    filter_bias_and_norm: bool = True,
    momentum: Decay = 0.9,
    nesterov: bool = False,
    betas: tuple[Decay, Decay] = (0.9, 0.999),
    eps: Annotated[float, Positive] = 1e-8,
    rmsprop_decay: Decay = 0.9,
    agc_clipping: Annotated[float, Positive] = 0.01,
    agc_eps: Annotated[float, Positive] = 1e-3,
    agc_exclude: Sequence[str] = ("head.fc",),
    loss_scale: Annotated[float, Positive] = 1.0,
    head_lr_scale: Annotated[float, NonNegative] = 1.0,
    layer_decay: Annotated[float, Range(0, 1, low_inclusive=False)] | None = None,
    freeze: Sequence[str] = (),
    unfreeze_epoch: Annotated[int, NonNegative] | None = None,
    depth: Mapping[str, tuple[int, int]] | None = None,
) -> nn.Optimizer:
    """Optimizer ``name`` over ``params``; ``learning_rate`` is a float or a per-step Tensor (indexed by global step).

    ``momentum`` is the SGD/Momentum/AGC momentum and RMSProp's momentum; ``betas`` and ``eps`` are AdamW's, ``eps``
    is also RMSProp's (added inside the square root), ``rmsprop_decay`` its mean-square decay (rho). ``agc_*`` only
    act for ``sgd_agc``. ``loss_scale`` is a static loss scale the optimizer divides the gradients by (not AdamW).
    Choices and ranges are the annotations', checked for a config and (``checked``) for a Python call alike.

    Fine-tuning (``LrGroups``): ``head_lr_scale`` multiplies the classifier's lr; ``layer_decay`` gives layer
    ``i`` of ``L`` lr × ``layer_decay ** (L - i)`` (timm's layer-wise decay; ``depth`` from
    ``models.parameter_depth``); parameters a ``freeze`` regex matches learn nothing through ``unfreeze_epoch``.
    """
    _check_combinations(name, momentum, nesterov, loss_scale)
    params = list(params)
    weight_decay, momentum, loss_scale = float(weight_decay), float(momentum), float(loss_scale)
    lr_groups = None
    if head_lr_scale != 1.0 or layer_decay is not None or freeze:
        lr_groups = _lr_groups(learning_rate, unfreeze_epoch)
        scales = _lr_scales(params, depth, float(head_lr_scale), layer_decay)
        groups = _scaled_groups(params, weight_decay, filter_bias_and_norm, scales, _frozen(params, freeze), lr_groups)
    else:
        groups = _param_groups(params, weight_decay) if filter_bias_and_norm else params
    if name == "sgd":
        optimizer = nn.SGD(
            groups, learning_rate, momentum, weight_decay=weight_decay, nesterov=nesterov, loss_scale=loss_scale
        )
    elif name == "momentum":
        optimizer = nn.Momentum(groups, learning_rate, momentum, weight_decay, loss_scale, use_nesterov=nesterov)
    elif name == "adamw":
        beta1, beta2 = (float(b) for b in betas)
        optimizer = nn.AdamWeightDecay(groups, learning_rate, beta1, beta2, float(eps), weight_decay)
    elif name == "rmsprop_tf":
        optimizer = RMSPropTF(
            groups, learning_rate, float(rmsprop_decay), momentum, float(eps), loss_scale, weight_decay
        )
    else:
        exclude = tuple(str(prefix) for prefix in agc_exclude)
        _check_agc_exclude(exclude, params)
        optimizer = AGCMomentum(
            groups, learning_rate, momentum, agc_clipping, agc_eps, exclude, weight_decay, loss_scale, nesterov
        )
    optimizer.update_lr, optimizer.lr_groups = learning_rate, lr_groups
    return optimizer


def _lr_groups(learning_rate: Tensor | float, unfreeze_epoch: int | None) -> LrGroups:
    if not isinstance(learning_rate, UpdateLr):
        raise ValueError("lr multipliers and frozen parameters need the per-update learning rate (an UpdateLr)")
    return LrGroups(learning_rate, unfreeze_epoch)


def _lr_scales(
    params: list[Parameter],
    depth: Mapping[str, tuple[int, int]] | None,
    head_lr_scale: float,
    layer_decay: float | None,
) -> dict[str, float]:
    """Each parameter's lr multiplier: ``layer_decay ** (last - layer)``, the classifier's times ``head_lr_scale``."""
    if depth is None:
        raise ValueError("optimizer.head_lr_scale and optimizer.layer_decay need the model's layers (depth)")
    scales = {}
    for param in params:
        layer, last = depth[param.name]
        scale = float(layer_decay) ** (last - layer) if layer_decay is not None else 1.0
        scales[param.name] = scale * (head_lr_scale if layer == last else 1.0)
    return scales


def _frozen(params: list[Parameter], patterns: Sequence[str]) -> set[str]:
    """Names of the parameters a ``freeze`` regex matches (``re.search``); each regex must match one."""
    frozen = set()
    for pattern in patterns:
        try:
            matched = {p.name for p in params if re.search(str(pattern), p.name)}
        except re.error as err:
            raise ValueError(f"optimizer.freeze: {pattern!r} is no regular expression ({err})") from err
        if not matched:
            raise ValueError(f"optimizer.freeze: {pattern!r} matches no trainable parameter (e.g. {params[0].name})")
        frozen |= matched
    return frozen


def _scaled_groups(
    params: list[Parameter],
    weight_decay: float,
    filter_bias_and_norm: bool,
    scales: dict[str, float],
    frozen: set[str],
    lr_groups: LrGroups,
) -> list[dict]:
    """One group per (decayed, lr multiplier, frozen), each with its ``GroupLr``, in the network's order."""
    members: dict[tuple[bool, float, bool], list[Parameter]] = {}
    for param in params:
        decayed = not no_weight_decay(param) if filter_bias_and_norm else not re.search("gamma|beta", param.name)
        members.setdefault((decayed, scales[param.name], param.name in frozen), []).append(param)
    groups = [
        {"params": group, "weight_decay": weight_decay if decayed else 0.0, "lr": lr_groups.group(scale, is_frozen)}
        for (decayed, scale, is_frozen), group in members.items()
    ]
    return [*groups, {"order_params": params}]


def no_weight_decay(param: Parameter) -> bool:
    """Whether ``param`` is exempt from weight decay when filtering: ndim <= 1, a bias or an NFNet gain."""
    return param.ndim <= 1 or param.name.rsplit(".", 1)[-1] in NO_DECAY_NAMES


def _param_groups(params: list[Parameter], weight_decay: float) -> list[dict]:
    """MindSpore group params: decayed / not decayed, in the network's parameter order."""
    no_decay = [p for p in params if no_weight_decay(p)]
    decay = [p for p in params if not no_weight_decay(p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]] + [{"order_params": params}]


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in exclude)


def _check_agc_exclude(exclude: Sequence[str], params: list[Parameter]) -> None:
    for prefix in exclude:
        if not any(_excluded(p.name, (prefix,)) for p in params):
            names = [p.name for p in params]
            names = ", ".join(names[:3] + ["..."] + names[-2:] if len(names) > 5 else names)
            raise ValueError(
                f"optimizer.agc_exclude: '{prefix}' matches no parameter (names are e.g. {names}); list the module "
                "prefixes of the parameters to leave unclipped (the classifier, e.g. head.fc), or [] for none"
            )


def _check_combinations(name: str, momentum: float, nesterov: bool, loss_scale: float) -> None:
    """What no single parameter's annotation can say: settings that do not go together."""
    if nesterov and momentum == 0 and name in ("sgd", "momentum", "sgd_agc"):
        raise ValueError("optimizer.nesterov needs optimizer.momentum > 0, got momentum 0")
    if name == "adamw" and loss_scale != 1:
        raise ValueError(
            f"optimizer.loss_scale must be 1 for adamw (nn.AdamWeightDecay does not un-scale), got {loss_scale}"
        )
