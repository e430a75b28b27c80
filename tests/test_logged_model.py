"""The model, datasets and system metrics a training run logs: ``runs:/<id>/model`` loads with MLflow's pyfunc and
answers as ``task=predict`` does, is served over HTTP, and is registered (``models:/<name>/<version>``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from framework.tasks.eval import evaluate_checkpoint
from framework.tasks.predict import predict
from framework.tasks.train import train
from tests.conftest import FAST, all_runs, compose_config, mlflow_client, served_model
from tests.test_predict import image_folder

pytestmark = pytest.mark.slow  # trains a job first (the train task)

RUN = [*FAST, "engine.epochs=1", "engine.limit_train_batches=4", "tracking.register_model=digits"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("logged")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # a sample a second of this short run
        train(compose_config(RUN, tmp_path))
    (run,) = all_runs(mlflow_client(tmp_path))
    return tmp_path, run


def pyfunc_model(tmp_path: Path, uri: str):
    import mlflow.pyfunc

    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
        return mlflow.pyfunc.load_model(uri)


def read_images(files: list[Path]) -> np.ndarray:
    """As task=predict reads them: RGB uint8 (the test images share one size)."""
    return np.stack([np.asarray(Image.open(path).convert("RGB")) for path in files])


def test_the_run_logs_a_model_that_answers_as_task_predict(trained, tmp_path):
    store, run = trained
    client = mlflow_client(store)
    (output,) = run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert (logged.name, logged.source_run_id, logged.status.name) == ("model", run.info.run_id, "READY")
    files = {p.name for p in (store / "run" / "model").rglob("*")}  # as logged: loaded from code, nothing unpickled
    assert {"MLmodel", "pyfunc_code.py", "best.ckpt"} <= files and not [f for f in files if f.endswith(".pkl")]
    images = image_folder(tmp_path / "images")
    cfg = compose_config(["task=predict", *FAST, "ckpt=models:/digits/1", f"input={images}", "predict.top_k=10"],
                         store)  # fmt: skip
    records = predict(cfg)  # through the registry: models:/<name>/<version>
    model = pyfunc_model(store, f"runs:/{run.info.run_id}/model")
    probabilities = model.predict({"images": read_images([Path(r["file"]) for r in records])})
    assert list(probabilities.columns) == [str(i) for i in range(10)]
    expected = np.array([[c["probability"] for c in sorted(r["top_k"], key=lambda c: c["index"])] for r in records])
    difference = np.abs(probabilities.to_numpy() - expected).max()
    print(f"pyfunc vs task=predict: max abs probability difference {difference:.2e}")
    assert difference <= 1e-6
    (signature,) = model.metadata.get_input_schema().inputs
    assert (signature.name, signature.type, signature.shape) == ("images", np.dtype(np.uint8), (-1, -1, -1, 3))


def test_the_model_is_registered_and_models_uris_work(trained, tmp_path):
    store, run = trained
    (version,) = mlflow_client(store).search_model_versions("name = 'digits'")
    assert int(version.version) == 1 and version.run_id == run.info.run_id
    assert version.description.startswith("val_top1 ") and run.info.run_name in version.description
    # the logged model's page links the version, as mlflow.register_model does
    client = mlflow_client(store)
    (model,) = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run.info.run_id}'")
    links = json.loads(model.tags["mlflow.modelVersions"])
    assert links == [{"name": "digits", "version": 1}]
    cfg = compose_config(["task=eval", *FAST, "ckpt=models:/digits/1"], store)
    assert evaluate_checkpoint(cfg)["val_top1"] == run.data.metrics["val_top1"]


def test_the_run_has_its_datasets_and_system_metrics(trained):
    _, run = trained
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation"} and inputs["train"].name == "digits/train"
    assert inputs["train"].digest == run.data.tags["data_train_sha256"]
    profiles = {context: json.loads(dataset.profile) for context, dataset in inputs.items()}
    assert (profiles["train"]["images"], profiles["validation"]["images"]) == (1437, 360)
    assert json.loads(profiles["train"]["class_map"]) == {str(i): i for i in range(10)}
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system


def test_system_metrics_can_be_turned_off(tmp_path):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
        train(compose_config([*RUN[:-1], "tracking.system_metrics=false"], tmp_path))
    (run,) = all_runs(mlflow_client(tmp_path))
    assert not [k for k in run.data.metrics if k.startswith("system/")]


def test_the_model_is_served_over_http(trained, tmp_path):
    """``mlflow models serve -m runs:/<id>/model --env-manager local``, as the run's summary prints it."""
    store, run = trained
    images = read_images(sorted((image_folder(tmp_path / "images")).rglob("digit_*.jpg")))
    expected = pyfunc_model(store, f"runs:/{run.info.run_id}/model").predict({"images": images})
    with served_model(store, f"runs:/{run.info.run_id}/model") as invoke:
        started = time.perf_counter()
        answer = invoke({"inputs": {"images": images.tolist()}})
        print(f"served: {len(images)} images answered in {time.perf_counter() - started:.2f} s")
    served = np.array([[row[str(i)] for i in range(10)] for row in answer["predictions"]])
    assert np.abs(served - expected.to_numpy()).max() <= 1e-6
