"""Model zoo: parameter counts against the references, output shapes at native and small inputs."""

from __future__ import annotations

from pathlib import Path

import mindspore as ms
import mindspore.nn as nn
import numpy as np
import pytest

from framework.config import build
from framework.engine.losses import HeadsLoss
from framework.models import create_model, list_models
from framework.models.layers import DropPath, StemMaxPool
from framework.models.nfnet import GELU_GAMMA, GammaGELU
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
# Models for tests and smoke runs only: no published reference.
TEST_MODELS = {"resnext_test"}
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


@pytest.fixture(autouse=True)
def pynative() -> None:
    """Shape checks run eagerly: compiling each network at two sizes would only cost time."""
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_count_matches_reference(name):
    network = create_model(name, num_classes=1000, **COUNT_KWARGS.get(name, {}))
    assert sum(int(np.prod(p.shape)) for p in network.trainable_params()) == REFERENCE_PARAMS[name]


@pytest.mark.parametrize("name", sorted(NATIVE_SIZE))
def test_output_shape_at_native_and_small_size(name):
    network = create_model(name, num_classes=7)
    network.set_train(False)
    for size in (NATIVE_SIZE[name], 32):
        logits = network(ms.Tensor(np.random.default_rng(0).standard_normal((2, 3, size, size), np.float32)))
        assert logits.shape == (2, 7) and np.isfinite(logits.asnumpy()).all()


def test_every_registered_model_has_a_reference():
    assert set(REFERENCE_PARAMS) | TEST_MODELS == set(list_models())


def test_test_model_is_a_small_resnext():
    """resnext_test is ResNeXt-50's code path (same parameter names, grouped 3×3 convs) at under 1 % of its size."""
    small, full = create_model("resnext_test", num_classes=10), create_model("resnext50_32x4d", num_classes=10)
    names = {p.name for p in small.trainable_params()}
    assert names < {p.name for p in full.trainable_params()} and "layer4.0.downsample.0.weight" in names
    assert sum(int(np.prod(p.shape)) for p in small.trainable_params()) < 0.01 * REFERENCE_PARAMS["resnext50_32x4d"]
    assert small.layer1[0].conv2.group == 4


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
    registered = "conformer_ti, efficientnet_b0.*nasnet_a_mobile, nfnet_f0, resnext101_32x4d.*resnext50_32x4d"
    with pytest.raises(ValueError, match=f"unknown model 'resnet9'.*{registered}"):
        create_model("resnet9")


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


def test_scaled_std_conv_standardises_weights():
    """NFNet's conv equals a plain conv with per-channel standardised weight × gain / sqrt(fan_in)."""
    from framework.models.nfnet import ScaledStdConv2d

    conv = ScaledStdConv2d(4, 3, 3, stride=2)
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


@pytest.mark.parametrize("name", ["resnext50_32x4d", "nfnet_f0"])
def test_drop_path_grows_linearly_to_the_last_block(name):
    network = create_model(name, num_classes=10, drop_path_rate=0.2)
    keep = [cell.keep_prob for _, cell in network.cells_and_names() if isinstance(cell, DropPath)]
    blocks = 16 if name == "resnext50_32x4d" else 12
    assert len(keep) == blocks - 1  # the first block's rate is 0: no DropPath cell
    np.testing.assert_allclose(keep, [1 - 0.2 * i / (blocks - 1) for i in range(1, blocks)], rtol=1e-6)


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
