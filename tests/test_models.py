"""Model zoo: parameter counts against the references, output shapes at native and small inputs, a gradient for
every parameter, and stored reference logits (tests/reference_logits.json) that pin each architecture.

After a deliberate architecture change, regenerate the reference logits (all models, slow ones included) with
``REGENERATE_REFERENCE_LOGITS=1 python -m pytest tests/test_models.py -k reference_logits``.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import mindspore as ms
import mindspore.nn as nn
import numpy as np
import pytest

from framework.config import build
from framework.engine.losses import CrossEntropy, HeadsLoss
from framework.engine.step import apply_amp
from framework.models import create_model, list_models
from framework.models.kernels import ANY_SIZE, convolution
from framework.models.layers import (
    BlasConv2d,
    DepthwiseConv2d,
    DropPath,
    SiLU,
    SpatialMean,
    StemMaxPool,
    broadcast_product,
)
from framework.models.nfnet import GELU_GAMMA, GammaGELU, NormFreeBlock, ScaledStdConv2d
from framework.models.registry import model_class
from tests.conftest import CONF_DIR

# Trainable parameters at 1000 classes, as timm counts them (BatchNorm statistics excluded).
REFERENCE_PARAMS = {
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x4d": 44_177_704,
    "resnext101_32x8d": 88_791_336,
    "efficientnet_b0": 5_288_548,
    "efficientnet_b1": 7_794_184,
    "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232,
    "efficientnet_b4": 19_341_616,
    "efficientnet_b5": 30_389_784,
    "efficientnet_b6": 43_040_704,
    "efficientnet_b7": 66_347_960,
    "nfnet_f0": 71_489_284,  # timm dm_nfnet_f0
    "conformer_ti": 23_524_704,  # official code (paper: 23.5 M)
    "nasnet_a_mobile": 5_289_978,  # Keras NASNetMobile trainable, auxiliary head excluded
}
# Models for tests and smoke runs only (no published reference) → the full model whose code path each takes.
TEST_MODELS = {
    "resnext_test": "resnext50_32x4d",
    "efficientnet_test": "efficientnet_b0",
    "nfnet_test": "nfnet_f0",
    "conformer_test": "conformer_ti",
    "nasnet_test": "nasnet_a_mobile",
}
# Builder arguments for the count: the auxiliary head is a training device, not part of the model.
COUNT_KWARGS = {"nasnet_a_mobile": {"aux_factor": 0.0}}
# Native input size of the seed recipes' models.
NATIVE_SIZE = {
    "resnext50_32x4d": 224,
    "efficientnet_b2": 260,
    "nfnet_f0": 192,
    "conformer_ti": 224,
    "nasnet_a_mobile": 224,
}
# Stored logits of every registered model, and how they were made.
REFERENCE_LOGITS = Path(__file__).with_name("reference_logits.json")
REGENERATE = "REGENERATE_REFERENCE_LOGITS=1 python -m pytest tests/test_models.py -k reference_logits"
REFERENCE_SETTINGS = {
    "seed": 0,  # mindspore.set_seed, before create_model
    "num_classes": 5,
    "input_shape": [1, 3, 32, 32],
    "input": "numpy.random.default_rng(0).standard_normal(input_shape, float32)",
    "zero_params": "all-zero trainable parameters set to numpy.random.default_rng(0).normal(0, 0.1) in order",
    "mode": "eval",
    "regenerate": REGENERATE,
}


@pytest.fixture(autouse=True)
def pynative() -> None:
    """Shape checks run eagerly: compiling each network at two sizes would only cost time."""
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.mark.parametrize(
    ("group", "model"),
    [("resnext_test", "resnext_test"), ("efficientnet_b2", "efficientnet_test"), ("nfnet_f0", "nfnet_test"),
     ("nasnet_a_mobile", "nasnet_test"), ("conformer_ti", "conformer_test")],
)  # fmt: skip
def test_every_family_trains_in_mixed_precision(make_config, group, model):
    """engine.amp_level=O1 recompiles each class from MindSpore's rewritten copy, which sees no module globals:
    every family's construct must do without them (NFNet's GELU constants and NASNet's pool padding did not)."""
    ms.set_context(mode=ms.GRAPH_MODE)
    cfg = make_config(f"model={group}", f"model.name={model}", "engine.amp_level=O1", "dataset.batch_size=4")
    network = build(cfg, "model")
    optimizer = build(cfg, "optimizer", params=network.trainable_params(), learning_rate=1e-3)
    network, step = build(cfg, "engine").train_step(network, build(cfg, "loss"), optimizer)
    network.set_train(True)
    images = ms.Tensor(np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    loss, finite = step(images, ms.Tensor(np.array([0, 1, 2, 3], np.int32)))
    assert np.isfinite(float(loss.asnumpy())) and bool(finite.asnumpy())


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
@pytest.mark.parametrize("layer", ["conv", "scaled_std", "depthwise", "silu", "gelu"])
def test_kernel_layers_step_aside_under_mixed_precision(layer, mode):
    """amp_level O2 casts the inputs of every op in a cell to float16, the project's float32 CPU kernels' too: a
    layer must then run MindSpore's ops, and give what it gives without its kernel. (With the kernel, NFNet-F0's
    loss under the nfnet_f0_imagenet recipe's O2 was NaN.)"""
    ms.set_context(mode=mode)
    make = {
        "conv": lambda: BlasConv2d(8, 6, 3), "scaled_std": lambda: ScaledStdConv2d(8, 6, 3),
        "depthwise": lambda: DepthwiseConv2d(8, 3), "silu": lambda: SiLU(), "gelu": lambda: GammaGELU(),
    }  # fmt: skip
    ours, reference = make[layer](), make[layer]()
    assert ours.kernel is not None, "the kernel library was not built (no g++?)"
    reference.kernel = None
    if layer == "scaled_std":
        assert ours.standardise is not None
        reference.standardise = None  # MindSpore's BatchNorm standardises the weight
    for mine, theirs in zip(ours.trainable_params(), reference.trainable_params(), strict=True):
        mine.set_data(theirs.data.copy())
    x = ms.Tensor(np.random.default_rng(0).standard_normal((2, 8, 12, 12)).astype(np.float32))
    outputs = []
    for net in (ours, reference):
        net = apply_amp(net, "O2")
        net.set_train(True)
        outputs.append(net(x).asnumpy())
    np.testing.assert_allclose(*outputs, rtol=1e-3, atol=1e-3)


@pytest.mark.slow  # full-size models: the *_test variants cover each family in the quick tier
@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_count_matches_reference(name):
    network = create_model(name, num_classes=1000, **COUNT_KWARGS.get(name, {}))
    assert _count(network) == REFERENCE_PARAMS[name]


@pytest.mark.slow  # full-size models: the *_test variants cover each family in the quick tier
@pytest.mark.parametrize("name", sorted(NATIVE_SIZE))
def test_output_shape_at_native_and_small_size(name):
    network = create_model(name, num_classes=7)
    network.set_train(False)
    for size in (NATIVE_SIZE[name], 32):
        logits = network(ms.Tensor(np.random.default_rng(0).standard_normal((2, 3, size, size), np.float32)))
        assert logits.shape == (2, 7) and np.isfinite(logits.asnumpy()).all()


def test_every_registered_model_has_a_reference():
    assert set(REFERENCE_PARAMS) | set(TEST_MODELS) == set(list_models())


def _count(network: nn.Cell) -> int:
    return sum(int(np.prod(p.shape)) for p in network.trainable_params())


@pytest.mark.parametrize("name", sorted(TEST_MODELS))
def test_test_models_are_small_variants_of_the_full_models(name):
    """A test model is built by its full model's class (the same code path), at under 1 % of its parameters."""
    network = create_model(name, num_classes=10)
    assert type(network) is model_class(TEST_MODELS[name])
    assert _count(network) < 0.01 * REFERENCE_PARAMS[TEST_MODELS[name]]


@pytest.mark.slow  # full-size models: the *_test variants cover each family in the quick tier
def test_test_model_is_a_small_resnext():
    """resnext_test is ResNeXt-50's code path (same parameter names, grouped 3×3 convs) at under 1 % of its size."""
    small, full = create_model("resnext_test", num_classes=10), create_model("resnext50_32x4d", num_classes=10)
    names = {p.name for p in small.trainable_params()}
    assert names < {p.name for p in full.trainable_params()} and "layer4.0.downsample.0.weight" in names
    assert _count(small) < 0.01 * REFERENCE_PARAMS["resnext50_32x4d"]
    assert small.layer1[0].conv2.group == 4


@pytest.mark.slow  # full-size models: the *_test variants cover each family in the quick tier
def test_parameter_names_are_stable():
    names = [p.name for p in create_model("resnext50_32x4d").trainable_params()]
    assert names[:2] == ["conv1.weight", "bn1.gamma"] and names[-2:] == ["head.fc.weight", "head.fc.bias"]
    assert "layer2.0.downsample.0.weight" in names
    names = [p.name for p in create_model("efficientnet_b2").trainable_params()]
    assert names[0] == "conv_stem.weight" and "blocks.1.0.conv_pwl.weight" in names
    assert "blocks.0.0.se.conv_reduce.weight" in names and names[-1] == "head.fc.bias"
    names = [p.name for p in create_model("nfnet_f0").trainable_params()]
    assert names[:3] == ["stem.conv1.weight", "stem.conv1.bias", "stem.conv1.gain"]
    assert "stages.1.0.downsample.conv.gain" in names and "stages.3.2.skipinit_gain" in names


def test_unknown_model_name_lists_registered():
    registered = "conformer_test, conformer_ti, efficientnet_b0.*nasnet_test, nfnet_f0, nfnet_test, resnext101.*_test"
    with pytest.raises(ValueError, match=f"unknown model 'resnet9'.*{registered}"):
        create_model("resnet9")


@pytest.mark.slow  # full-size models: the *_test variants cover each family in the quick tier
@pytest.mark.parametrize(("name", "heads"), [("nasnet_a_mobile", 2), ("conformer_ti", 2), ("resnext50_32x4d", 1)])
def test_training_heads_and_eval_logits(name, heads):
    """Multi-head models give one logits tensor per head while training and a single one at eval."""
    network = create_model(name, num_classes=5)
    x = ms.Tensor(np.random.default_rng(2).standard_normal((2, 3, 64, 64), np.float32))
    network.set_train(True)
    train_out = network(x)
    assert len(train_out) == heads if heads > 1 else train_out.shape == (2, 5)
    assert len(getattr(network, "head_loss_weights", (1.0,))) == heads
    network.set_train(False)
    eval_out = network(x)
    assert eval_out.shape == (2, 5)
    if name == "conformer_ti":  # evaluation sums the CNN and transformer heads, as in the paper
        cnn, tokens = network.forward_features(x)
        conv_logits = network.conv_cls_head(cnn.mean((2, 3))).asnumpy()
        trans_logits = network.trans_cls_head(network.trans_norm(tokens)[:, 0]).asnumpy()
        np.testing.assert_allclose(eval_out.asnumpy(), conv_logits + trans_logits, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # full-size models: the *_test variants cover each family in the quick tier
def test_nasnet_aux_weight_and_bn_momentum():
    network = create_model("nasnet_a_mobile", num_classes=10, aux_factor=0.25, bn_momentum=0.9)
    assert network.head_loss_weights == (1.0, 0.25)
    assert any(p.name.startswith("aux_head.") for p in network.trainable_params())
    x = ms.Tensor(np.full((4, 3, 32, 32), 10.0, np.float32))
    network.set_train(True)
    network(x)
    # One batch moves each running mean by (1 - 0.9) of the batch mean.
    moving = network.stem_bn.moving_mean.asnumpy()
    batch_mean = network.stem_conv(x).asnumpy().mean(axis=(0, 2, 3))
    np.testing.assert_allclose(moving, 0.1 * batch_mean, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_scaled_std_conv_standardises_weights(training):
    """NFNet's conv equals a plain conv with per-channel standardised weight × gain / sqrt(fan_in), in training
    (BatchNorm's kernel) and in inference (the formula)."""
    from framework.models.nfnet import ScaledStdConv2d

    conv = ScaledStdConv2d(4, 3, 3, stride=2)
    conv.set_train(training)
    conv.gain.set_data(ms.Tensor(np.array([1.0, 2.0, 0.5], np.float32).reshape(3, 1, 1, 1)))
    x = np.random.default_rng(1).standard_normal((1, 4, 6, 6)).astype(np.float32)
    out = conv(ms.Tensor(x)).asnumpy()
    assert out.shape == (1, 3, 3, 3)  # "SAME": ceil(6 / 2)
    w = conv.weight.asnumpy().reshape(3, -1)
    w = (w - w.mean(1, keepdims=True)) / np.sqrt(w.var(1, keepdims=True) + 1e-5)
    w = (w * np.array([[1.0], [2.0], [0.5]]) / 6.0).reshape(3, 4, 3, 3)  # fan_in = 4 * 3 * 3
    padded = np.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1)))  # TF "SAME" pads bottom/right at stride 2
    expected = np.array(
        [[[(padded[0, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3] * w[o]).sum() for j in range(3)] for i in range(3)]
         for o in range(3)]
    )  # fmt: skip
    np.testing.assert_allclose(out[0], expected, rtol=1e-4, atol=1e-5)


