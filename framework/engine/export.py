"""A network as a model file (MINDIR, ONNX, AIR), and running such a file: for ``task=export``, and for eval and
predict when they run on ONNX Runtime (``framework.engine.inference``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
import numpy as np

from framework.errors import UserError
from framework.models.layers import StemMaxPool

FORMATS = {"MINDIR": ".mindir", "ONNX": ".onnx", "AIR": ".air"}


class ErfGELU(nn.Cell):
    """Exact GELU, x·Φ(x), with erf from Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7) in ops ONNX has.

    MindSpore 2.8's ONNX exporter has no Erf (nor Sign), which exact ``nn.GELU`` needs; this form differs
    from it by < 1e-6 (measured) and exports. Used for export only, training keeps ``nn.GELU``.
    """

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        z = x * 0.7071067811865476
        a = ops.abs(z)
        t = 1.0 / (1.0 + 0.3275911 * a)
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        erf = z / (a + 1e-20) * (1.0 - poly * ops.exp(-a * a))  # z / |z| is sign(z), which has no ONNX export
        return 0.5 * x * (1.0 + erf)


@contextmanager
def exportable(network: nn.Cell, file_format: str) -> Iterator[nn.Cell]:
    """``network`` with stem pools padded with ``Pad`` instead of a concatenated border (which fixes the batch
    size in an exported graph) and, for ONNX, each exact ``nn.GELU`` replaced by ``ErfGELU``: the computation
    unchanged, in place for the block, as it was after it (eval may go on with the network itself)."""
    pools = [(cell, cell.concat_border) for _, cell in network.cells_and_names() if isinstance(cell, StemMaxPool)]
    gelus = [
        (cell, name, child)
        for _, cell in list(network.cells_and_names())
        for name, child in list(cell.name_cells().items())
        if file_format == "ONNX" and isinstance(child, nn.GELU) and child.approximate == "none"
    ]
    for cell, _ in pools:
        cell.concat_border = False
    for cell, name, _ in gelus:
        setattr(cell, name, ErfGELU())
    try:
        yield network
    finally:
        for cell, concat_border in pools:
            cell.concat_border = concat_border
        for cell, name, child in gelus:
            setattr(cell, name, child)


class ExportUnsupported(UserError, RuntimeError):
    """MindSpore cannot write an operator of the model in the requested format."""

    kind = "export error"


def export_network(network: nn.Cell, example: np.ndarray, path: Path, file_format: str) -> Path:
    """Write ``network`` (in inference mode) for inputs shaped like ``example``; returns the file written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = str(path.with_suffix(""))
    if file_format == "ONNX":
        from mindspore.onnx import export as onnx_export  # ms.export(..., "ONNX") is deprecated for this

        try:
            with exportable(network, file_format) as cell:
                onnx_export(
                    cell,
                    ms.Tensor(example),
                    file_name=stem,
                    input_names=["images"],
                    output_names=["logits"],
                    dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                )
        except RuntimeError as err:
            unsupported = re.search(r"Exporting (\w+) operator is not yet supported", str(err))
            if unsupported is None:
                raise
            raise ExportUnsupported(
                f"MindSpore {ms.__version__} cannot export the {unsupported.group(1)} operator to ONNX, which this "
                f"model uses for input {list(example.shape)}. Export MINDIR instead, or another input size "
                "(e.g. NFNet pools odd-sized maps with AvgPool3D; even sizes such as 192, 224 or 256 export)"
            ) from err
    else:
        with exportable(network, file_format) as cell:
            ms.export(cell, ms.Tensor(example), file_name=stem, file_format=file_format)
    written = Path(stem + FORMATS[file_format])
    if not written.is_file():
        raise RuntimeError(f"MindSpore reported no error but wrote no {file_format} file at {written}")
    return written


def load_exported(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function images → logits running an exported MINDIR (``nn.GraphCell``) or ONNX (onnxruntime) file."""
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda images: session.run(None, {name: images.astype(np.float32)})[0]
    if path.suffix == ".mindir":
        cell = nn.GraphCell(ms.load(str(path)))
        return lambda images: cell(ms.Tensor(images.astype(np.float32))).asnumpy()
    raise ValueError(f"cannot run {path}: only .mindir and .onnx files run here (AIR runs on Ascend)")


def accepts_any_batch(run_exported: Callable[[np.ndarray], np.ndarray], example: np.ndarray) -> bool:
    """Whether the exported model also runs on another batch size (Conformer's reshapes fix the batch)."""
    try:
        return run_exported(np.concatenate([example, example[:1]])).shape[0] == len(example) + 1
    except Exception:  # onnxruntime / GraphCell refuse the shape
        return False


def declare_batch(path: Path, batch: int | str) -> None:
    """Declare the ONNX graph's batch axes as ``batch``: a size, or a name (any size). MindSpore declares the
    traced batch on the outputs even for a symbolic input batch, which onnxruntime warns about on every other
    batch size."""
    import onnx

    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        if isinstance(batch, int):
            dim.dim_value = batch
        else:
            dim.dim_param = batch
    onnx.save(model, str(path))


@dataclass
class Exported:
    """An exported file and how it was checked: the example input, the network's logits on it, the largest
    difference of the file's logits (None: not run here) and whether it runs on any batch size."""

    path: Path
    example: np.ndarray
    reference: np.ndarray
    max_abs_diff: float | None = None
    any_batch: bool = False

    @property
    def logit_scale(self) -> float:
        return max(1.0, float(np.abs(self.reference).max()))

    def run_back(self) -> Callable[[np.ndarray], np.ndarray]:
        """Run the file on the example (``max_abs_diff``) and on another batch size (``any_batch``); the file as
        images → logits."""
        forward = load_exported(self.path)
        self.max_abs_diff = float(np.abs(forward(self.example) - self.reference).max())
        self.any_batch = accepts_any_batch(forward, self.example)
        return forward

    def within(self, tolerance: float) -> bool:
        """Whether the file's logits are the network's within ``tolerance`` × max(1, largest |logit|): float32
        rounding grows with the logits' magnitude."""
        return self.max_abs_diff is not None and self.max_abs_diff <= tolerance * self.logit_scale
