"""task=export: MINDIR and ONNX files of every model, run back (GraphCell, onnxruntime) against MindSpore."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from framework.config import ConfigError
from framework.engine import save_checkpoint
from framework.engine.export import ExportUnsupported, load_exported
from framework.models import create_model
from framework.tasks.export import ExportMismatch, export
from tests.conftest import all_runs, compose_config, mlflow_client, served_model

pytestmark = pytest.mark.slow  # end-to-end jobs: python -m pytest -m "not slow" skips them

MODELS = ["resnext50", "efficientnet_b2", "nfnet_f0", "nasnet_a_mobile", "conformer_ti"]


def checkpoint_for(model: str, tmp_path: Path, source_run_id: str | None = None) -> Path:
    """A checkpoint of ``model`` (10 classes) as training writes it; the weights are its initialisation."""
    cfg = compose_config([f"model={model}"], tmp_path / "init")
    network = create_model(cfg.model.name, num_classes=10)
    meta = {"model": cfg.model.name, "num_classes": 10, "class_names": [f"digit {i}" for i in range(10)]}
    if source_run_id:
        meta["mlflow_run_id"] = source_run_id
    return save_checkpoint(network, tmp_path / f"{model}.ckpt", meta)


def export_config(tmp_path: Path, model: str, fmt: str, *overrides: str):
    ckpt = checkpoint_for(model, tmp_path)
    return compose_config(
        ["task=export", f"model={model}", "dataset.image_size=32", "export.batch_size=2", f"ckpt={ckpt}",
         f"export.format={fmt}", *overrides],
        tmp_path,
    )  # fmt: skip


# ONNX for every model (each needed its own exportable ops); MINDIR, a generic exact round trip, for the
# plainest model (the test ResNeXt) and for Conformer-Ti, whose reshapes fix the batch.
@pytest.mark.parametrize(
    ("model", "fmt"),
    [*((model, "ONNX") for model in MODELS), ("resnext_test", "MINDIR"), ("conformer_ti", "MINDIR")],
)
def test_export_matches_mindspore(tmp_path, capfd, model, fmt):
    result = export(export_config(tmp_path, model, fmt))
    assert "does not match actual shape" not in capfd.readouterr().err  # onnxruntime: the declared shapes are right
    assert result["max_abs_diff"] <= 1e-4 * result["max_abs_logit"] and result["input_shape"] == (2, 3, 32, 32)
    print(f"PARITY {model} {fmt} max_abs_diff={result['max_abs_diff']:.3g} max_abs_logit={result['max_abs_logit']:.3g}")
    logits = load_exported(result["path"])(np.zeros((2, 3, 32, 32), np.float32))
    assert logits.shape == (2, 10) and np.isfinite(logits).all()
    (run,) = all_runs(mlflow_client(tmp_path))
    assert run.info.status == "FINISHED" and run.data.tags["export_format"] == fmt
    assert run.data.metrics[f"{fmt.lower()}_max_abs_diff"] == pytest.approx(result["max_abs_diff"])
    artifacts = {a.path for a in mlflow_client(tmp_path).list_artifacts(run.info.run_id, "export")}
    assert {f"export/{result['path'].name}", "export/export.json"} <= artifacts
    written = json.loads((result["path"].parent / "export.json").read_text())
    any_batch = model != "conformer_ti"  # its reshapes fix the batch; the others take any batch, MINDIR too
    assert written == {"format": fmt, "input_shape": [2, 3, 32, 32], "any_batch": any_batch}
    assert run.data.tags["export_any_batch"] == str(any_batch).lower()


def test_onnx_export_is_an_mlflow_model_and_tags_its_source_run(tmp_path, monkeypatch):
    client = mlflow_client(tmp_path)
    compose_config([], tmp_path)  # creates the isolated store's directory
    experiment = client.create_experiment("classification", artifact_location=(tmp_path / "artifacts").as_uri())
    source = client.create_run(experiment).info.run_id
    source_tags = client.get_run(source).data.tags
    ckpt = checkpoint_for("resnext_test", tmp_path, source_run_id=source)
    cfg = compose_config(["task=export", "model=resnext_test", "dataset.image_size=32", "export.batch_size=2",
                          f"ckpt={ckpt}", "export.format=ONNX"], tmp_path)  # fmt: skip
    result = export(cfg)
    assert "MLFLOW_TRACKING_URI" not in os.environ, "logging the model must not redirect later runs"
    tags = client.get_run(result["run_id"]).data.tags
    assert tags["source_run_id"] == tags["mlflow.parentRunId"] == source  # listed under its training run
    assert f"(#/experiments/{experiment}/runs/{source})" in tags["mlflow.note.content"]
    assert client.get_run(source).data.tags == source_tags, "the training run is not changed"
    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"runs:/{result['run_id']}/model")
    images = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)  # not the export batch
    served = model.predict({"images": images})["logits"]
    assert served.shape == (3, 10) and np.abs(served - load_exported(result["path"])(images)).max() <= 1e-5
    (spec,) = model.metadata.get_input_schema().inputs
    assert (spec.name, spec.shape) == ("images", (-1, 3, 32, 32))


def test_air_on_cpu_fails_at_once(tmp_path):
    with pytest.raises(ConfigError, match="export.format=AIR needs the Ascend backend"):
        export(export_config(tmp_path, "resnext_test", "AIR"))
    assert all_runs(mlflow_client(tmp_path)) == [] if (tmp_path / "mlflow").exists() else True


def test_export_that_differs_beyond_tolerance_is_refused(tmp_path):
    with pytest.raises(ExportMismatch, match="differs from the MindSpore network by"):
        export(export_config(tmp_path, "resnext_test", "ONNX", "export.tolerance=1e-12"))
    assert not (tmp_path / "mlflow" / "mlflow.db").exists() or all_runs(mlflow_client(tmp_path)) == []


def test_onnx_model_is_served_over_http(tmp_path):
    """``mlflow models serve`` on the export run's model answers a posted batch like local inference."""
    result = export(export_config(tmp_path, "resnext_test", "ONNX"))
    with served_model(tmp_path, f"runs:/{result['run_id']}/model") as invoke:
        images = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
        started = time.perf_counter()
        answer = invoke({"inputs": {"images": images.tolist()}})
        print(f"SERVE round trip {1000 * (time.perf_counter() - started):.1f} ms for 3 images")
    served = np.asarray(answer["predictions"]["logits"], np.float32)
    assert served.shape == (3, 10)
    assert np.abs(served - load_exported(result["path"])(images)).max() <= 1e-5


def test_onnx_export_names_the_operator_mindspore_cannot_write(tmp_path):
    """NFNet at 72 px pools a 9×9 map with the padded (AvgPool3D) pool, which has no ONNX export."""
    with pytest.raises(ExportUnsupported, match="cannot export the AvgPool3D operator to ONNX.*Export MINDIR instead"):
        export(export_config(tmp_path, "nfnet_f0", "ONNX", "dataset.image_size=72"))
