"""MLflow tracking (``tracking/`` configs): one run per job, params, metrics, artifacts and final status.

With neither ``tracking.uri`` nor ``MLFLOW_TRACKING_URI`` set, runs go to a local SQLite store
(the backend MLflow 3.x recommends) under the project's ``outputs/mlflow``, with artifacts beside it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

_PARAM_BATCH = 100  # MLflow accepts at most 100 params per log_batch call
_METRIC_BATCH = 1000  # and at most 1000 metrics
_PARAM_VALUE_LIMIT = 6000
PARENT_RUN_ENV = "FRAMEWORK_SWEEP_PARENT_RUN_ID"  # set while a sweep runs: new runs become its children
TRIAL_ENV = "FRAMEWORK_SWEEP_TRIAL"  # the Hydra job number of the trial being run

logging.getLogger("alembic").setLevel(logging.WARNING)


class MlflowTracker:
    """Opens MLflow runs in ``experiment_name`` on the chosen tracking store."""

    def __init__(self, experiment_name: str, local_store: str, uri: str | None = None, run_name: str | None = None):
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.local_store = Path(local_store).resolve()
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.local_store / 'mlflow.db'}"
        self.is_local = self.uri == f"sqlite:///{self.local_store / 'mlflow.db'}"

    def client(self) -> MlflowClient:
        if self.is_local:
            self.local_store.mkdir(parents=True, exist_ok=True)
        return MlflowClient(tracking_uri=self.uri)

    def ui_command(self) -> str:
        """Shell command that opens the MLflow UI on this store (or the server's address)."""
        if self.uri.startswith(("http://", "https://")):
            return f"open {self.uri} in a browser"
        return f"mlflow ui --backend-store-uri {self.uri} --port 5000   # then open http://127.0.0.1:5000"

    def _experiment_id(self, client: MlflowClient) -> str:
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        location = (self.local_store / "artifacts" / self.experiment_name).as_uri() if self.is_local else None
        try:
            return client.create_experiment(self.experiment_name, artifact_location=location)
        except MlflowException:  # created concurrently by another process
            return client.get_experiment_by_name(self.experiment_name).experiment_id

    def open_run(self, tags: Mapping[str, str], run_id: str | None = None, run_name: str | None = None) -> MlflowRun:
        """Create a RUNNING run (or reopen ``run_id``). Inside a sweep (``PARENT_RUN_ENV`` set by
        ``framework.tracking.sweep``) a new run is the sweep parent's child and records its trial number."""
        client = self.client()
        if run_id is None:
            tags = dict(tags)
            run_name = run_name or self.run_name
            if os.environ.get(PARENT_RUN_ENV):
                tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
                tags["sweep_trial"] = os.environ.get(TRIAL_ENV, "")
                run_name = f"{run_name}-trial{tags['sweep_trial']}"
            info = client.create_run(self._experiment_id(client), run_name=run_name, tags=tags).info
        else:
            try:
                info = client.get_run(run_id).info
            except MlflowException as err:
                raise ValueError(f"cannot continue MLflow run {run_id} at {self.uri}: {err.message}") from err
            client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return MlflowRun(client, info.run_id, info.run_name)

    @contextmanager
    def start_run(
        self, tags: Mapping[str, str], run_id: str | None = None, run_name: str | None = None
    ) -> Iterator[MlflowRun]:
        """``open_run`` for the block; the run ends FINISHED, FAILED on an exception, KILLED on Ctrl-C."""
        run = self.open_run(tags, run_id, run_name)
        client = run.client
        status = RunStatus.FINISHED
        try:
            yield run
        except KeyboardInterrupt:
            status = RunStatus.KILLED
            raise
        except BaseException:
            status = RunStatus.FAILED
            raise
        finally:
            run.flush()
            client.set_terminated(run.run_id, RunStatus.to_string(status))


class MlflowRun:
    """Logging into one MLflow run; metrics are buffered and sent in batches by ``flush``."""

    def __init__(self, client: MlflowClient, run_id: str, run_name: str):
        self.client, self.run_id, self.run_name = client, run_id, run_name
        self._metrics: list[Metric] = []

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:_PARAM_VALUE_LIMIT]) for k, v in params.items()]
        for i in range(0, len(items), _PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAM_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        self._metrics.extend(Metric(k, float(v), timestamp, step) for k, v in metrics.items())

    def flush(self) -> None:
        while self._metrics:
            batch, self._metrics = self._metrics[:_METRIC_BATCH], self._metrics[_METRIC_BATCH:]
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure as an image artifact."""
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)
