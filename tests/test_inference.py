"""The engine eval and predict run a trained network on (``inference.engine``): ONNX Runtime on the network
exported to ONNX where that computes what MindSpore computes, else MindSpore, saying which and why."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from framework.engine.inference import Inference, NoOnnxRuntime, mindspore_forward
from framework.models import create_model

IMAGES = np.random.default_rng(3).standard_normal((5, 3, 32, 32)).astype(np.float32)


@pytest.fixture(autouse=True)
def _graph_mode():
    """As eval and predict run (hardware setup): MindSpore's ONNX exporter fails on some networks in PyNative."""
    ms.set_context(mode=ms.GRAPH_MODE)


def test_auto_runs_onnxruntime_with_mindspores_logits_on_any_batch(tmp_path):
    network = create_model("resnext_test", num_classes=10)
    reference = mindspore_forward(network)(IMAGES)
    forward, engine = Inference().forward(network, 32, "CPU", tmp_path)
    assert engine.startswith("onnxruntime (the network as ONNX: max abs logit difference ")
    assert list(tmp_path.glob("*.onnx"))
    for images, want in ((IMAGES, reference), (IMAGES[:1], reference[:1])):  # exported at batch 2
        assert np.abs(forward(images) - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))


def test_auto_takes_mindspore_where_the_export_fixes_the_batch_and_says_why(tmp_path):
    network = create_model("conformer_test", num_classes=10)  # its reshapes fix the batch of an exported graph
    forward, engine = Inference().forward(network, 32, "CPU", tmp_path)
    assert engine.startswith("mindspore (not ONNX Runtime: the network exported to ONNX runs on one batch size only")
    assert forward(IMAGES).shape == (5, 10)
    with pytest.raises(NoOnnxRuntime, match="runs on one batch size only"):
        # a new network: MindSpore 2.8's ONNX exporter fails on a second export of the same Conformer
        Inference(engine="onnxruntime").forward(create_model("conformer_test", num_classes=10), 32, "CPU", tmp_path)


def test_auto_takes_mindspore_when_the_export_differs(tmp_path):
    network = create_model("resnext_test", num_classes=10)
    _, engine = Inference(tolerance=1e-12).forward(network, 32, "CPU", tmp_path)  # float32 rounding is larger
    assert engine.startswith("mindspore (not ONNX Runtime: the network exported to ONNX differs from MindSpore's by ")


def test_mindspore_on_other_devices_and_when_asked(tmp_path):
    network = create_model("resnext_test", num_classes=10)
    assert Inference().forward(network, 32, "GPU", tmp_path)[1] == "mindspore (on GPU; ONNX Runtime runs on the CPU)"
    _, engine = Inference(engine="mindspore").forward(network, 32, "CPU", tmp_path)
    assert engine == "mindspore (inference.engine=mindspore)"
    assert not list(tmp_path.iterdir())  # nothing exported
