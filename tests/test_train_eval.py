"""End to end on real digits: train → MLflow run read back → eval of the best checkpoint reproduces it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from mlflow.entities import RunStatus

from framework.paths import PROJECT_ROOT
from framework.tasks.eval import evaluate_checkpoint
from framework.tasks.train import train
from tests.conftest import FAST, TEST_MODEL, all_runs, compose_config, mlflow_client

pytestmark = pytest.mark.slow  # end-to-end jobs: python -m pytest -m "not slow" skips them


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("train")
    overrides = [*FAST, "engine.checkpoint_every_n_epochs=1", "engine.keep_checkpoint_max=1"]
    result = train(compose_config(overrides, tmp_path))
    client = mlflow_client(tmp_path)
    (run,) = all_runs(client)
    return tmp_path, result, client, run


def test_short_training_beats_chance(trained):
    _, result, _, _ = trained
    assert len(result.history) == 2
    assert result.best["val_top1"] > 0.5  # chance is 0.1


def test_run_logs_params_tags_and_status(trained):
    _, _, _, run = trained
    assert RunStatus.from_string(run.info.status) == RunStatus.FINISHED
    params = run.data.params
    assert params["model.name"] == "resnext_test"
    assert params["dataset.image_size"] == "16"
    assert params["engine.epochs"] == "2"
    assert params["optimizer.name"] == "momentum"
    # hyper-parameters only: group choices instead of class paths, no unset values, nothing run-dependent
    assert params["choice.optimizer"] == "momentum" and params["choice.model"] == "resnext_test"
    assert not [k for k, v in params.items() if k.endswith("_target_") or v == "None" or "/" in v], params
    assert not [k for k in params if k.startswith(("paths.", "tracking.", "task."))], params
    assert params["dataset.num_classes"] == params["model.num_classes"] == "10"
    tags = run.data.tags
    assert tags["model"] == "resnext_test" and tags["dataset"] == "digits" and tags["hardware"] == "cpu"
    assert tags["mindspore_version"].startswith("2.")
    # named by what was set, described by its command and result; creation bookkeeping gone
    assert run.info.run_name == "resnext_test image_size=16 epochs=2 checkpoint_every_n_epochs=1 keep_checkpoint_max=1"
    description = tags["mlflow.note.content"]
    assert description.startswith("`python run.py ") and "spool_id" not in tags
    assert re.search(r"\*\*best\*\* val_top1 0\.\d{4} \(epoch \d\) · \*\*last\*\* val_top1", description)


def test_run_logs_step_and_epoch_metrics(trained):
    _, result, client, run = trained
    steps_per_epoch = 1437 // 32
    loss = client.get_metric_history(run.info.run_id, "train_loss")
    lr = client.get_metric_history(run.info.run_id, "lr")
    assert [m.step for m in loss] == list(range(1, 2 * steps_per_epoch + 1))
    assert len(lr) == len(loss) and lr[0].value < lr[steps_per_epoch].value  # warmup over the first epoch
    top1 = client.get_metric_history(run.info.run_id, "val_top1")
    assert [m.step for m in top1] == [steps_per_epoch, 2 * steps_per_epoch]  # the update that ended each epoch
    epoch = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "epoch")}
    assert epoch[1] == pytest.approx(1 / steps_per_epoch) and [epoch[m.step] for m in top1] == [1.0, 2.0]
    assert sorted(epoch) == [m.step for m in loss]  # every point has its epoch, so train and val overlay
    assert [m.value for m in top1] == pytest.approx([h["val_top1"] for h in result.history])
    for key in ("val_loss", "val_top5"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2


def test_run_logs_config_and_checkpoints(trained):
    tmp_path, _, client, run = trained
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert artifacts == {"config/config.yaml", "config/overrides.yaml"}
    top_level = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"lr_schedule.png", "data", "config", "checkpoints"} <= top_level
    checkpoints = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert checkpoints == {"checkpoints/best.ckpt", "checkpoints/last.ckpt"}
    local = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert local == ["best.ckpt", "epoch_0002.ckpt", "last.ckpt"]  # keep_checkpoint_max=1 rotated epoch 1 out


def test_eval_of_best_checkpoint_reproduces_logged_metric(trained, tmp_path):
    train_tmp, result, client, run = trained
    run_id = run.info.run_id
    best = max(client.get_metric_history(run_id, "val_top1"), key=lambda m: m.value)
    cfg = compose_config([*FAST, f"ckpt=runs:/{run_id}/checkpoints/best.ckpt", "task=eval"], train_tmp)
    metrics = evaluate_checkpoint(cfg)
    assert metrics["val_top1"] == best.value
    eval_runs = [r for r in all_runs(client) if r.data.tags.get("task") == "eval"]
    assert eval_runs and eval_runs[-1].data.tags["source_run_id"] == run_id
    assert eval_runs[-1].data.metrics["val_top1"] == best.value
    # at the training update that wrote the checkpoint: on the training curves' step axis
    (logged,) = client.get_metric_history(eval_runs[-1].info.run_id, "val_top1")
    assert logged.step == best.step


def test_eval_of_local_checkpoint_file(trained, tmp_path):
    train_tmp, result, _, run = trained
    cfg = compose_config([*FAST, f"ckpt={result.checkpoints['last']}", "task=eval"], tmp_path)
    metrics = evaluate_checkpoint(cfg)
    assert metrics["val_top1"] == result.last["val_top1"]
    (eval_run,) = all_runs(mlflow_client(tmp_path))
    assert eval_run.data.tags["source_run_id"] == run.info.run_id  # read from the checkpoint's metadata


def test_ctrl_c_marks_run_killed(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) mid-training: the step in progress ends with the
    state saved, the MLflow run is KILLED, the message says Ctrl-C (not the SIGTERM MindSpore turns it into during a
    graph run), exit status 130."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "run.py", *FAST, "engine.epochs=20", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        [*command, f"tracking.local_store={tmp_path / 'mlflow'}"],
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / "last.ckpt").exists():  # the first epoch is done
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "the MLflow run is marked KILLED" in stderr
    assert re.search(r"stopped by Ctrl-C \(SIGINT\) at step \d+ \(epoch \d+\); training state saved in ", stderr)
    assert "continue it with: python run.py " in stderr and f"resume=auto hydra.run.dir={run_dir}" in stderr
    (run,) = all_runs(mlflow_client(tmp_path))
    assert run.info.status == "KILLED"
    assert run.data.metrics["val_top1"] > 0  # what was logged before the interrupt is kept


def test_pynative_mode_trains(tmp_path):
    """hardware.mode=pynative runs the same loop eagerly."""
    result = train(compose_config(["debug=fast", TEST_MODEL, "hardware.mode=pynative"], tmp_path))
    assert len(result.history) == 2 and np.isfinite(result.last["val_loss"])
    (run,) = all_runs(mlflow_client(tmp_path))
    assert run.info.status == "FINISHED" and run.data.params["hardware.mode"] == "pynative"