def test_scaled_std_conv_trains_with_the_formulas_gradients():
    """Training standardises through BatchNorm's kernel (it keeps no weight-sized intermediates for the backward):
    loss and every gradient equal autodiff through inference's formula, within 1e-5, step after step."""
    from framework.models.nfnet import ScaledStdConv2d

    rng = np.random.default_rng(0)
    conv = ScaledStdConv2d(8, 16, 3, stride=2, groups=2)
    conv.weight.set_data(ms.Tensor(rng.normal(0.3, 2.0, conv.weight.shape).astype(np.float32)))
    conv.gain.set_data(ms.Tensor(rng.uniform(0.5, 2.0, conv.gain.shape).astype(np.float32)))
    conv.bias.set_data(ms.Tensor(rng.normal(0.0, 0.1, conv.bias.shape).astype(np.float32)))
    x = ms.Tensor(rng.standard_normal((2, 8, 7, 7)).astype(np.float32))
    target = ms.Tensor(rng.standard_normal((2, 16, 4, 4)).astype(np.float32))

    def loss_fn(images):
        return ((conv(images) - target) ** 2).mean()

    results = {}
    for training in (False, True):
        conv.set_train(training)
        grad_fn = ms.jit(ms.value_and_grad(loss_fn, None, conv.trainable_params()))  # compiled for this mode
        steps = [grad_fn(x) for _ in range(2)]  # twice: the kernel's running-statistics inputs stay as given
        results[training] = [[loss.asnumpy(), *(g.asnumpy() for g in grads)] for loss, grads in steps]
    for formula, kernel in zip(results[False][0], results[True][0], strict=True):
        np.testing.assert_allclose(kernel, formula, rtol=1e-5, atol=1e-5)
    for first, second in zip(*results[True], strict=True):
        np.testing.assert_array_equal(second, first)


