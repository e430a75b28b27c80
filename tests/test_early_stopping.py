"""Early stopping (``engine.early_stopping``): the rule, its config checks, and a run that stops early, is
interrupted on the way and resumed, ending exactly where the straight run ended."""

from __future__ import annotations

import signal

import pytest

from framework.config import ConfigError, check_config
from framework.engine import EarlyStopping
from framework.engine.checkpoint import read_checkpoint
from tests.conftest import mlflow_client
from tests.test_reliability import finished_run, loss_curve, start_job, wait_for_step

pytestmark = pytest.mark.slow  # end-to-end jobs: python -m pytest -m "not slow" skips them


def history(*values: float, key: str = "val_top1") -> list[dict[str, float]]:
    return [{"epoch": i + 1, key: v} for i, v in enumerate(values)]


def decide(rule: EarlyStopping, values: list[float], key: str = "val_top1"):
    past = history(*values, key=key)
    return rule.on_evaluation(len(values), 0, past[-1], past)


def test_rule_counts_evaluations_without_an_improvement_larger_than_min_delta():
    rule = EarlyStopping("val_top1", "max", patience=2, min_delta=0.01)
    assert decide(rule, [0.5, 0.6]) is None
    assert decide(rule, [0.5, 0.6, 0.605]) is None  # +0.005 is no improvement, 1 evaluation waited
    stop = decide(rule, [0.5, 0.6, 0.605, 0.59])
    assert stop is not None and stop.kind == "early_stopping"
    assert (
        "did not improve by more than 0.01 in 2 evaluations" in stop.reason and "best 0.6000 at epoch 2" in stop.reason
    )
    assert decide(rule, [0.5, 0.6, 0.605, 0.62]) is None  # a real improvement resets the count


def test_rule_follows_the_mode_and_is_off_without_patience():
    rule = EarlyStopping("val_loss", "min", patience=1)
    assert decide(rule, [1.0, 0.9], "val_loss") is None
    assert decide(rule, [1.0, 0.9, 0.95], "val_loss") is not None
    assert decide(EarlyStopping(patience=None), [0.9, 0.1, 0.1, 0.1]) is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("engine.early_stopping.patience=0", "engine.early_stopping.patience must be > 0, got 0"),
        ("engine.early_stopping.min_delta=-0.1", "engine.early_stopping.min_delta must be >= 0, got -0.1"),
        ("engine.early_stopping.mode=up", "engine.early_stopping.mode must be one of 'max', 'min', got 'up'. Fix: "),
        ("engine.early_stopping.mode=3", "engine.early_stopping.mode=3 has the wrong type: expected 'max' | 'min'"),
        ("engine.early_stopping.patience=2.5", "engine.early_stopping.patience=2.5 has the wrong type"),
    ],
)
def test_bad_settings_are_refused_before_anything_runs(make_config, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("|", r"\|")):
        check_config(make_config(override))


# 4 epochs of 6 steps; val_top1 never improves by 0.5, so the run ends after epoch 3 (best at 1, 2 waited)
EARLY = ["engine.epochs=4", "engine.early_stopping.patience=2", "engine.early_stopping.min_delta=0.5"]


def test_run_stops_early_and_a_resume_after_sigterm_stops_at_the_same_epoch(tmp_path):
    straight = start_job(tmp_path / "a" / "mlflow", tmp_path / "a" / "run", *EARLY)
    out, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-3000:]
    assert "training ends after epoch 3: early stopping: val_top1 did not improve by more than 0.5 in 2" in out
    run = finished_run(tmp_path / "a" / "mlflow")
    assert run.data.tags["stopped_epoch"] == "3" and "early stopping" in run.data.tags["stop_reason"]
    assert "pruned" not in run.data.tags
    checkpoints = tmp_path / "a" / "run" / "checkpoints"
    assert (checkpoints / "best.ckpt").is_file()
    _, meta = read_checkpoint(checkpoints / "last.ckpt", meta_only=True)
    assert meta["epoch"] == 3 and meta["stopped"]["kind"] == "early_stopping"
    history_a = mlflow_client(tmp_path / "a").get_metric_history(run.info.run_id, "val_top1")
    assert len(history_a) == 3

    store, run_dir = tmp_path / "b" / "mlflow", tmp_path / "b" / "run"
    job = start_job(store, run_dir, *EARLY)
    wait_for_step(job, 14)  # in epoch 3, with 1 evaluation waited so far
    job.send_signal(signal.SIGTERM)
    job.communicate(timeout=300)
    assert job.returncode == 143
    resumed = start_job(store, run_dir, *EARLY, "resume=auto")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "training ends after epoch 3" in out
    run_b = finished_run(store)
    assert run_b.data.tags["stopped_epoch"] == "3"
    assert run_b.data.tags["weights_sha256"] == run.data.tags["weights_sha256"]
    assert loss_curve(store, run_b) == loss_curve(tmp_path / "a" / "mlflow", run)

    again = start_job(store, run_dir, *EARLY, "resume=auto")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "training ended early after epoch 3 (early stopping" in out
