"""Sweeps (``python run.py -m``): one MLflow parent run per sweep with a child per trial, the best trial
recorded, failed trials recorded without stopping the sweep, an interrupted Optuna study continued."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.entities import Run

from framework.paths import PROJECT_ROOT
from framework.tasks.compare import compare
from tests.conftest import TEST_MODEL, all_runs, compose_config, mlflow_client

TINY = ["dataset.image_size=16", "engine.epochs=1", "engine.limit_train_batches=2"]


def sweep_command(tmp_path: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(PROJECT_ROOT / "run.py"), "-m", f"paths.output_dir={tmp_path}", *TINY, *overrides]


def run_sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run(
        sweep_command(tmp_path, *overrides), capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path
    )


def parent_and_children(tmp_path: Path) -> tuple[Run, list[Run]]:
    runs = all_runs(mlflow_client(tmp_path))
    (parent,) = [r for r in runs if r.data.tags.get("task") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1, "every other run is a trial of the sweep"
    return parent, children


def assert_best_recorded(parent: Run, children: list[Run], swept: list[str]) -> None:
    finished = [c for c in children if c.info.status == "FINISHED"]
    best = max(finished, key=lambda c: c.data.metrics["best_val_top1"])
    assert parent.data.metrics["best_val_top1"] == best.data.metrics["best_val_top1"]
    best_values = dict(o.split("=", 1) for o in parent.data.tags["best_overrides"].split())
    assert {k[len("best.") :]: v for k, v in parent.data.params.items() if k.startswith("best.")} == {
        k: best_values[k] for k in swept
    }
    winner = [c for c in finished if c.info.run_id == parent.data.tags["best_run_id"]]
    assert winner and winner[0].data.metrics["best_val_top1"] == best.data.metrics["best_val_top1"]


def test_grid_sweep_in_parallel_with_joblib(tmp_path):
    """2 models × 2 lrs, two trials at a time: four child runs under one parent that records the best;
    task=compare on the parent tabulates and plots the four."""
    out = run_sweep(
        tmp_path,
        "sweeps=grid_models_lr",
        "model=resnext_test,resnext50",
        "scheduler.lr=0.01,0.05",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    parent, children = parent_and_children(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweeper"] == "BasicSweeper"
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    assert sorted(c.data.tags["sweep_trial"] for c in children) == ["0", "1", "2", "3"]
    combos = {(c.data.params["model.name"], c.data.params["scheduler.lr"]) for c in children}
    assert combos == {(m, lr) for m in ("resnext_test", "resnext50_32x4d") for lr in ("0.01", "0.05")}
    assert parent.data.metrics["trials_finished"] == 4 and parent.data.metrics["trials_failed"] == 0
    assert_best_recorded(parent, children, ["model", "scheduler.lr"])
    artifacts = {a.path for a in mlflow_client(tmp_path).list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/sweeper.yaml", "sweep/overrides.yaml", "sweep/best_trial.yaml"} <= artifacts

    rows = compare(compose_config(["task=compare", f"compare.parent={parent.info.run_id}"], tmp_path))
    assert {r["run_id"] for r in rows} == {c.info.run_id for c in children}
    assert {"model.name", "scheduler.lr"} <= set(rows[0])
    plot = tmp_path / "run" / "val_top1_per_epoch.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    out = run_sweep(tmp_path, TEST_MODEL, "dataset.batch_size=5000,32")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trial 0 failed, the sweep goes on: config error: dataset.batch_size=5000" in out.stderr
    parent, children = parent_and_children(tmp_path)
    by_trial = {c.data.tags["sweep_trial"]: c for c in children}
    assert by_trial["0"].info.status == "FAILED" and "batch_size=5000" in by_trial["0"].data.tags["error"]
    assert by_trial["1"].info.status == "FINISHED"
    assert parent.info.status == "FINISHED"
    assert (parent.data.metrics["trials_failed"], parent.data.metrics["trials_finished"]) == (1, 1)
    assert parent.data.tags["best_run_id"] == by_trial["1"].info.run_id
    assert parent.data.params["best.dataset.batch_size"] == "32"


def _complete_trials(storage: Path) -> int:
    if not storage.is_file():
        return 0
    try:
        study = optuna.load_study(study_name="digits_resnext_test_tpe", storage=f"sqlite:///{storage}")
    except KeyError:
        return 0
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def test_optuna_study_survives_an_interrupt_and_completes(tmp_path):
    """A 4-trial TPE study, interrupted (Ctrl-C) after two trials, then re-run: it continues the stored study
    and the same MLflow parent until four trials completed, and records the best."""
    storage = tmp_path / "sweeps" / "digits_resnext_test_tpe.db"
    overrides = [TEST_MODEL, "sweeps=optuna_tpe", "study.n_trials=4"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    first = subprocess.Popen(
        sweep_command(tmp_path, *overrides),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while _complete_trials(storage) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert first.poll() is None, first.stderr.read()[-3000:]
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C
    first.communicate(timeout=120)
    assert first.returncode != 0
    done_before = _complete_trials(storage)
    assert 2 <= done_before < 4
    parent, _ = parent_and_children(tmp_path)
    assert parent.info.status == "KILLED"

    out = run_sweep(tmp_path, *overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _complete_trials(storage) == 4
    again, children = parent_and_children(tmp_path)
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 4 and len({c.data.tags["sweep_trial"] for c in children}) == len(children)
    for child in finished:
        assert 0.003 <= float(child.data.params["scheduler.lr"]) <= 0.3
        assert 0.0 <= float(child.data.params["loss.label_smoothing"]) <= 0.2
    assert len({c.data.params["scheduler.lr"] for c in finished}) == 4, "a continued study samples new points"
    assert_best_recorded(again, children, ["scheduler.lr", "optimizer.weight_decay", "loss.label_smoothing"])
    assert not [k for k in again.data.tags if k.startswith("best.")], "the interrupted run's best-so-far tags are gone"
    study = optuna.load_study(study_name="digits_resnext_test_tpe", storage=f"sqlite:///{storage}")
    assert study.best_value == pytest.approx(again.data.metrics["best_val_top1"])