@pytest.mark.parametrize(
    "model",
    [  # the full-size models take 20-140 s each: the quick tier trains the test model only
        pytest.param(p.stem, marks=() if p.stem == "resnext_test" else pytest.mark.slow)
        for p in sorted((Path(CONF_DIR) / "model").glob("*.yaml"))
    ],
)
def test_model_config_trains_and_loss_falls(make_config, model):
    """A few optimizer steps on one fixed batch of 8 digits (32 px) through the real train step: the loss falls."""
    ms.set_seed(0)
    cfg = make_config(f"model={model}", "optimizer=adamw", "dataset.batch_size=8")
    network = build(cfg, "model")
    images, labels = next(build(cfg, "dataset").loader("train").create_tuple_iterator())
    optimizer = build(cfg, "optimizer", params=network.trainable_params(), learning_rate=1e-4)
    step = nn.TrainOneStepCell(HeadsLoss(network, build(cfg, "loss")), optimizer)
    step.set_train(True)
    losses = [float(step(images, labels).asnumpy()) for _ in range(8)]
    assert np.isfinite(losses).all()
    # Dropout, drop path and 8-sample BatchNorm make single steps noisy: compare the ends of the run.
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


@pytest.mark.slow  # full-size models: the *_test variants cover each family in the quick tier
@pytest.mark.parametrize("name", ["resnext50_32x4d", "nfnet_f0"])
def test_drop_path_grows_linearly_to_the_last_block(name):
    network = create_model(name, num_classes=10, drop_path_rate=0.2)
    keep = [cell.keep_prob for _, cell in network.cells_and_names() if isinstance(cell, DropPath)]
    blocks = 16 if name == "resnext50_32x4d" else 12
    assert len(keep) == blocks - 1  # the first block's rate is 0: no DropPath cell
    np.testing.assert_allclose(keep, [1 - 0.2 * i / (blocks - 1) for i in range(1, blocks)], rtol=1e-6)


