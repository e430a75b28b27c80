"""The engine ``task=eval`` and ``task=predict`` run a trained network on (``inference/`` configs).

``mindspore`` runs the network as it is. ``onnxruntime`` exports it to ONNX (as ``task=export`` does, into the
run's folder) and runs the file with ONNX Runtime. On a CPU, ONNX Runtime's kernels are the faster ones: MindSpore
2.8 runs convolutions through oneDNN 2's im2col + GEMM and most element-wise ops on one thread (README
"Performance" has the figures, from ``task=benchmark``). ``auto`` takes ONNX Runtime on a CPU when the exported
file computes what the network computes, within ``tolerance`` × max(1, largest |logit|) on a random batch, and runs
on any batch size; otherwise (another device, an operator MindSpore cannot write to ONNX, a file that differs or
fixes the batch) it takes MindSpore and says why. The choice changes the speed, not the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import mindspore as ms
import mindspore.nn as nn
import numpy as np

from framework.engine.export import Exported, declare_batch, export_network
from framework.errors import UserError
from framework.schema import Positive

Forward = Callable[[np.ndarray], np.ndarray]  # a batch of images (N×3×H×W float32) → logits


class NoOnnxRuntime(UserError, RuntimeError):
    """ONNX Runtime cannot run the network as MindSpore does: no export, another result, or one batch size only."""

    kind = "inference error"


def mindspore_forward(network: nn.Cell) -> Forward:
    """``network`` in inference mode as images → logits."""
    network.set_train(False)
    return lambda images: network(ms.Tensor(images)).asnumpy()


@dataclass
class Inference:
    """Which engine runs a trained network for eval and predict (``inference`` node), see the module."""

    engine: Literal["auto", "mindspore", "onnxruntime"] = "auto"
    tolerance: Annotated[float, Positive] = 1e-4

    def forward(self, network: nn.Cell, image_size: int, device_target: str, folder: Path) -> tuple[Forward, str]:
        """images → logits of ``network`` on the chosen engine, and a line saying which engine and why."""
        if self.engine == "mindspore":
            return mindspore_forward(network), "mindspore (inference.engine=mindspore)"
        if self.engine == "auto" and device_target != "CPU":
            return mindspore_forward(network), f"mindspore (on {device_target}; ONNX Runtime runs on the CPU)"
        try:
            forward, difference, scale = self._onnxruntime(network, image_size, folder)
        except NoOnnxRuntime as err:
            if self.engine == "onnxruntime":
                raise
            return mindspore_forward(network), f"mindspore (not ONNX Runtime: {err})"
        return forward, (
            f"onnxruntime (the network as ONNX: max abs logit difference {difference:.1e} vs MindSpore, largest "
            f"|logit| {scale:.2g})"
        )

    def _onnxruntime(self, network: nn.Cell, image_size: int, folder: Path) -> tuple[Forward, float, float]:
        """ONNX Runtime on ``network`` exported to ``folder``, checked against it on a random batch."""
        example = np.random.default_rng(0).standard_normal((2, 3, image_size, image_size)).astype(np.float32)
        reference = mindspore_forward(network)(example)
        try:
            path = export_network(network, example, folder / type(network).__name__.lower(), "ONNX")
        except RuntimeError as err:  # an operator it cannot write, or one of its internal errors
            raise NoOnnxRuntime(f"MindSpore could not export it to ONNX: {str(err).strip().splitlines()[0]}") from err
        declare_batch(path, "batch")
        exported = Exported(path, example, reference)
        forward = exported.run_back()
        if not exported.within(self.tolerance):
            raise NoOnnxRuntime(
                f"the network exported to ONNX differs from MindSpore's by {exported.max_abs_diff:.3g} (max abs logit "
                f"difference, inference.tolerance={self.tolerance:g}); inference.engine=mindspore runs it as it is"
            )
        if not exported.any_batch:
            raise NoOnnxRuntime("the network exported to ONNX runs on one batch size only (its reshapes fix it)")
        return forward, float(exported.max_abs_diff), exported.logit_scale
