"""The optimizer factory: every config builds and trains, weight-decay groups, TF RMSProp and AGC against NumPy."""

from __future__ import annotations

import re
from pathlib import Path

import mindspore as ms
import mindspore.nn as nn
import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from framework.config import ConfigError, build, check_config
from framework.optim.optimizers import AGCMomentum, create_optimizer
from framework.optim.schedules import UpdateLr

OPTIMIZER_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "conf" / "optimizer").glob("*.yaml"))


class Head(nn.Cell):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Dense(4, 3)

    def construct(self, x):
        return self.fc(x)


class SmallNet(nn.Cell):
    """conv → BN → global pool → ``head.fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, weight_init="he_uniform")
        self.bn = nn.BatchNorm2d(4)
        self.head = Head()

    def construct(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def train_step(net: nn.Cell, opt: nn.Optimizer) -> nn.Cell:
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    return nn.TrainOneStepCell(nn.WithLossCell(net, loss), opt, return_grad=True)


def batch() -> tuple[ms.Tensor, ms.Tensor]:
    rng = np.random.default_rng(0)
    return ms.Tensor(rng.normal(size=(4, 1, 8, 8)).astype(np.float32)), ms.Tensor(np.array([0, 1, 2, 0], np.int32))


def make_params(seed: int = 0) -> list[ms.Parameter]:
    """Hand-made parameters with the shapes and names of a real network (NFNet-style gains included)."""
    rng = np.random.default_rng(seed)
    shapes = {
        "stem.conv.weight": (4, 3, 3, 3),
        "stem.conv.bias": (4,),
        "stem.conv.gain": (4, 1, 1, 1),
        "stages.0.blocks.0.bn1.gamma": (4,),
        "stages.0.blocks.0.bn1.beta": (4,),
        "stages.0.blocks.0.skipinit_gain": (),
        "head.fc.weight": (5, 4),
        "head.fc.bias": (5,),
    }
    return [ms.Parameter(rng.normal(size=s).astype(np.float32), name=n) for n, s in shapes.items()]


def values(params) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy().astype(np.float64) for p in params}


def lr_per_step(*lrs: float) -> ms.Tensor:
    return ms.Tensor(np.array(lrs, np.float32))


@pytest.mark.parametrize("path", OPTIMIZER_CONFIGS, ids=lambda p: p.stem)
def test_config_builds_and_trains_in_graph_mode(path):
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)
    cfg = OmegaConf.load(path)
    check_config(OmegaConf.create({"optimizer": cfg}))  # every key is a parameter of the factory
    net = SmallNet()
    opt = instantiate(cfg, params=net.trainable_params(), learning_rate=ms.Tensor(np.full(10, 0.1, np.float32)))
    assert isinstance(opt, nn.Optimizer)
    before = values(net.trainable_params())
    step = train_step(net, opt)
    loss, _ = step(*batch())
    assert np.isfinite(loss.asnumpy())
    after = values(net.trainable_params())
    for name in ("conv.weight", "bn.gamma", "head.fc.weight", "head.fc.bias"):
        assert not np.allclose(before[name], after[name]), name


def test_filter_groups_bias_norm_gain_and_1d_params():
    opt = create_optimizer(make_params(), 0.1, "momentum", weight_decay=1e-4)
    decayed = {p.name for p, flag in zip(opt.parameters, opt.decay_flags, strict=True) if flag}
    assert [p.name for p in opt.parameters] == [p.name for p in make_params()]  # network order kept
    assert decayed == {"stem.conv.weight", "head.fc.weight"}


def test_without_filter_mindspore_rule_decays_all_but_gamma_beta():
    opt = create_optimizer(make_params(), 0.1, "momentum", weight_decay=1e-4, filter_bias_and_norm=False)
    assert not opt.is_group
    skipped = {p.name for p, flag in zip(opt.parameters, opt.decay_flags, strict=True) if not flag}
    assert skipped == {"stages.0.blocks.0.bn1.gamma", "stages.0.blocks.0.bn1.beta"}


def test_zero_gradient_step_decays_only_the_decay_group():
    ms.set_context(mode=ms.GRAPH_MODE)
    lr, wd = 0.1, 0.5
    filtered, unfiltered = make_params(), make_params()
    start = values(filtered)
    opt_on = create_optimizer(filtered, lr, "sgd", momentum=0.0, weight_decay=wd)
    opt_off = create_optimizer(unfiltered, lr, "sgd", momentum=0.0, weight_decay=wd, filter_bias_and_norm=False)
    zeros = tuple(ms.Tensor(np.zeros(p.shape, np.float32)) for p in filtered)
    opt_on(zeros)
    opt_off(zeros)
    on, off = values(filtered), values(unfiltered)
    for name, w in start.items():
        shrunk = w * (1 - lr * wd)
        np.testing.assert_allclose(on[name], shrunk if name.endswith(".weight") else w, rtol=1e-6, err_msg=name)
        expected_off = w if name.endswith(("gamma", "beta")) else shrunk
        np.testing.assert_allclose(off[name], expected_off, rtol=1e-6, err_msg=name)


def tf_rmsprop(w, grads, lrs, rho, momentum, eps, wd):
    """TensorFlow's ApplyRMSProp with L2 decay added to the gradient; mean square starts at ones."""
    ms_acc, mom = np.ones_like(w), np.zeros_like(w)
    for g, lr in zip(grads, lrs, strict=True):
        g = g + wd * w
        ms_acc = rho * ms_acc + (1 - rho) * g * g
        mom = momentum * mom + lr * g / np.sqrt(ms_acc + eps)
        w = w - mom
    return w