def test_drop_path_keeps_whole_samples_scaled_and_its_gradient_follows():
    """Training: each sample is dropped whole or kept as ``x / keep_prob`` (the mask is scaled, not the map, to
    keep one activation-sized buffer less), and the gradient is the same mask."""
    ms.set_seed(1)
    drop = DropPath(0.3)
    drop.set_train(True)
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((64, 3, 4, 4)).astype(np.float32))
    weights = ms.Tensor(rng.standard_normal((64, 3, 4, 4)).astype(np.float32))
    out = drop(x).asnumpy()
    grad = ms.grad(lambda t: (drop(t) * weights).sum())(x).asnumpy()
    kept = np.abs(out).reshape(64, -1).max(axis=1) > 0
    assert 0 < kept.sum() < 64
    expected = np.where(kept[:, None, None, None], x.asnumpy() / 0.7, 0)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    grad_kept = np.abs(grad).reshape(64, -1).max(axis=1) > 0
    assert 0 < grad_kept.sum() < 64
    np.testing.assert_allclose(grad, np.where(grad_kept[:, None, None, None], weights.asnumpy() / 0.7, 0), rtol=1e-6)


def _output_and_gradients(layer: nn.Cell, x: ms.Tensor, probe: ms.Tensor) -> tuple[np.ndarray, ...]:
    """A training layer's output on ``x`` and the gradients of ``sum(output * probe)`` for ``x`` and its weight."""
    layer.set_train(True)
    _, (grad_x, (grad_w,)) = ms.value_and_grad(lambda t: (layer(t) * probe).sum(), 0, layer.trainable_params())(x)
    return layer(x).asnumpy(), grad_x.asnumpy(), grad_w.asnumpy()


