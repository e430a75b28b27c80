"""Every choice of every config group composes and instantiates into the real object."""

from __future__ import annotations

from pathlib import Path

import mindspore as ms
import mindspore.nn as nn
import numpy as np
import pytest
from hydra.utils import get_method, instantiate

from framework.config import build
from framework.data.pipeline import ImageData
from framework.data.synthetic import write_image_folder
from framework.engine import Trainer
from framework.launch import Hardware
from framework.tracking import MlflowTracker
from tests.conftest import CONF_DIR


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def test_default_config_composes(make_config):
    cfg = make_config()
    assert cfg.model.name == "resnext50_32x4d"
    assert cfg.model.num_classes == cfg.dataset.num_classes == 10
    assert Path(cfg.tracking.local_store).is_absolute()
    assert cfg.paths.output_dir == str(Path(CONF_DIR).parent / "outputs")


@pytest.mark.parametrize("task", choices("task"))
def test_task_targets_resolve(make_config, task):
    cfg = make_config(f"task={task}")
    assert callable(get_method(cfg.task._target_))


@pytest.mark.parametrize("model", choices("model"))
def test_model_choices_build(make_config, model):
    cfg = make_config(f"model={model}")
    network = instantiate(cfg.model)
    assert isinstance(network, nn.Cell)
    logits = network(ms.Tensor(np.zeros((2, 3, 32, 32), np.float32)))
    assert logits.shape == (2, 10)


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("tree"), 3, 4, 2, size=(48, 40))


@pytest.mark.parametrize("dataset", choices("dataset"))
def test_dataset_choices_build(make_config, tmp_path, small_tree, dataset):
    """Each dataset choice builds a loader of the configured size (folder ones on a small generated tree)."""
    per_choice = {
        "folder": [f"dataset.path={small_tree}"],
        "folder_small": [f"dataset.path={small_tree}"],
        "imagenet": [f"dataset.path={small_tree}", "dataset.num_classes=3"],
        "synthetic_jpeg": [
            f"dataset.path={tmp_path / 'syn'}",
            "dataset.train_images=20",
            "dataset.val_images=10",
            "dataset.image_size_wh=[48,40]",
        ],
    }
    cfg = make_config(
        f"dataset={dataset}", "dataset.image_size=32", "dataset.batch_size=8", *per_choice.get(dataset, [])
    )
    data = instantiate(cfg.dataset)
    assert isinstance(data, ImageData) and data.num_classes == len(data.class_names)
    images, labels = next(data.loader("train").create_tuple_iterator())
    assert images.shape == (8, 3, 32, 32) and labels.dtype == ms.int32


@pytest.mark.parametrize("optimizer", choices("optimizer"))
def test_optimizer_choices_build(make_config, optimizer):
    cfg = make_config(f"optimizer={optimizer}", *(["optimizer.agc_exclude=[]"] if optimizer == "sgd_agc" else []))
    params = nn.Dense(4, 2).trainable_params()
    opt = build(cfg, "optimizer", params=params, learning_rate=ms.Tensor(np.full(10, 0.1, np.float32)))
    assert isinstance(opt, nn.Optimizer)


@pytest.mark.parametrize("scheduler", choices("scheduler"))
def test_scheduler_choices_build(make_config, scheduler):
    schedule = build(make_config(f"scheduler={scheduler}"), "scheduler", epochs=3, steps_per_epoch=5)
    lr = np.asarray(schedule)
    assert len(schedule) == 15 and lr.shape == (15,) and lr.dtype == np.float32 and (lr >= 0).all()


@pytest.mark.parametrize("loss", choices("loss"))
def test_loss_choices_build(make_config, loss):
    loss_fn = instantiate(make_config(f"loss={loss}").loss)
    value = loss_fn(ms.Tensor(np.zeros((2, 10), np.float32)), ms.Tensor(np.array([1, 2], np.int32)))
    assert float(value.asnumpy()) > 0


@pytest.mark.parametrize("engine", choices("engine"))
def test_engine_choices_build(make_config, engine):
    assert isinstance(instantiate(make_config(f"engine={engine}").engine), Trainer)


@pytest.mark.parametrize("hardware", choices("hardware"))
def test_hardware_choices_build(make_config, hardware):
    hw = instantiate(make_config(f"hardware={hardware}").hardware)
    assert isinstance(hw, Hardware) and hw.device_target in ("CPU", "GPU", "Ascend")


@pytest.mark.parametrize("tracking", choices("tracking"))
def test_tracking_choices_build(make_config, tmp_path, tracking):
    tracker = instantiate(make_config(f"tracking={tracking}").tracking)
    assert isinstance(tracker, MlflowTracker)
    assert tracker.uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"


def test_tracking_uri_from_environment(make_config, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert instantiate(make_config().tracking).uri == "http://127.0.0.1:5999"
    assert instantiate(make_config("tracking.uri=http://127.0.0.1:6001").tracking).uri == "http://127.0.0.1:6001"


@pytest.mark.parametrize("debug", choices("debug"))
def test_debug_choices_compose(make_config, debug):
    cfg = make_config(f"debug={debug}")
    assert cfg.engine.epochs >= 1
