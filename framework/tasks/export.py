"""``task=export``: a checkpoint as a deployable model file (MINDIR, ONNX, AIR), checked against MindSpore.

The network is exported in inference mode (NASNet's auxiliary head is off, Conformer's two heads are
summed as at evaluation; for ONNX exact GELUs are written with an erf polynomial, see ``engine.export.ErfGELU``)
for a fixed input of ``export.batch_size`` × 3 × size × size, size being the
dataset's eval size. Before anything is logged the exported file is run (MINDIR through
``nn.GraphCell``, ONNX through onnxruntime) on the same random batch as the network itself, and
refused if the logits differ by more than ``export.tolerance`` × max(1, largest |logit|) (float32 rounding
grows with the logits' magnitude). The file, its parity and the class map
go to a new MLflow run linked to the checkpoint's training run (tag ``source_run_id``); an ONNX
export is also logged as an MLflow ``onnx`` model with a signature and an input example.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import mindspore as ms
import numpy as np
from omegaconf import DictConfig

from framework.config import ConfigError, build
from framework.engine.export import FORMATS, Exported, declare_batch, export_network
from framework.errors import UserError
from framework.runtime.signals import stop_signals_interrupt
from framework.schema import Positive
from framework.tasks.common import (
    derived_run_tags,
    load_trained_network,
    log_run_spec,
    prepare,
    print_summary,
    resolve_checkpoint,
    run_tags,
)
from framework.tracking import MlflowRun
from framework.tracking.naming import run_name


@dataclass
class Export:
    """What to export (``export`` node of ``task=export``): format, input batch and size, parity tolerance."""

    format: str = "MINDIR"  # any case: not a Literal, checked once made upper case
    batch_size: Annotated[int, Positive] = 1
    image_size: Annotated[int, Positive] | None = None
    tolerance: Annotated[float, Positive] = 1e-4

    def __post_init__(self) -> None:
        self.format = str(self.format).upper()
        if self.format not in FORMATS:
            raise ValueError(f"export.format must be one of {', '.join(FORMATS)}, got '{self.format}'")


class ExportMismatch(UserError, RuntimeError):
    """The exported model does not compute what the MindSpore network computes."""

    kind = "export error"


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export ``cfg.ckpt`` as ``export.format``; returns the file, input shape, parity and MLflow run."""
    hardware = prepare(cfg)
    spec: Export = build(cfg, "export")
    if spec.format == "AIR" and hardware.device_target != "Ascend":
        raise ConfigError(
            f"export.format=AIR needs the Ascend backend (MindSpore writes AIR only there); this job runs on "
            f"{hardware.device_target}. Export MINDIR or ONNX here, or run with hardware=ascend on an Ascend host"
        )
    hardware.setup(cfg.seed)
    tracker = build(cfg, "tracking")
    run_dir = Path(cfg.paths.run_dir)
    checkpoint, uri_run_id = resolve_checkpoint(cfg.ckpt, tracker, run_dir / "checkpoint")
    network, meta = load_trained_network(cfg, checkpoint)
    size = int(spec.image_size or cfg.dataset.get("eval_image_size") or cfg.dataset.image_size)
    example = np.random.default_rng(cfg.seed).standard_normal((spec.batch_size, 3, size, size)).astype(np.float32)
    reference = network(ms.Tensor(example)).asnumpy()
    path = export_network(network, example, run_dir / "export" / str(cfg.model.name), spec.format)
    exported = _check_parity(Exported(path, example, reference), spec)
    source_run_id = uri_run_id or meta.get("mlflow_run_id")
    tags = {**run_tags(cfg, "export"), "export_format": spec.format}
    tags = derived_run_tags(tracker, {**tags, "export_any_batch": str(exported.any_batch).lower()}, source_run_id)
    with stop_signals_interrupt(), tracker.start_run(tags, run_name=run_name(cfg, "export")) as run:
        _log_export(cfg, run, exported, spec, meta.get("class_names"))
        if spec.format == "ONNX":
            providers = ["CUDAExecutionProvider"] if hardware.device_target == "GPU" else []
            providers.append("CPUExecutionProvider")
            _log_onnx_model(tracker.uri, run.run_id, path, example, reference, exported.any_batch, providers)
    _print_export_summary(exported, spec, run, source_run_id)
    return {
        "path": path,
        "input_shape": example.shape,
        "max_abs_diff": exported.max_abs_diff,
        "max_abs_logit": exported.logit_scale,
        "run_id": run.run_id,
    }