@pytest.mark.parametrize("eps, wd", [(1e-3, 1e-5), (1.0, 4e-5)], ids=["efficientnet_b2", "nasnet_a_mobile"])
def test_rmsprop_tf_matches_tensorflow_formula(eps, wd):
    ms.set_context(mode=ms.GRAPH_MODE)
    params, lrs, rng = make_params(), [0.1, 0.05, 0.02], np.random.default_rng(1)
    start = values(params)
    grads = [{p.name: rng.normal(size=p.shape) for p in params} for _ in lrs]
    opt = create_optimizer(
        params, lr_per_step(*lrs), "rmsprop_tf", momentum=0.9, rmsprop_decay=0.9, eps=eps, weight_decay=wd
    )
    assert all((acc.asnumpy() == 1).all() for acc in opt.ms)  # mean square initialised to ones
    for step_grads in grads:
        opt(tuple(ms.Tensor(step_grads[p.name].astype(np.float32)) for p in params))
    for p in params:
        decay = wd if p.name in ("stem.conv.weight", "head.fc.weight") else 0.0
        expected = tf_rmsprop(start[p.name], [g[p.name] for g in grads], lrs, 0.9, 0.9, eps, decay)
        np.testing.assert_allclose(p.asnumpy(), expected, atol=1e-6, err_msg=p.name)


def numpy_agc(w: np.ndarray, g: np.ndarray, clipping: float = 0.01, eps: float = 1e-3) -> np.ndarray:
    axes = tuple(range(1, w.ndim)) if w.ndim > 1 else None
    w_norm = np.sqrt((w * w).sum(axis=axes, keepdims=w.ndim > 1))
    g_norm = np.sqrt((g * g).sum(axis=axes, keepdims=w.ndim > 1))
    return g * np.minimum(1.0, clipping * np.maximum(w_norm, eps) / np.maximum(g_norm, 1e-6))


def agc_step(grads: dict[str, np.ndarray], loss_scale: float = 1.0) -> tuple[dict, dict]:
    """One plain-SGD AGC step at lr 1 inside a jitted function: returns (weights before, the gradient applied)."""
    params = make_params()
    start = values(params)
    opt = create_optimizer(params, 1.0, "sgd_agc", momentum=0.0, loss_scale=loss_scale)
    assert isinstance(opt, AGCMomentum)
    scaled = tuple(ms.Tensor((grads[p.name] * loss_scale).astype(np.float32)) for p in params)

    @ms.jit
    def update(gradients):
        return opt(gradients)

    update(scaled)
    return start, {name: start[name] - w for name, w in values(params).items()}


