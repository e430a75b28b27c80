"""Every choice of every config group composes and instantiates into the real object."""

from __future__ import annotations

import re
from pathlib import Path

import mindspore as ms
import mindspore.nn as nn
import numpy as np
import pytest
from hydra.utils import get_method, get_object, instantiate

from framework import config
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


@pytest.mark.parametrize(
    "model",  # full-size models take seconds each to build: slow tier
    [pytest.param(m, marks=() if m.endswith("_test") else pytest.mark.slow) for m in choices("model")],
)
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


# --- the schema: every setting declared next to its parameter ---------------------------------

GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name not in ("hydra", "paths"))
# What a choice needs besides itself to compose (benchmark settings live in task=benchmark, inference in eval).
NEEDS = {"benchmark": ["task=benchmark"], "inference": ["task=eval"]}


@pytest.mark.parametrize("group", GROUPS)
def test_every_setting_of_every_choice_is_annotated_on_its_target(make_config, group):
    """Each key of each ``_target_`` of each choice has a type the schema check reads (types, ``Literal``s,
    ``Annotated`` ranges): no table of keys beside the signatures is needed."""
    for choice in choices(group):
        cfg = make_config(f"{group}={choice}", *NEEDS.get(group, []))
        for path, node in config._target_nodes(cfg):
            obj = get_object(node._target_)
            obj = obj.schema_of(node) if hasattr(obj, "schema_of") else obj
            accepted, hints = config._accepted_keys(obj), config._type_hints(obj)
            assert accepted is not None, f"{group}={choice}: {path} ({node._target_}) takes any keyword: no schema"
            for key in node:
                if key not in config._HYDRA_KEYS:
                    assert key in hints, f"{group}={choice}: {path}.{key} has no annotation on {node._target_}"


def test_no_range_table_only_the_top_level_schema():
    assert not hasattr(config, "RANGES")
    assert all("." not in key for key in config.TOP_LEVEL) and set(config.TOP_LEVEL) < set(config.TOP_LEVEL_KEYS)


# The keys config.RANGES held, with a value outside each range: now declared on the targets' parameters.
FORMER_RANGES = {
    "dataset.batch_size": 0,
    "dataset.eval_batch_size": -8,
    "dataset.image_size": 0,
    "scheduler.lr": 0,
    "scheduler.warmup_epochs": -1,
    "optimizer.weight_decay": -1e-4,
    "optimizer.momentum": 1.0,
    "loss.label_smoothing": 1.0,
    "engine.epochs": 0,
    "engine.eval_every_n_epochs": 0,
    "engine.keep_checkpoint_max": 0,
    "engine.checkpoint_every_n_epochs": -1,
    "engine.checkpoint_every_n_steps": -1,
    "engine.accumulation_steps": 0,
    "engine.max_nonfinite_steps": 0,
    "engine.clip_grad_norm": 0,
    "engine.ema_decay": 1.0,
    "engine.loss_scale_value": 0,
    "engine.early_stopping.patience": 0,
    "engine.early_stopping.min_delta": -0.1,
}
PATH_NEEDED = {choice: ["dataset.path=/data"] for choice in ("folder", "folder_small", "imagenet")}


@pytest.mark.parametrize("key", FORMER_RANGES)
def test_former_ranges_hold_for_every_choice_of_their_group(make_config, key):
    """Every choice of a group whose target takes the setting refuses it out of range (every scheduler's lr,
    every optimizer's momentum), from the annotation alone: no object is built."""
    group, setting = key.split(".", 1)
    checked = 0
    for choice in choices(group):
        cfg = make_config(f"{group}={choice}", *PATH_NEEDED.get(choice, []))
        accepted = config._accepted_keys(get_object(cfg[group]._target_))
        if setting.split(".")[0] not in accepted:
            continue  # e.g. scheduler=linear names its peak lr lr_max
        bad = make_config(f"{group}={choice}", *PATH_NEEDED.get(choice, []), f"++{key}={FORMER_RANGES[key]}")
        with pytest.raises(config.ConfigError, match=rf"^{re.escape(key)} must be (>|>=|in) .*, got .*\. Fix: "):
            config.check_config(bad)
        checked += 1
    assert checked >= 1