def _check_parity(exported: Exported, spec: Export) -> Exported:
    """Run the file (MINDIR, ONNX) on the example: its logits must match the network's within
    ``export.tolerance`` × max(1, largest |logit|), or ``ExportMismatch``; and try another batch size."""
    if spec.format == "AIR":  # runs on Ascend only
        return exported
    path, example = exported.path, exported.example
    if spec.format == "ONNX":  # as asked of the exporter; MindSpore declares the traced batch on outputs
        declare_batch(path, "batch")
    exported.run_back()
    if not exported.any_batch and spec.format == "ONNX":  # the model's reshapes fix the batch (Conformer): say so
        declare_batch(path, len(example))
    if not exported.within(spec.tolerance):
        raise ExportMismatch(
            f"the exported {spec.format} model differs from the MindSpore network by {exported.max_abs_diff:.3g} "
            f"(max abs logit difference, largest |logit| {exported.logit_scale:.3g}; export.tolerance="
            f"{spec.tolerance:g} × max(1, largest |logit|)); the file {path} is not logged"
        )
    return exported


def _log_export(cfg: DictConfig, run: MlflowRun, exported: Exported, spec: Export, class_names: list | None) -> None:
    """The run spec, the class map and input description (also beside the file, for task=predict), the parity
    metrics and the file."""
    path, shape = exported.path, list(exported.example.shape)
    log_run_spec(run, cfg)
    run.log_params({"export.input_shape": shape, "export.checkpoint": str(cfg.ckpt)})
    classes = class_names or [str(i) for i in range(exported.reference.shape[1])]
    class_map = json.dumps({"classes": classes}, indent=1)
    (path.parent / "classes.json").write_text(class_map)
    run.log_text(class_map, "data/classes.json")
    inputs = json.dumps({"format": spec.format, "input_shape": shape, "any_batch": exported.any_batch})
    (path.parent / "export.json").write_text(inputs)  # what task=predict feeds it
    run.log_text(inputs, "export/export.json")
    if exported.max_abs_diff is not None:
        metrics = {f"{spec.format.lower()}_max_abs_diff": exported.max_abs_diff, "max_abs_logit": exported.logit_scale}
        run.log_metrics(metrics, step=0)
    run.log_artifact(path, "export")


def _print_export_summary(exported: Exported, spec: Export, run: MlflowRun, source_run_id: str | None) -> None:
    example, diff = exported.example, exported.max_abs_diff
    rows = {
        "file": str(exported.path),
        "input": f"float32 {['any' if exported.any_batch else example.shape[0], *example.shape[1:]]} (NCHW, "
        "normalized as the dataset's eval transform)",
        "parity": "not checked (AIR runs on Ascend only)"
        if diff is None
        else f"max abs logit difference {diff:.2e} vs MindSpore (largest |logit| {exported.logit_scale:.3g}, "
        f"tolerance {spec.tolerance:g} × max(1, largest |logit|))",
        "mlflow run": f"{run.run_name} ({run.run_id}), source run {source_run_id or '-'}",
        "artifact": f"runs:/{run.run_id}/export/{exported.path.name}",
    }
    if spec.format == "ONNX":
        model_uri = f"runs:/{run.run_id}/model"
        rows["mlflow model"] = f"{model_uri}  (serve: mlflow models serve -m {model_uri} --env-manager local)"
    print_summary("export finished", rows)


def _log_onnx_model(
    uri: str,
    run_id: str,
    path: Path,
    example: np.ndarray,
    reference: np.ndarray,
    any_batch: bool,
    providers: list[str],
) -> None:
    """The ONNX file as an MLflow ``onnx`` model named ``model`` in run ``run_id``, with a signature (batch
    axis -1 when any batch runs, else the exported batch), an input example and the execution providers."""
    import mlflow
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    batch = -1 if any_batch else len(example)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (batch, *example.shape[1:]), "images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (batch, *reference.shape[1:]), "logits")]),
    )
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # the fluent API's; it also sets $MLFLOW_TRACKING_URI, restored below
    try:
        with mlflow.start_run(run_id=run_id):
            mlflow.onnx.log_model(
                onnx.load(str(path)),
                name="model",
                signature=signature,
                input_example={"images": example[:1] if any_batch else example},
                onnx_execution_providers=providers,
                # onnx and onnxruntime pinned to this environment: what serving the file needs (MLflow would
                # otherwise load the model in a subprocess to infer the same, ~5 s per export)
                pip_requirements=mlflow.onnx.get_default_pip_requirements(),
            )
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets it
