"""A saved view of an experiment's runs for MLflow's UI: the runs table with the metrics and hyper-parameters
people compare as columns, and train/val curves of every run over epochs (the UI's default shows no metric
column, cuts run names, plots each metric alone and charts the first 10 runs only; it keeps a person's own
layout per browser, not per experiment).

MLflow 3.17's UI reads saved views from experiment tags ``mlflow.sharedViewState.<key>`` (listed under
"Views" on the runs page, opened by ``#/experiments/<id>/runs?viewStateShareKey=<key>``): a JSON envelope
whose ``state`` is the page's state, zlib-deflated and base64-encoded behind ``deflate;`` (the UI's own
format, mlflow/server/js/src/experiment-tracking/utils/savedViewEnvelope.ts).
"""

from __future__ import annotations

import base64
import json
import time
import zlib

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
TRAINING_VIEW_KEY = "training-runs"
_PARAMS = ("choice.model", "scheduler.lr", "dataset.batch_size")
_CURVES = {"loss": ["train_loss", "val_loss"], "accuracy": ["val_top1", "val_top5"], "lr": ["lr"]}


def training_view(monitor: str) -> str:
    """The tag value of the view "training runs": a wide run-name column, then columns for the best and last
    ``monitor``, the losses, the epoch reached and the usual hyper-parameters, newest run first; charts of
    train and val loss together and of accuracy and lr, all over the ``epoch`` metric, for every run."""
    metrics = dict.fromkeys([f"best_{monitor}", monitor, "val_loss", "train_loss", "epoch"])
    columns = [*(f"metrics.`{name}`" for name in metrics), *(f"params.`{name}`" for name in _PARAMS)]
    first = ["attributes.`Run Name`", "attributes.`Created`", "attributes.`Duration`", "attributes.`Models`"]
    state = {
        "searchFilter": "",
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": ["attributes.`Models`", *columns],
        "columnOrder": [*first, *columns],  # (the UI applies columnWidths only with an order)
        "columnWidths": {"attributes.`Run Name`": 480},
        "runsHiddenMode": "SHOW_ALL",
        "compareRunSections": [
            {"uuid": "curves", "name": "Training curves by epoch", "display": True, "isReordered": False}
        ],
        "compareRunCharts": [_curve(name, keys) for name, keys in _CURVES.items()],
    }
    packed = "deflate;" + base64.b64encode(zlib.compress(json.dumps(state).encode())).decode()
    now = int(time.time() * 1000)
    return json.dumps({"name": "training runs", "createdAt": now, "updatedAt": now, "state": packed})


def _curve(name: str, metrics: list[str]) -> dict:
    """A line chart of ``metrics`` on one y axis over the ``epoch`` metric (train and val curves overlay)."""
    return {
        "type": "LINE",
        "uuid": f"curves-{name}",
        "metricSectionId": "curves",
        "deleted": False,
        "isGenerated": False,
        "metricKey": metrics[0],
        "selectedMetricKeys": metrics,
        "xAxisKey": "metric",
        "selectedXAxisMetricKey": "epoch",
        "scaleType": "linear",
        "xAxisScaleType": "linear",
        "lineSmoothness": 0,
        "runsCountToCompare": 10,
        "range": {"xMin": None, "xMax": None, "yMin": None, "yMax": None},
    }
