"""Starting from pretrained weights (``model.pretrained``, ``create_model(name, pretrained=...)``): timm's and
mindcv's twins of each family load exactly (same logits on the same input, from random weights with non-trivial
BatchNorm statistics), every tensor accounted for, the classifier re-initialised for another class count, and
weights that do not fit are refused with one line naming the first tensor."""

from __future__ import annotations

import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from framework.models import create_model
from framework.models.pretrained import PretrainedError, read_weights

TIMM_TWINS = [
    ("resnext50_32x4d", "resnext50_32x4d"),
    ("resnext101_32x4d", "resnext101_32x4d"),
    ("resnext101_32x8d", "resnext101_32x8d"),
    *((f"efficientnet_b{i}", f"efficientnet_b{i}") for i in range(8)),
    ("nfnet_f0", "dm_nfnet_f0"),
]
MINDCV_TWINS = [
    ("resnext50_32x4d", "resnext50_32x4d"),
    *((f"efficientnet_b{i}", f"efficientnet_b{i}") for i in range(8)),
    ("nasnet_a_mobile", "nasnet_a_4x1056"),
]
IMAGE = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)


def assert_same_logits(ours: np.ndarray, reference: np.ndarray, label: str) -> None:
    """The issue's bound: max abs difference ≤ 1e-4 × max(1, largest |logit|)."""
    difference, scale = float(np.abs(ours - reference).max()), max(1.0, float(np.abs(reference).max()))
    print(f"{label}: max abs logit difference {difference:.2e} (largest |logit| {scale:.3f})")
    assert ours.shape == reference.shape and difference <= 1e-4 * scale


def timm_model(name: str, num_classes: int = 1000):
    """timm's model with random weights and BatchNorm statistics that are not the identity."""
    timm, torch = pytest.importorskip("timm"), pytest.importorskip("torch")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                for tensor, low, spread in ((module.running_var, 0.8, 0.4), (module.weight, 0.8, 0.4)):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * spread + low)
                for tensor in (module.running_mean, module.bias):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model


def timm_logits(model) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(IMAGE)).numpy()


def save_safetensors(model, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(path))
    return path


def our_logits(network) -> np.ndarray:
    network.set_train(False)
    return network(ms.Tensor(IMAGE)).asnumpy()


@pytest.fixture(autouse=True)
def _pynative():
    """Eager mode: one forward pass of a model is not worth a graph compile."""
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.mark.slow
@pytest.mark.parametrize(("ours", "twin"), TIMM_TWINS, ids=[o for o, _ in TIMM_TWINS])
def test_timm_weights_give_timms_logits(ours, twin, tmp_path):
    model = timm_model(twin)
    network = create_model(ours, pretrained=save_safetensors(model, tmp_path / f"{twin}.safetensors"))
    report = network.pretrained_report
    assert report.loaded == len(list(network.get_parameters())) and report.head is None
    assert set(report.ignored) <= {"num_batches_tracked"}  # PyTorch BatchNorm's counters, nothing else
    assert_same_logits(our_logits(network), timm_logits(model), f"timm {twin}")


@pytest.mark.slow
@pytest.mark.parametrize(("ours", "twin"), MINDCV_TWINS, ids=[o for o, _ in MINDCV_TWINS])
def test_mindcv_checkpoints_give_mindcvs_logits(ours, twin, tmp_path):
    models = pytest.importorskip("mindcv.models")
    ms.set_seed(0)
    model = models.create_model(twin, num_classes=1000)
    rng = np.random.default_rng(1)
    for param in model.get_parameters():  # non-trivial BatchNorm statistics
        if param.name.endswith(("moving_mean", "beta")):
            param.set_data(ms.Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.1))
        elif param.name.endswith(("moving_variance", "gamma")):
            param.set_data(ms.Tensor(rng.random(param.shape).astype(np.float32) * 0.4 + 0.8))
    ms.save_checkpoint(model, str(tmp_path / f"{twin}.ckpt"))
    network = create_model(ours, pretrained=tmp_path / f"{twin}.ckpt")
    report = network.pretrained_report
    assert report.loaded == len(list(model.get_parameters())) and not report.ignored  # every tensor of the file
    # and every tensor of ours, but NASNet's aux head (12 tensors): mindcv's has none
    assert report.loaded + sum(report.initialised.values()) == len(list(network.get_parameters()))
    assert report.initialised == ({"aux_head": 12} if ours.startswith("nasnet") else {})
    model.set_train(False)
    assert_same_logits(our_logits(network), model(ms.Tensor(IMAGE)).asnumpy(), f"mindcv {twin}")