@pytest.mark.parametrize(
    ("kernel", "stride", "size"),
    [(3, 1, 10), (3, 2, 8), (5, 2, 11), (5, 1, 7), (3, 2, 9), (5, 1, 2), (5, 2, 2), (3, 1, 1), (3, 2, 33), (5, 1, 32)],
)  # sizes under the kernel too (EfficientNet's last stages at 32 px), and maps wide enough for the row layout
def test_depthwise_kernel_equals_mindspores_convolution_and_gradients(kernel, stride, size):
    """The project's C++ depthwise kernel (CPU training) against MindSpore's grouped Conv2d on the same weights:
    output, input gradient and weight gradient within 1e-5 (relative to their largest value)."""
    ours = DepthwiseConv2d(6, kernel, stride)
    assert ours.kernel is not None, "the kernel library was not built (no g++?)"
    reference = DepthwiseConv2d(6, kernel, stride)
    reference.kernel = None  # MindSpore's Conv2d
    reference.weight.set_data(ours.weight.data.copy())
    rng = np.random.default_rng(kernel * 10 + stride)
    x = ms.Tensor(rng.standard_normal((3, 6, size, size)).astype(np.float32))
    out_size = (size + 2 * (kernel // 2) - kernel) // stride + 1
    probe = ms.Tensor(rng.standard_normal((3, 6, out_size, out_size)).astype(np.float32))
    results = [_output_and_gradients(layer, x, probe) for layer in (ours, reference)]
    for name, got, expected in zip(("output", "input grad", "weight grad"), *results, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, np.abs(expected).max()), err_msg=name)


@pytest.mark.parametrize(
    ("layer", "kernel", "stride", "size", "groups"),
    [
        ("conv", 1, 1, 3, 1), ("conv", 1, 1, 17, 1), ("conv", 1, 2, 4, 1), ("conv", 1, 2, 9, 1),
        ("conv", 3, 1, 5, 1), ("conv", 3, 2, 9, 1), ("conv", 7, 2, 33, 1),
        ("conv", 3, 1, 5, 2), ("conv", 3, 1, 15, 2), ("conv", 3, 2, 29, 2),
        ("scaled_std", 1, 1, 3, 1), ("scaled_std", 3, 2, 8, 1), ("scaled_std", 3, 1, 16, 1),
        ("scaled_std", 3, 2, 33, 1), ("scaled_std", 3, 2, 8, 2), ("scaled_std", 3, 1, 16, 2),
    ],
)  # fmt: skip
def test_convolution_kernel_equals_mindspores_convolution_and_gradients(layer, kernel, stride, size, groups):
    """The project's OpenBLAS convolution (CPU training) against MindSpore's on the same weights, in ``BlasConv2d``
    (padding k//2) and NFNet's ``ScaledStdConv2d`` (TensorFlow's "SAME"), with one group or two: output and the
    gradients of the input and every parameter within 1e-5 of their largest value. Maps under 14 x 14 output pixels
    run as one product over the batch, larger ones per sample."""
    make = {
        "conv": lambda: BlasConv2d(8, 6, kernel, stride, groups, has_bias=True),
        "scaled_std": lambda: ScaledStdConv2d(8, 6, kernel, stride, groups),
    }
    ours, reference = make[layer](), make[layer]()
    ours.kernel = convolution(kernel, stride, same=layer == "scaled_std")  # at every size, not only where routed
    assert ours.kernel is not None, "the kernel library was not built (no g++?)"
    ours.min_pixels, ours.max_pixels = 0, ANY_SIZE
    reference.kernel = None  # MindSpore's Conv2D
    for mine, theirs in zip(ours.trainable_params(), reference.trainable_params(), strict=True):
        theirs.set_data(ms.Tensor(np.random.default_rng(len(mine.name)).standard_normal(mine.shape), ms.float32))
        mine.set_data(theirs.data.copy())
    rng = np.random.default_rng(size)
    x = ms.Tensor(rng.standard_normal((3, 8, size, size)).astype(np.float32))
    out_shape = reference(x).shape
    probe = ms.Tensor(rng.standard_normal(out_shape).astype(np.float32))
    results = []
    for net in (ours, reference):
        net.set_train(True)
        _, (grad_x, grads) = ms.value_and_grad(lambda t, net=net: (net(t) * probe).sum(), 0, net.trainable_params())(x)
        results.append([net(x), grad_x, *grads])
    for name, got, expected in zip(["output", "input grad", *ours.parameters_dict()], *results, strict=True):
        expected = expected.asnumpy()
        np.testing.assert_allclose(got.asnumpy(), expected, atol=1e-5 * np.abs(expected).max(), err_msg=name)


@pytest.mark.parametrize(("in_ch", "kernel", "groups"), [(8, 3, 1), (12, 1, 1), (8, 3, 2)])
def test_weight_standardisation_kernel_equals_batch_norm_and_gradients(in_ch, kernel, groups):
    """NFNet's weight standardisation on the project's kernel (CPU training) against MindSpore's BatchNorm on the
    reshaped weight (what runs elsewhere): the standardised weight and the gradients of the weight and the gain
    within 1e-5 of their largest value, on weights with a mean far from 0 and gains far from 1."""
    ours, reference = ScaledStdConv2d(in_ch, 6, kernel, groups=groups), ScaledStdConv2d(in_ch, 6, kernel, groups=groups)
    assert ours.standardise is not None, "the kernel library was not built (no g++?)"
    reference.standardise = None
    rng = np.random.default_rng(in_ch + kernel + groups)
    for mine, theirs in zip(ours.trainable_params(), reference.trainable_params(), strict=True):
        theirs.set_data(ms.Tensor(rng.normal(0.5, 2.0, mine.shape), ms.float32))
        mine.set_data(theirs.data.copy())
    probe = ms.Tensor(rng.standard_normal(ours.weight.shape).astype(np.float32))
    results = []
    for layer in (ours, reference):
        layer.set_train(True)
        loss = lambda layer=layer: (layer.training_weight() * probe).sum()  # noqa: E731
        _, grads = ms.value_and_grad(loss, None, [layer.weight, layer.gain])()
        results.append([layer.training_weight(), *grads])
    for name, got, expected in zip(("weight", "weight grad", "gain grad"), *results, strict=True):
        expected = expected.asnumpy()
        np.testing.assert_allclose(got.asnumpy(), expected, atol=1e-5 * np.abs(expected).max(), err_msg=name)


def test_spatial_mean_as_a_product_equals_the_mean_and_its_gradient():
    """Squeeze-excite (every model's) pools in training as a product with a column of 1 / (H·W): equal to the mean over
    (H, W) and its input gradient within 1e-5, in training and in inference."""
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.normal(1.0, 3.0, (3, 5, 6, 7)).astype(np.float32))
    probe = ms.Tensor(rng.standard_normal((3, 5, 1, 1)).astype(np.float32))
    for training in (True, False):
        results = []
        for pool in (SpatialMean(product=True), SpatialMean()):
            pool.set_train(training)
            _, grad = ms.value_and_grad(lambda t, pool=pool: (pool(t) * probe).sum())(x)
            results.append((pool(x).asnumpy(), grad.asnumpy()))
        assert results[0][0].shape == (3, 5, 1, 1)
        for name, got, expected in zip(("output", "input grad"), *results, strict=True):
            np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max(), err_msg=f"{name} {training}")