def test_agc_clips_unit_wise_and_leaves_head_and_small_grads_alone():
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(2)
    grads = {p.name: rng.normal(size=p.shape) for p in make_params()}
    grads["stem.conv.bias"] *= 1e-4  # below clipping * ‖w‖: unchanged
    start, applied = agc_step(grads)
    for name, g in grads.items():
        expected = g if name.startswith("head.fc") else numpy_agc(start[name], g)
        np.testing.assert_allclose(applied[name], expected, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(applied["stem.conv.bias"], grads["stem.conv.bias"], atol=1e-7)
    assert np.abs(applied["stem.conv.weight"]).max() < 0.1 * np.abs(grads["stem.conv.weight"]).max()  # clipped
    unit_norms = np.sqrt((applied["stem.conv.weight"] ** 2).sum(axis=(1, 2, 3)))
    weight_norms = np.sqrt((start["stem.conv.weight"] ** 2).sum(axis=(1, 2, 3)))
    np.testing.assert_allclose(unit_norms, 0.01 * weight_norms, rtol=1e-5)  # each output unit at its own limit


def test_agc_measures_the_unscaled_gradient_under_static_loss_scale():
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(3)
    grads = {p.name: rng.normal(size=p.shape) for p in make_params()}
    _, plain = agc_step(grads)
    _, scaled = agc_step(grads, loss_scale=128.0)
    for name in grads:
        np.testing.assert_allclose(scaled[name], plain[name], atol=1e-6, err_msg=name)


def test_agc_inside_train_one_step_cell():
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)
    net = SmallNet()
    opt = create_optimizer(net.trainable_params(), 1.0, "sgd_agc", momentum=0.0, agc_clipping=1e-3)
    start = values(net.trainable_params())
    _, grads = train_step(net, opt)(*batch())
    after = values(net.trainable_params())
    for name, g in grads.items():
        g = g.asnumpy().astype(np.float64)
        expected = g if name.startswith("head.fc") else numpy_agc(start[name], g, clipping=1e-3)
        np.testing.assert_allclose(start[name] - after[name], expected, atol=1e-6, err_msg=name)
    assert not np.allclose(
        numpy_agc(start["conv.weight"], grads["conv.weight"].asnumpy(), 1e-3), grads["conv.weight"].asnumpy()
    )  # the clipping was active


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"name": "adam"},
            r"optimizer.name must be one of 'sgd', 'momentum', 'adamw', 'rmsprop_tf', 'sgd_agc', got 'adam'. "
            r"Fix: optimizer.name=adamw",
        ),
        ({"weight_decay": -1e-4}, r"optimizer.weight_decay must be >= 0"),
        ({"momentum": 1.0}, r"optimizer.momentum must be in \[0, 1\)"),
        ({"momentum": -0.1}, r"optimizer.momentum must be in \[0, 1\)"),
        ({"momentum": 0.0, "nesterov": True}, r"optimizer.nesterov needs optimizer.momentum > 0"),
        ({"eps": 0.0}, r"optimizer.eps must be > 0"),
        ({"betas": [0.9]}, r"optimizer.betas must be 2 values, got \[0.9\]"),
        ({"betas": [0.9, 1.0]}, r"optimizer.betas\[1\] must be in \[0, 1\), got 1.0"),
        ({"rmsprop_decay": 1.0}, r"optimizer.rmsprop_decay must be in \[0, 1\)"),
        ({"agc_clipping": 0.0}, r"optimizer.agc_clipping must be > 0"),
        ({"agc_eps": -1.0}, r"optimizer.agc_eps must be > 0"),
        ({"agc_exclude": ["head.fcc"]}, r"optimizer.agc_exclude: 'head.fcc' matches no parameter.*head.fc.weight"),
        ({"agc_exclude": ["head.f"]}, r"optimizer.agc_exclude: 'head.f' matches no parameter"),
        ({"loss_scale": 0.0}, r"optimizer.loss_scale must be > 0"),
        ({"name": "adamw", "loss_scale": 128.0}, r"optimizer.loss_scale must be 1 for adamw"),
    ],
)
def test_bad_values_raise_naming_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_optimizer(make_params(), 0.1, **{"name": "sgd_agc", **kwargs})


