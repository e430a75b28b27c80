"""``task=compare`` on runs written straight into an isolated MLflow store: selection, table, files, errors."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from framework.config import ConfigError
from framework.tasks import execute
from framework.tasks.compare import compare
from tests.conftest import all_runs, empty_mlflow_db, mlflow_client

T0 = 1_700_000_000_000  # run start times (ms): later in RUNS = newer
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMMON = {"seed": "42", "optimizer.name": "momentum"}  # the same in every run: never a column

RESNEXT = {"model.name": "resnext50_32x4d", "engine.epochs": "3"}
# name: (params, val_top1 per epoch, val_loss per epoch); "no_metrics" stays RUNNING with no history
RUNS = {
    "lr05": ({**RESNEXT, "scheduler.lr": "0.05"}, [0.5, 0.82, 0.78], [1.1, 0.45, 0.6]),
    "lr02": ({**RESNEXT, "scheduler.lr": "0.02"}, [0.4, 0.7, 0.9], [1.3, 0.8, 0.5]),
    "effnet": ({"model.name": "efficientnet_b2", "engine.epochs": "2"}, [0.3, 0.6], [1.5, 0.9]),
    "no_metrics": ({**RESNEXT, "scheduler.lr": "0.1"}, [], []),
}
DIFFERING = ["engine.epochs", "model.name", "scheduler.lr"]
TOP5_OF_LR05 = [0.9, 0.99, 0.98]
CHILDREN = {
    "trial0": ({"scheduler.lr": "0.01"}, [0.2, 0.3], [2.0, 1.8]),
    "trial1": ({"scheduler.lr": "0.03"}, [0.4], [1.2]),
}


def log_run(
    client: MlflowClient,
    experiment_id: str,
    name: str,
    start: int,
    params: dict[str, str],
    top1: Sequence[float],
    loss: Sequence[float],
    top5: Sequence[float] = (),
    tags: dict[str, str] | None = None,
) -> str:
    """A run as training logs it: flattened-config params, per-epoch metrics at step = epoch."""
    tags = tags or {"task": "train"}
    run_id = client.create_run(experiment_id, start_time=T0 + start, run_name=name, tags=tags).info.run_id
    metrics = [
        Metric(key, value, T0 + start + epoch, epoch)
        for key, history in (("val_top1", top1), ("val_loss", loss), ("val_top5", top5))
        for epoch, value in enumerate(history, 1)
    ]
    all_params = {**COMMON, **params, "paths.run_dir": f"/runs/{name}", "tracking.run_name": name}
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in all_params.items()])
    if top1:
        client.set_terminated(run_id)
    return run_id


@pytest.fixture
def store(tmp_path: Path) -> dict[str, str]:
    """The store make_config points at: train runs, an eval run, a sweep (parent + children), an empty experiment.

    Returns run ids by name.
    """
    (tmp_path / "mlflow").mkdir()
    shutil.copy(empty_mlflow_db(), tmp_path / "mlflow" / "mlflow.db")
    client = mlflow_client(tmp_path)
    experiment = {
        name: client.create_experiment(name, artifact_location=(tmp_path / "mlflow" / "artifacts" / name).as_uri())
        for name in ("classification", "sweep", "empty")
    }
    ids = {
        name: log_run(client, experiment["classification"], name, i, *spec, TOP5_OF_LR05 if name == "lr05" else ())
        for i, (name, spec) in enumerate(RUNS.items())
    }
    eval_run = ("eval", 10, RUNS["lr05"][0], [0.99], [0.01])
    ids["eval"] = log_run(client, experiment["classification"], *eval_run, tags={"task": "eval"})
    log_run(client, experiment["empty"], *eval_run, tags={"task": "eval"})
    ids["parent"] = log_run(client, experiment["sweep"], "parent", 20, {}, [0.4], [1.2], tags={"task": "sweep"})
    for i, (name, spec) in enumerate(CHILDREN.items()):
        ids[name] = log_run(
            client,
            experiment["sweep"],
            name,
            21 + i,
            *spec,
            tags={"task": "train", "mlflow.parentRunId": ids["parent"]},
        )
    ids["loner"] = log_run(client, experiment["sweep"], "loner", 30, {"scheduler.lr": "0.5"}, [0.1], [2.3])
    return ids


def expected_order(specs: dict, index: int, mode: str) -> list[str]:
    """Run names by best value of history ``index`` (1: val_top1, 2: val_loss), best first, no history last."""
    pick = max if mode == "max" else min
    scored = {name: pick(spec[index]) if spec[index] else None for name, spec in specs.items()}
    ranked = sorted((name for name in scored if scored[name] is not None), key=scored.get, reverse=mode == "max")
    return ranked + [name for name in scored if scored[name] is None]


def compare_runs(tmp_path: Path) -> list:
    return [run for run in all_runs(mlflow_client(tmp_path)) if run.data.tags.get("task") == "compare"]


def test_experiment_train_runs_best_first(store, make_config, capsys):
    rows = compare(make_config("task=compare"))
    assert [row["run_name"] for row in rows] == expected_order(RUNS, 1, "max")  # the eval run is not a train run
    metrics = ["val_top1", "val_top5", "val_loss", "best_val_top1", "epochs"]
    assert list(rows[0]) == ["run_name", "run_id", "status", *DIFFERING, *metrics]
    for row in rows:
        params, top1, loss = RUNS[row["run_name"]]
        assert row["run_id"] == store[row["run_name"]]
        assert row["status"] == ("FINISHED" if top1 else "RUNNING")
        assert {k: row[k] for k in DIFFERING} == {k: params.get(k, "-") for k in DIFFERING}
        assert row["val_top1"] == (pytest.approx(top1[-1]) if top1 else None)
        assert row["val_loss"] == (pytest.approx(loss[-1]) if loss else None)
        assert row["best_val_top1"] == (pytest.approx(max(top1)) if top1 else None)
        assert row["epochs"] == len(top1)
    assert [row["val_top5"] for row in rows if row["val_top5"] is not None] == [pytest.approx(TOP5_OF_LR05[-1])]
    out = capsys.readouterr().out
    assert "train runs (tag task=train) in experiment 'classification'" in out
    assert all(store[name][:8] in out for name in RUNS) and store["eval"][:8] not in out


def test_mode_min_on_another_metric(store, make_config, tmp_path):
    rows = compare(make_config("task=compare", "compare.metric=val_loss", "compare.mode=min"))
    assert [row["run_name"] for row in rows] == expected_order(RUNS, 2, "min")
    for row in rows:
        loss = RUNS[row["run_name"]][2]
        assert row["best_val_loss"] == (pytest.approx(min(loss)) if loss else None)
        assert row["epochs"] == len(loss)
    assert (tmp_path / "run" / "val_loss_per_epoch.png").is_file()


def test_parent_selects_exactly_its_children(store, make_config):
    rows = compare(make_config("task=compare", f"compare.parent={store['parent']}"))
    assert [row["run_name"] for row in rows] == expected_order(CHILDREN, 1, "max")
    assert {row["run_id"] for row in rows} == {store["trial0"], store["trial1"]}
    assert [row["scheduler.lr"] for row in rows] == [CHILDREN[row["run_name"]][0]["scheduler.lr"] for row in rows]


def test_explicit_runs_show_only_their_differences(store, make_config):
    rows = compare(make_config("task=compare", f"compare.runs=[{store['lr05']},{store['lr02']},{store['lr05']}]"))
    assert [row["run_name"] for row in rows] == ["lr02", "lr05"]  # best val_top1 0.9 before 0.82, duplicate id once
    assert "scheduler.lr" in rows[0] and not {"model.name", "engine.epochs", "seed"} & set(rows[0])


def test_max_runs_keeps_the_newest(store, make_config):
    rows = compare(make_config("task=compare", "compare.max_runs=2"))
    assert {row["run_name"] for row in rows} == set(list(RUNS)[-2:])


def test_files_written_and_logged_to_a_compare_run(store, make_config, tmp_path, capsys):
    rows = compare(make_config("task=compare"))
    with (tmp_path / "run" / "comparison.csv").open(newline="") as file:
        reader = csv.DictReader(file)
        table = list(reader)
    assert reader.fieldnames == list(rows[0])
    assert [line["run_id"] for line in table] == [row["run_id"] for row in rows]
    assert float(table[0]["best_val_top1"]) == pytest.approx(rows[0]["best_val_top1"])
    png = (tmp_path / "run" / "val_top1_per_epoch.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1024

    (run,) = compare_runs(tmp_path)
    assert run.data.tags["compared_runs"] == ",".join(row["run_id"][:8] for row in rows)
    # out of the training experiment, whose charts would list it without the metrics they plot
    assert mlflow_client(tmp_path).get_experiment(run.info.experiment_id).name == "classification-comparisons"
    assert run.info.run_name == f"compare {len(rows)} runs by val_top1"
    artifacts = {a.path for a in mlflow_client(tmp_path).list_artifacts(run.info.run_id, "comparison")}
    assert artifacts == {"comparison/comparison.csv", "comparison/val_top1_per_epoch.png"}
    printed = capsys.readouterr().out.replace("\n", "")
    assert f"runs:/{run.info.run_id}/comparison/comparison.csv" in printed
    compared = unquote(printed.split("/#/compare-runs?runs=")[1].split("&")[0])  # MLflow's comparison page
    assert json.loads(compared) == sorted(row["run_id"] for row in rows)

    again = compare(make_config("task=compare"))  # the compare run is not a train run: never compared itself
    assert [row["run_id"] for row in again] == [row["run_id"] for row in rows]


UNKNOWN_ID = "feedface" * 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            f"compare.runs=[{{lr05}},{UNKNOWN_ID}]",
            rf"compare.runs: no run '{UNKNOWN_ID}' in the MLflow store sqlite:///",
        ),
        (f"compare.parent={UNKNOWN_ID}", rf"compare.parent: no run '{UNKNOWN_ID}'.*mlflow ui --backend-store-uri"),
        ("compare.experiment=nope", r"compare.experiment=nope: no such experiment .*: Default, classification, empty,"),
        (
            "compare.experiment=empty",
            r"no train runs \(tag task=train\) in experiment 'empty' in sqlite:///.*mlflow ui",
        ),
        ("compare.parent={lr05}", r"no child runs \(tag mlflow.parentRunId\) of compare.parent=\w+ in sqlite:///"),
        ("compare.mode=best", r"compare.mode=best: must be one of max, min"),
        ("compare.max_runs=0", r"compare.max_runs must be >= 1, got 0"),
    ],
)
def test_bad_selection_fails_before_logging(store, make_config, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        execute(make_config("task=compare", override.format(**store)))  # checked, then compared
    assert compare_runs(tmp_path) == [] and not (tmp_path / "run" / "comparison.csv").exists()