@pytest.mark.parametrize("factor_shape", [(3, 5, 1, 1), (3, 1, 1, 1), ()])
def test_broadcast_product_equals_the_product_and_its_gradients(factor_shape):
    """Squeeze-excite gates, DropPath masks and NFNet's skip gain multiply in training with the factor broadcast to
    the map first (inference multiplies as it is): the product and the gradients of both operands within 1e-5."""
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.normal(1.0, 3.0, (3, 5, 6, 7)).astype(np.float32))
    factor = ms.Tensor(rng.standard_normal(factor_shape).astype(np.float32))
    probe = ms.Tensor(rng.standard_normal(x.shape).astype(np.float32))
    results = []
    for training in (True, False):
        product = partial(broadcast_product, training=training)
        grads = ms.grad(lambda a, b, product=product: (product(a, b) * probe).sum(), grad_position=(0, 1))(x, factor)
        results.append((product(x, factor).asnumpy(), *(grad.asnumpy() for grad in grads)))
    assert results[0][2].shape == factor_shape
    for name, got, expected in zip(("product", "map grad", "factor grad"), *results, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max(), err_msg=name)


def _norm_free_block_unfolded(block: NormFreeBlock, x: ms.Tensor) -> ms.Tensor:
    """NormFreeBlock as timm writes it: the SE product, then the gain, drop path, skip gain and alpha in turn."""
    out = block.act1(x)
    shortcut = block.downsample(out) if block.has_downsample else x
    out = block.conv2(block.act2(block.conv1(out)))
    out = block.conv3(block.act3(block.conv2b(block.act2b(out))))
    out = block.drop_path(block.attn_gain * block.attn_last(out)) * block.skipinit_gain
    return out * block.alpha + shortcut


