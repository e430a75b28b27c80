"""Bad run specs fail before any work with one clear message, and leave no MLflow run behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from framework.config import ConfigError, check_config
from framework.paths import PROJECT_ROOT
from framework.tasks.eval import evaluate_checkpoint
from framework.tasks.sync import sync
from framework.tasks.train import train
from framework.tracking.spool import Spool
from tests.conftest import TEST_MODEL, all_runs, compose_config, mlflow_client

FAST_TINY = [TEST_MODEL, "dataset.image_size=16", "engine.epochs=1", "engine.limit_train_batches=2"]


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
        (
            "dataset.image_size=abc",
            r"dataset.image_size='abc' has the wrong type: expected an integer .*image_size: int",
        ),
        ("+optimizer.momentun=0.5", r"unknown key 'optimizer.momentun'.*Did you mean 'optimizer.momentum'"),
        ("+engine.epoch=3", r"unknown key 'engine.epoch'.*Did you mean 'engine.epochs'"),
        ("dataset.batch_size=5000", r"dataset.batch_size=5000 is larger than the train split"),
        ("+model.depth=3", r"model \(framework.models.create_model\): .*unexpected keyword argument 'depth'"),
        ("dataset.val_fraction=1.5", r"dataset.val_fraction must be in \(0, 1\), got 1.5"),
        ("dataset=folder", r"dataset.path: required but not set .*Fix: add dataset.path=<value>"),
        ("dataset.num_parallel_workers=0", r"dataset.num_parallel_workers must be >= 1, got 0"),
        ("model.name=resnet9", r"unknown model 'resnet9' \(model.name\); registered models: conformer_ti, .*"),
        ("engine.epochs=2.5", r"engine.epochs=2.5 has the wrong type: expected an integer .*Trainer takes epochs: int"),
        ("engine.eval_ema=maybe", r"engine.eval_ema='maybe' has the wrong type: expected true/false"),
        ("seed=x", r"seed='x' has the wrong type: expected an integer"),
        ("resume=3", r"resume=3 has the wrong type: expected a string or null"),
        ("optimizer.momentum=1.5", r"optimizer.momentum must be in \[0, 1\), got 1.5"),
        ("loss.label_smoothing=-0.1", r"loss.label_smoothing must be in \[0, 1\), got -0.1"),
        ("optimizer.weight_decay=-1e-4", r"optimizer.weight_decay must be >= 0, got -0.0001"),
        ("engine.checkpoint_every_n_steps=-1", r"engine.checkpoint_every_n_steps must be >= 0, got -1"),
        ("engine.max_nonfinite_steps=0", r"engine.max_nonfinite_steps must be > 0, got 0"),
        ("+epochz=3", r"unknown top-level key 'epochz' \(\+epochz=3\): nothing reads it"),
        ("model._target_=os.system", r"model._target_='os.system' is not allowed: only framework.\*, mindspore.\*"),
        ("dataset.mixup._target_=subprocess.run", r"dataset.mixup._target_='subprocess.run' is not allowed"),
        ("allowed_targets=os.system", r"allowed_targets must be a list of names"),
        ("hardware.device_target=TPU", r"hardware.device_target must be one of \('CPU', 'GPU', 'Ascend'\)"),
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
    expected = "config error: dataset.batch_size must be > 0, got 0. Fix: dataset.batch_size=<number > 0>"
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_no_runs(tmp_path)


def test_target_from_a_yaml_outside_the_allowlist_is_never_imported(tmp_path):
    """A model config in a user's config folder naming ``os.system`` fails the check; the command never runs."""
    marker = tmp_path / "pwned"
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "evil.yaml").write_text(
        f"_target_: os.system\n_args_: ['touch {marker}']\nname: evil\n"
    )
    proc = run_py(tmp_path, "model=evil", f"hydra.searchpath=[file://{tmp_path / 'conf'}]")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error: model._target_='os.system' is not allowed" in proc.stderr
    assert not marker.exists()
    assert_no_runs(tmp_path)


def test_allowlisted_target_passes_the_check(tmp_path):
    """Naming a target in allowed_targets is how a trusted third-party class gets in."""
    cfg = compose_config(["+model.extra._target_=collections.OrderedDict"], tmp_path)
    with pytest.raises(ConfigError, match="model.extra._target_='collections.OrderedDict' is not allowed"):
        check_config(cfg)
    check_config(
        compose_config(["+model.extra._target_=collections.OrderedDict", "allowed_targets=[collections.]"], tmp_path)
    )


def test_resume_from_a_truncated_checkpoint_is_refused_and_the_run_kept(tmp_path):
    """A damaged resume file stops the job before anything is built; the finished run and its files are untouched."""
    result = train(compose_config([*FAST_TINY], tmp_path))
    (run,) = all_runs(mlflow_client(tmp_path))
    last = result.checkpoints["last"]
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(last.read_bytes()[:-10_000])
    before = last.read_bytes()
    with pytest.raises(ConfigError, match=f"resume={damaged}: cannot read checkpoint {damaged}"):
        train(compose_config([*FAST_TINY, f"resume={damaged}"], tmp_path))
    assert last.read_bytes() == before
    (after,) = all_runs(mlflow_client(tmp_path))
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"


def test_resume_auto_with_only_damaged_checkpoints_is_refused(tmp_path):
    train(compose_config([*FAST_TINY], tmp_path))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:-10_000])
    (tmp_path / "run" / "checkpoints" / "best.ckpt").unlink()
    with pytest.raises(ConfigError, match="resume=auto: no intact training checkpoint in"):
        train(compose_config([*FAST_TINY, "resume=auto"], tmp_path))
    assert last.exists()  # kept for inspection, not overwritten by a fresh start


def test_new_job_in_a_folder_with_undelivered_tracking_records_is_refused(tmp_path):
    """Records that never reached MLflow are not thrown away by a new job in the same folder."""
    spool = Spool(tmp_path / "run" / "tracking")
    spool.set_state(uri="http://127.0.0.1:9", experiment="classification", spool_id="x", run_name="old")
    spool.append({"kind": "create", "run_name": "old", "tags": {}})
    with pytest.raises(ConfigError, match=r"holds tracking records of an earlier job .*task=sync run_dir="):
        train(compose_config([*FAST_TINY], tmp_path))
    assert Spool(tmp_path / "run" / "tracking").pending()  # still there
    assert_no_runs(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], r"task=sync needs run_dir=<the training job's folder>"),
        (["run_dir=/nonexistent/job"], r"run_dir=/nonexistent/job: no tracking records in /nonexistent/job/tracking"),
    ],
)
def test_sync_without_records(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        sync(compose_config(["task=sync", *overrides], tmp_path))


def run_py(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "run.py", *overrides, f"tracking.local_store={tmp_path / 'mlflow'}"]
    command.append(f"hydra.run.dir={tmp_path / 'run'}")
    return subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