def test_bad_value_through_build_names_the_config_key():
    cfg = OmegaConf.create({"optimizer": OmegaConf.load(OPTIMIZER_CONFIGS[0])})
    cfg.optimizer.weight_decay = -1.0
    with pytest.raises(ConfigError, match=r"optimizer.weight_decay must be >= 0"):
        build(cfg, "optimizer", params=make_params(), learning_rate=0.1)


def _updated_by_one_step(optimizer, params) -> dict[str, float]:
    """How far one step with unit gradients moves each parameter (mean absolute change)."""
    before = {p.name: p.asnumpy().copy() for p in params}
    optimizer(tuple(ms.Tensor(np.ones(p.shape, np.float32)) for p in params))
    return {p.name: float(np.abs(p.asnumpy() - before[p.name]).mean()) for p in params}


@pytest.fixture
def resnext_params():
    from framework.models import create_model
    from framework.models.registry import parameter_depth

    ms.set_context(mode=ms.PYNATIVE_MODE)
    network = create_model("resnext_test", num_classes=10)
    return network.trainable_params(), parameter_depth(network)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_layer_decay_and_head_scale_set_each_layers_lr(resnext_params, name):
    """lr of layer i of L = lr × decay^(L - i), the head's × head_lr_scale: with equal gradients each step is
    proportional to its lr (SGD: lr × gradient; AdamW's first step: lr × a constant)."""
    params, depth = resnext_params
    optimizer = create_optimizer(params, UpdateLr(0.1), name=name, momentum=0.0, weight_decay=0.0,
                                 layer_decay=0.5, head_lr_scale=3.0, depth=depth)  # fmt: skip
    moved = _updated_by_one_step(optimizer, params)
    last = depth["head.fc.weight"][1]
    unit = moved["head.fc.weight"] / (0.1 * 3.0)  # the step per unit of lr
    assert name != "sgd" or unit == pytest.approx(1.0, rel=1e-4)
    for param in params:
        layer = depth[param.name][0]
        expected = 0.1 * 0.5 ** (last - layer) * (3.0 if layer == last else 1.0)
        assert moved[param.name] == pytest.approx(expected * unit, rel=1e-3), param.name
    assert depth["conv1.weight"][0] == 0 and depth["head.fc.bias"] == (last, last)


def test_frozen_parameters_learn_nothing_until_their_epoch(resnext_params):
    params, depth = resnext_params
    optimizer = create_optimizer(params, UpdateLr(0.1), name="momentum", weight_decay=0.05,
                                 freeze=[r"^layer1\.", r"^conv1\."], unfreeze_epoch=1, depth=depth)  # fmt: skip
    frozen = [p.name for p in params if p.name.startswith(("layer1.", "conv1."))]
    optimizer.lr_groups.start_epoch(1)
    moved = _updated_by_one_step(optimizer, params)
    assert all(moved[name] == 0.0 for name in frozen)  # not even weight decay
    assert all(moved[p.name] > 0 for p in params if p.name not in frozen)
    optimizer.lr_groups.start_epoch(2)
    moved = _updated_by_one_step(optimizer, params)
    assert all(moved[name] > 0 for name in frozen)


@pytest.mark.parametrize(
    ("freeze", "message"),
    [(["^nope"], "optimizer.freeze: '^nope' matches no trainable parameter"), (["("], "is no regular expression")],
)
def test_a_freeze_pattern_that_matches_nothing_is_refused(resnext_params, freeze, message):
    params, depth = resnext_params
    with pytest.raises(ValueError, match=re.escape(message)):
        create_optimizer(params, UpdateLr(0.1), name="sgd", freeze=freeze, depth=depth)