@pytest.mark.parametrize("stride", [1, 2])
def test_norm_free_block_folded_factors_equal_the_unfolded_branch(stride):
    """NFNet's block folds its branch factors into SE's gates before one product with the map: its output and the
    gradients of the input and of every weight equal timm's order of products within 1e-5."""
    block = NormFreeBlock(8, 16, stride, alpha=0.2, beta=0.9, group_size=4, drop_path_rate=0.0)
    block.skipinit_gain.set_data(ms.Tensor(0.7, ms.float32))  # zero-initialised: no gradient would reach the branch
    block.set_train(True)
    x = ms.Tensor(np.random.default_rng(0).standard_normal((2, 8, 6, 6)).astype(np.float32))
    params = block.trainable_params()
    results = []
    for forward in (block, partial(_norm_free_block_unfolded, block)):
        grads = ms.grad(lambda t, forward=forward: forward(t).sum(), grad_position=0, weights=params)(x)
        results.append([forward(x).asnumpy(), grads[0].asnumpy(), *(grad.asnumpy() for grad in grads[1])])
    names = ["output", "input grad", *(param.name for param in params)]
    for name, got, expected in zip(names, *results, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5 * max(np.abs(expected).max(), 1e-6), err_msg=name)


@pytest.mark.parametrize(("activation", "scale"), [(SiLU, 1.0), (GammaGELU, 1.0), (GammaGELU, 0.7)])
def test_fused_activation_kernel_equals_its_formula_and_gradient(activation, scale):
    """The C++ fused activations (CPU training) against MindSpore's autodiff of their formula, over inputs from -24
    to 24 (where exp saturates): output and input gradient within 1e-5 of their largest value."""
    ours = activation(scale)
    assert ours.kernel is not None, "the kernel library was not built (no g++?)"
    reference = activation(scale)
    reference.kernel = None  # the formula
    rng = np.random.default_rng(0)
    x = ms.Tensor(np.concatenate([rng.normal(0, 4, 998), [-24, 24]]).astype(np.float32).reshape(2, 5, 10, 10))
    probe = ms.Tensor(rng.standard_normal(x.shape).astype(np.float32))
    results = []
    for layer in (ours, reference):
        layer.set_train(True)
        grad = ms.grad(lambda t, layer=layer: (layer(t) * probe).sum())(x)
        results.append((layer(x).asnumpy(), grad.asnumpy()))
    for name, got, expected in zip(("output", "input grad"), *results, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max(), err_msg=name)


def test_stem_max_pool_forms_equal_padded_max_pooling():
    """The concatenated-border form (training) and the Pad form (ONNX export) both equal 3×3/2 pooling with
    -inf padding on the non-negative maps a stem's ReLU gives."""
    x = ms.Tensor(np.maximum(np.random.default_rng(0).standard_normal((2, 4, 10, 10)), 0).astype(np.float32))
    reference = nn.MaxPool2d(3, 2, pad_mode="pad", padding=1)(x).asnumpy()
    pool = StemMaxPool()
    np.testing.assert_array_equal(pool(x).asnumpy(), reference)
    pool.concat_border = False
    np.testing.assert_array_equal(pool(x).asnumpy(), reference)


def test_gamma_gelu_is_the_tanh_gelu_times_gamma():
    x = ms.Tensor(np.linspace(-6, 6, 101, dtype=np.float32))
    expected = nn.GELU(approximate=True)(x).asnumpy() * GELU_GAMMA
    np.testing.assert_allclose(GammaGELU()(x).asnumpy(), expected, atol=2e-6)


def _quick_if_test_model(names: list[str]) -> list:
    """Parameters for ``names``; full-size models take 2-10 s each here and go to the slow tier."""
    return [pytest.param(name, marks=() if name in TEST_MODELS else pytest.mark.slow) for name in names]


