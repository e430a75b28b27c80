"""Bad run specs fail before any work with one clear message, and leave no MLflow run behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from framework.config import ConfigError
from framework.paths import PROJECT_ROOT
from framework.tasks.eval import evaluate_checkpoint
from framework.tasks.train import train
from tests.conftest import all_runs, compose_config, mlflow_client


def assert_no_runs(tmp_path: Path) -> None:
    db = tmp_path / "mlflow" / "mlflow.db"
    assert not db.exists() or all_runs(mlflow_client(tmp_path)) == []


def test_unknown_group_choice_lists_valid_ones(tmp_path):
    with pytest.raises(MissingConfigException) as err:
        compose_config(["model=resnext5O"], tmp_path)
    assert "resnext50" in str(err.value)  # Hydra lists the available options


def test_unknown_top_level_key_is_refused(tmp_path):
    with pytest.raises(ConfigCompositionException, match="epochz"):
        compose_config(["epochz=3"], tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dataset.batch_size=0", r"dataset.batch_size must be > 0, got 0"),
        ("dataset.eval_batch_size=-8", r"dataset.eval_batch_size must be > 0, got -8"),
        ("scheduler.lr=0", r"scheduler.lr must be > 0, got 0"),
        ("scheduler.lr=-0.1", r"scheduler.lr must be > 0, got -0.1"),
        ("engine.epochs=0", r"engine.epochs must be > 0"),
        ("dataset.image_size=abc", r"dataset.image_size must be a number, got 'abc'"),
        ("+optimizer.momentun=0.5", r"unknown key 'optimizer.momentun'.*Did you mean 'optimizer.momentum'"),
        ("+engine.epoch=3", r"unknown key 'engine.epoch'.*Did you mean 'engine.epochs'"),
        ("dataset.batch_size=5000", r"dataset.batch_size=5000 is larger than the train split"),
        ("+model.depth=3", r"model \(framework.models.create_model\): .*unexpected keyword argument 'depth'"),
        ("dataset.val_fraction=1.5", r"dataset.val_fraction must be in \(0, 1\), got 1.5"),
        ("dataset=folder", r"dataset.path: required but not set .*Fix: add dataset.path=<value>"),
        ("dataset.num_parallel_workers=0", r"dataset.num_parallel_workers must be >= 1, got 0"),
        ("model.name=resnet9", r"unknown model 'resnet9' \(model.name\); registered models: conformer_ti, .*"),
    ],
)
def test_bad_values_fail_before_training(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train(compose_config([override], tmp_path))
    assert_no_runs(tmp_path)


def test_missing_checkpoint(tmp_path):
    cfg = compose_config(["task=eval", f"ckpt={tmp_path / 'nope.ckpt'}"], tmp_path)
    with pytest.raises(ConfigError, match="no such checkpoint file"):
        evaluate_checkpoint(cfg)
    assert_no_runs(tmp_path)


def test_eval_without_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="this task needs a checkpoint: ckpt="):
        evaluate_checkpoint(compose_config(["task=eval"], tmp_path))
    assert_no_runs(tmp_path)


def test_unknown_mlflow_run_checkpoint(tmp_path):
    cfg = compose_config(["task=eval", "ckpt=runs:/0123456789abcdef/checkpoints/best.ckpt"], tmp_path)
    with pytest.raises(ConfigError, match="cannot fetch it from"):
        evaluate_checkpoint(cfg)


def test_cli_reports_config_error_and_exit_code(tmp_path):
    """`python run.py` prints one line naming the key and the fix, and exits 2."""
    proc = subprocess.run(
        [
            sys.executable,
            "run.py",
            "dataset.batch_size=0",
            f"tracking.local_store={tmp_path / 'mlflow'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    expected = "config error: dataset.batch_size must be > 0, got 0. Fix: dataset.batch_size=<positive number>"
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_no_runs(tmp_path)