def test_a_pth_file_is_read_without_unpickling_code(tmp_path):
    """torch.load(weights_only=True): a state dict loads; a pickled object that is no tensor data is refused."""
    torch = pytest.importorskip("torch")
    model = timm_model("efficientnet_b0")
    torch.save(model.state_dict(), tmp_path / "b0.pth")
    network = create_model("efficientnet_b0", pretrained=tmp_path / "b0.pth")
    assert_same_logits(our_logits(network), timm_logits(model), "timm efficientnet_b0 (.pth)")
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")  # a training script's file
    assert create_model("efficientnet_b0", pretrained=tmp_path / "wrapped.pth").pretrained_report.loaded == 311
    torch.save({"weights": Path("x")}, tmp_path / "code.pth")  # an arbitrary object: weights_only refuses it
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        read_weights(tmp_path / "code.pth")


def test_without_torch_a_pth_file_gets_one_line_and_safetensors_need_nothing(tmp_path, monkeypatch):
    model = timm_model("efficientnet_b0")
    safetensors = save_safetensors(model, tmp_path / "b0.safetensors")
    (tmp_path / "b0.pth").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails, as where it is not installed
    with pytest.raises(PretrainedError, match=r"b0\.pth is a PyTorch file: reading it needs torch .* \.safetensors"):
        read_weights(tmp_path / "b0.pth")
    assert create_model("efficientnet_b0", pretrained=safetensors).pretrained_report.loaded == 311


def test_the_head_is_reinitialised_for_another_class_count(tmp_path):
    model = timm_model("efficientnet_b0")
    weights = save_safetensors(model, tmp_path / "b0.safetensors")
    network = create_model("efficientnet_b0", pretrained=weights, num_classes=10)
    report = network.pretrained_report
    assert report.head == (1000, 10) and report.loaded == 309  # all but head.fc.weight and head.fc.bias
    assert report.line() == (
        "loaded 309 tensors from timm/torch weights b0.safetensors; head re-initialised: 1000 → 10 classes; "
        "ignored: 49 num_batches_tracked"
    )
    stem = model.state_dict()["conv_stem.weight"].numpy()
    assert np.array_equal(dict(network.parameters_and_names())["conv_stem.weight"].asnumpy(), stem)
    with pytest.raises(
        PretrainedError, match=r"classifier\.weight \(1000, 1280\) does not fit head\.fc\.weight \(10, 1280\)"
    ):
        create_model("efficientnet_b0", pretrained=weights, num_classes=10, pretrained_head="keep")
    reset = create_model("efficientnet_b0", pretrained=weights, pretrained_head="reset").pretrained_report
    assert reset.head == (1000, 1000) and reset.loaded == 309


def test_weights_of_another_model_are_refused_naming_the_first_tensor(tmp_path):
    weights = save_safetensors(timm_model("efficientnet_b0"), tmp_path / "b0.safetensors")
    with pytest.raises(PretrainedError) as refused:
        create_model("efficientnet_b2", pretrained=weights)
    message = str(refused.value)
    # B2's first stage has a second block that B0 lacks
    assert message == "timm/torch weights b0.safetensors has no tensor for blocks.0.1.conv_dw.weight (16, 1, 3, 3)"
    with pytest.raises(PretrainedError, match="ResNeXt has no twin among mindcv checkpoints|no tensor for"):
        create_model("resnext_test", pretrained=weights)