def _seeded_model(name: str, **kwargs) -> nn.Cell:
    """``name`` at 5 classes from seed 0, with every all-zero trainable parameter (zero-init last BatchNorm gammas,
    NFNet's skip gains, biases) set to small seeded random values: a zero gain makes everything before it on its
    branch get no gradient and leave no trace in the logits."""
    ms.set_seed(0)
    network = create_model(name, num_classes=5, **kwargs)
    rng = np.random.default_rng(0)
    for param in network.trainable_params():
        if not param.asnumpy().any():
            param.set_data(ms.Tensor(rng.normal(0.0, 0.1, param.shape).astype(np.float32)))
    return network


@pytest.mark.parametrize("name", _quick_if_test_model(list_models()))
def test_train_step_gives_every_parameter_a_finite_nonzero_gradient(name):
    """One training step (all heads' loss, batch of 4 at 32 px): no parameter is cut off from the loss or gets
    inf/NaN. Drop path is off: a branch dropped for the whole batch legitimately gets no gradient."""
    network = _seeded_model(name, drop_path_rate=0.0)
    network.set_train(True)
    params = network.trainable_params()
    images = ms.Tensor(np.random.default_rng(0).standard_normal((4, 3, 32, 32), np.float32))
    labels = ms.Tensor(np.arange(4, dtype=np.int32))
    _, grads = ms.value_and_grad(HeadsLoss(network, CrossEntropy()), None, params)(images, labels)
    # Exactly zero, not small: a parameter cut off from the loss gets exact zeros, while e.g. a bias just before a
    # BatchNorm gets rounding-level gradients only (the BatchNorm removes it), which is no defect.
    bad = [f"{p.name} ({'not finite' if not np.isfinite(g).all() else 'all zero'})"
           for p, g in zip(params, (g.asnumpy() for g in grads), strict=True)
           if not np.isfinite(g).all() or not g.any()]  # fmt: skip
    assert not bad, f"{name}: {len(bad)} of {len(params)} parameters get no usable gradient: {', '.join(bad)}"


def _reference_logits(name: str) -> np.ndarray:
    network = _seeded_model(name)
    network.set_train(False)
    images = np.random.default_rng(0).standard_normal(REFERENCE_SETTINGS["input_shape"], np.float32)
    return network(ms.Tensor(images)).asnumpy()


def _store_reference_logits(name: str, logits: np.ndarray) -> None:
    """Add or replace ``name``'s entry, drop unregistered models' and write one line per setting and per model."""
    stored = json.loads(REFERENCE_LOGITS.read_text()) if REFERENCE_LOGITS.exists() else {}
    entries = {key: value for key, value in stored.get("logits", {}).items() if key in list_models()}
    entries[name] = logits.tolist()
    lines = [f" {json.dumps(key)}: {json.dumps(value)}," for key, value in REFERENCE_SETTINGS.items()]
    models = ",\n".join(f"  {json.dumps(key)}: {json.dumps(entries[key])}" for key in sorted(entries))
    REFERENCE_LOGITS.write_text("{\n" + "\n".join(lines) + f'\n "logits": {{\n{models}\n }}\n}}\n')


@pytest.mark.parametrize("name", _quick_if_test_model(list_models()))
def test_reference_logits_pin_the_architecture(name):
    """Seeded initialisation and a fixed input give the stored logits (rtol 1e-5, plus atol 1e-5 for logits near
    0; the thread count moves them by ~2e-6 relative), so any change of layers, widths, strides or init fails."""
    logits = _reference_logits(name)
    if os.environ.get("REGENERATE_REFERENCE_LOGITS") == "1":
        _store_reference_logits(name, logits)
        pytest.skip(f"regenerated the reference logits of {name} in {REFERENCE_LOGITS.name}")
    stored = json.loads(REFERENCE_LOGITS.read_text())
    settings = {key: stored.get(key) for key in REFERENCE_SETTINGS}
    assert settings == REFERENCE_SETTINGS, f"made with other settings: run {REGENERATE}"
    assert name in stored["logits"], f"no reference logits for {name}: run {REGENERATE}"
    np.testing.assert_allclose(
        logits, stored["logits"][name], rtol=1e-5, atol=1e-5,
        err_msg=f"{name}'s logits changed: if its architecture or init changed on purpose, run {REGENERATE}",
    )  # fmt: skip


def test_reference_logits_cover_exactly_the_registered_models():
    assert sorted(json.loads(REFERENCE_LOGITS.read_text())["logits"]) == list_models(), f"run {REGENERATE}"
