"""What a run looks like in MLflow's UI: names that tell siblings apart, a description, the source, and params
that compare cleanly."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

from framework.config import build
from framework.tasks.common import console, print_summary, run_params, run_tags
from framework.tracking.naming import SWEPT_ENV, run_name, sweep_name
from tests.conftest import all_runs, compose_config, mlflow_client


def test_run_name_is_the_model_and_the_changed_settings(tmp_path):
    overrides = ["experiment=digits_nfnet_f0", "scheduler.lr=0.0123456789", "dataset.batch_size=64", "optimizer=adamw"]
    cfg = compose_config(overrides, tmp_path)
    # the model first (its experiment chose it); overrides shortened: a key's last part (batch_size: batch),
    # numbers to 4 significant digits
    assert run_name(cfg) == "nfnet_f0 lr=0.01235 batch=64 optimizer=adamw"
    assert run_name(cfg, "eval") == "eval nfnet_f0 lr=0.01235 batch=64 optimizer=adamw"
    assert run_name(compose_config(["tracking.run_name=mine"], tmp_path)) == "mine"


def test_the_console_prints_text_with_brackets_as_it_is(capsys):
    """A list override in a run's name and a file name with brackets reach the terminal whole: rich took
    ``[train_step,timm]`` for markup and dropped it, and stopped on ``[/b]`` (MarkupError)."""
    print_summary("benchmark", {"mlflow run": "benchmark nfnet_f0 measure=[train_step,timm] rounds=1 (abc)"})
    console.print("skipped unreadable image a[/b].jpg", style="yellow")
    out = capsys.readouterr().out
    assert "mlflow run  benchmark nfnet_f0 measure=[train_step,timm] rounds=1 (abc)" in out
    assert "skipped unreadable image a[/b].jpg" in out


def test_a_trial_is_named_by_what_its_sweep_varies(tmp_path, monkeypatch):
    overrides = ["model=resnext_test", "engine.epochs=2", "scheduler.lr=0.05", "dataset.batch_size=32"]
    cfg = compose_config(overrides, tmp_path)
    monkeypatch.setenv(SWEPT_ENV, "scheduler.lr,dataset.batch_size")
    assert run_name(cfg) == "resnext_test lr=0.05 batch=32"  # epochs=2, shared by all trials, is in the parent's
    swept = ["scheduler.lr", "dataset.batch_size"]
    assert sweep_name("resnext_test", [*overrides[:2], "scheduler.lr=0.1,0.05", "dataset.batch_size=16,32"], swept) == (
        "sweep over lr, batch: resnext_test epochs=2"
    )


def test_names_stay_unique_in_an_experiment(tmp_path):
    tracker = build(compose_config([], tmp_path), "tracking")
    names = []
    for _ in range(3):
        with tracker.start_run({}, run_name="resnext50_32x4d lr=0.1") as run:
            names.append(run.run_name)
    assert names == ["resnext50_32x4d lr=0.1", "resnext50_32x4d lr=0.1 (2)", "resnext50_32x4d lr=0.1 (3)"]
    assert sorted(r.info.run_name for r in all_runs(mlflow_client(tmp_path))) == sorted(names)


def test_tags_name_the_source_user_and_command(tmp_path):
    cfg = compose_config(["model=resnext_test", "engine.epochs=3"], tmp_path)
    tags = run_tags(cfg, "train")
    assert tags["mlflow.source.name"] == "run.py" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] and len(tags["mlflow.source.git.commit"]) == 40
    description = tags["mlflow.note.content"]
    assert description.startswith("`python run.py ") and "engine.epochs=3" in description


def test_params_are_hyper_parameters_only(tmp_path):
    cfg = compose_config(["dataset=folder", f"dataset.path={tmp_path}"], tmp_path)
    params = run_params(cfg, {"dataset.num_classes": 7})
    assert params["choice.dataset"] == "folder" and params["choice.model"] == "resnext50"
    assert params["dataset.num_classes"] == 7 and params["dataset.path"] == str(tmp_path)  # the data, not the run
    assert not [k for k, v in params.items() if k.endswith("._target_") or v is None]
    assert not [k for k in params if k.split(".")[0] in ("paths", "tracking", "task", "run_dir", "ckpt", "resume")]
    assert "dataset.bad_image_log" not in params  # a file in the run's folder


def test_the_experiment_gets_a_view_with_metric_columns_that_charts_every_run(tmp_path):
    tracker = build(compose_config([], tmp_path), "tracking")
    with tracker.start_run({}, run_name="a") as run:
        pass
    url = tracker.runs_view_url(run.run_id, "val_top1")
    client = mlflow_client(tmp_path)
    experiment_id = client.get_run(run.run_id).info.experiment_id
    assert url == f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?viewStateShareKey=training-runs"
    envelope = json.loads(client.get_experiment(experiment_id).tags["mlflow.sharedViewState.training-runs"])
    assert envelope["name"] == "training runs" and envelope["state"].startswith("deflate;")
    state = json.loads(zlib.decompress(base64.b64decode(envelope["state"][len("deflate;") :])))  # as the UI reads it
    assert {"metrics.`val_top1`", "metrics.`best_val_top1`", "params.`scheduler.lr`"} <= set(state["selectedColumns"])
    assert state["runsHiddenMode"] == "SHOW_ALL"
    # a view a person changed in the UI is theirs: the next run leaves it
    client.set_experiment_tag(experiment_id, "mlflow.sharedViewState.training-runs", "edited")
    tracker.runs_view_url(run.run_id, "val_loss")
    assert client.get_experiment(experiment_id).tags["mlflow.sharedViewState.training-runs"] == "edited"


# Each worker waits for a go-file, then logs one new dataset per round into a run of the shared experiment.
_DATASET_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from framework.tracking.mlflow_run import MlflowTracker

    store, worker, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    tracker = MlflowTracker(experiment_name="Default", local_store=str(store), system_metrics=False)
    for r in range(rounds):
        while not (store / f"go-{r}").exists():
            time.sleep(0.005)
        with tracker.start_run({}, run_name=f"w{worker} r{r}") as run:
            run.log_dataset("digits/train", f"digest-{r}", "sklearn", "training", {"images": 10})
            (store / f"ready-{r}-{worker}").touch()
    """
)


def test_runs_logging_the_same_new_dataset_at_once_all_finish(tmp_path):
    """Parallel sweep trials log the same new dataset: MLflow's look-up-then-insert races (one trial failed)."""
    store = compose_config([], tmp_path).tracking.local_store  # the store, with its tables made
    workers, rounds = 4, 8
    procs = [
        subprocess.Popen([sys.executable, "-c", _DATASET_WORKER, store, str(w), str(rounds)], stderr=subprocess.PIPE)
        for w in range(workers)
    ]
    time.sleep(5)  # imports done
    for r in range(rounds):
        (Path(store) / f"go-{r}").touch()
        while len(list(Path(store).glob(f"ready-{r}-*"))) < workers and all(p.poll() is None for p in procs):
            time.sleep(0.01)
    errors = [p.communicate(timeout=120)[1].decode()[-2000:] for p in procs]
    assert [p.returncode for p in procs] == [0] * workers, errors
    runs = all_runs(mlflow_client(tmp_path))
    assert len(runs) == workers * rounds
    assert all(
        [i.dataset.digest for i in run.inputs.dataset_inputs] == [f"digest-{run.info.run_name[-1]}"] for run in runs
    )
