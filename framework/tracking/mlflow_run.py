"""MLflow tracking (``tracking/`` configs): one run per job, params, metrics, artifacts and final status.

Every record goes through a ``Spool``; a training job keeps its spool in ``<run dir>/tracking/``, so a
tracking server that is down at the start or goes away mid-run never stops training: the records are sent
when it answers again (at the next checkpoint, at the end, or with ``python run.py task=sync run_dir=...``).

With neither ``tracking.uri`` nor ``MLFLOW_TRACKING_URI`` set, runs go to a local SQLite store
(the backend MLflow 3.x recommends) under the project's ``outputs/mlflow``, with artifacts beside it.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
    RunStatus,
)
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS
from requests.exceptions import RequestException

from framework.config import ConfigError
from framework.paths import unwritable
from framework.runtime.environment import environment
from framework.runtime.signals import interrupt_behind
from framework.tracking.spool import Spool, record_micro_step
from framework.tracking.views import TRAINING_VIEW_KEY, VIEW_TAG_PREFIX, training_view

_PARAM_BATCH = 100  # MLflow accepts at most 100 params per log_batch call
_METRIC_BATCH = 1000  # and at most 1000 metrics
_PARAM_VALUE_LIMIT = 6000
PARENT_RUN_ENV = "FRAMEWORK_SWEEP_PARENT_RUN_ID"  # set while a sweep runs: new runs become its children
TRIAL_ENV = "FRAMEWORK_SWEEP_TRIAL"  # the Hydra job number of the trial being run

logging.getLogger("alembic").setLevel(logging.WARNING)
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start and stop notes


class MlflowTracker:
    """Opens MLflow runs in ``experiment_name`` on the chosen tracking store."""

    def __init__(
        self,
        experiment_name: str,
        local_store: str,
        uri: str | None = None,
        run_name: str | None = None,
        register_model: str | None = None,
        system_metrics: bool = True,
    ):
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.register_model, self.system_metrics = register_model, system_metrics
        self.local_store = Path(local_store).resolve()
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.local_store / 'mlflow.db'}"
        self.is_local = self.uri == f"sqlite:///{self.local_store / 'mlflow.db'}"

    def client(self) -> MlflowClient:
        if self.is_local:
            self.local_store.mkdir(parents=True, exist_ok=True)
        return MlflowClient(tracking_uri=self.uri)

    def check_writable(self) -> None:
        """Refuse a local (SQLite) store that cannot be written, before any run exists: SQLite needs the file and
        its folder (for its journal)."""
        if not self.uri.startswith("sqlite:///"):
            return
        database = Path(self.uri[len("sqlite:///") :])
        blocked = unwritable(database.parent)
        if blocked is None and database.exists() and not os.access(database, os.W_OK):
            blocked = database
        if blocked is not None:
            raise ConfigError(
                f"the MLflow store {database} cannot be written ({blocked} is read-only for this user). Fix: make "
                "it writable, or log elsewhere: tracking.local_store=<a writable folder> or tracking.uri=<server>"
            )

    def ui_command(self) -> str:
        """Shell command that opens the MLflow UI on this store (or the server's address)."""
        if self.uri.startswith(("http://", "https://")):
            return f"open {self.uri} in a browser"
        return f"mlflow ui --backend-store-uri {self.uri} --port 5000   # then open http://127.0.0.1:5000"

    def model_location(self, uri: str) -> str:
        """Where the files of ``models:/<name>/<version>``, ``models:/<name>@<alias>`` or ``models:/<model id>``
        are on this tracking store (MLflow itself resolves ``models:/`` against its default registry)."""
        client, ref = self.client(), uri[len("models:/") :].strip("/")
        if "/" in ref:
            return client.get_model_version_download_uri(*ref.split("/", 1))
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_download_uri(name, client.get_model_version_by_alias(name, alias).version)
        return client.get_logged_model(ref).artifact_location

    def run_url(self, run_id: str | None) -> str | None:
        """The run's page in the MLflow UI that ``ui_command`` opens; None while the run does not exist there."""
        if run_id is None:
            return None
        try:
            with _fail_fast():  # a summary does not wait minutes for a server that went away
                experiment_id = self.client().get_run(run_id).info.experiment_id
        except (MlflowException, RequestException, OSError):
            return None
        return f"{self._ui_base()}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"

    def runs_view_url(self, run_id: str | None, monitor: str) -> str | None:
        """The runs page of ``run_id``'s experiment in the view "training runs" (``views.training_view``), which
        is added to the experiment first if it has none (a view a person edited stays as it is)."""
        if run_id is None:
            return None
        key = VIEW_TAG_PREFIX + TRAINING_VIEW_KEY
        try:
            with _fail_fast():
                client = self.client()
                experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
                if key not in experiment.tags:
                    client.set_experiment_tag(experiment.experiment_id, key, training_view(monitor))
        except (MlflowException, RequestException, OSError):
            return None
        return f"{self._ui_base()}/#/experiments/{experiment.experiment_id}/runs?viewStateShareKey={TRAINING_VIEW_KEY}"

    def compare_url(self, run_ids: Sequence[str], experiment_ids: Sequence[str]) -> str:
        """MLflow's own comparison page of ``run_ids`` (parallel coordinates, scatter, params side by side)."""
        runs, experiments = (
            quote(json.dumps(sorted(set(ids)), separators=(",", ":"))) for ids in (run_ids, experiment_ids)
        )
        return f"{self._ui_base()}/#/compare-runs?runs={runs}&experiments={experiments}"

    def _ui_base(self) -> str:
        """Where the MLflow UI of this store is: the server, or ``ui_command``'s local address."""
        return (self.uri if self.uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000").rstrip("/")

    def experiment_id(self, client: MlflowClient, name: str | None = None) -> str:
        """Id of the experiment ``name`` (default ``experiment_name``), created if it does not exist."""
        name = name or self.experiment_name
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = (self.local_store / "artifacts" / name).as_uri() if self.is_local else None
        # the kind MLflow's UI asks new experiments for: model training, not GenAI (3.17 lands on the runs table
        # only with ?workflowType=machine_learning, which run_url adds)
        tags = {"mlflow.experimentKind": "custom_model_development"}
        try:
            return client.create_experiment(name, artifact_location=location, tags=tags)
        except MlflowException:  # created concurrently by another process
            return client.get_experiment_by_name(name).experiment_id

    def open_run(
        self,
        tags: Mapping[str, str],
        run_id: str | None = None,
        run_name: str | None = None,
        spool_dir: Path | None = None,
        resume_micro_step: int | None = None,
    ) -> MlflowRun:
        """Create a RUNNING run (or reopen ``run_id``). Inside a sweep (``PARENT_RUN_ENV`` set by
        ``framework.tracking.sweep``) a new run is the sweep parent's child and records its trial number.

        With ``spool_dir`` (training) the records wait there until the server takes them, and an unreachable
        server does not stop the job (the run is created when it answers). A job continued in the same folder
        (``resume_micro_step``: the training micro-step it restarts from) continues the spool's run; metrics logged
        after that step by the earlier process are dropped, as the job logs them again.
        """
        spool = Spool(spool_dir)
        if spool.exists:
            known = spool.state.get("run_id")
            if resume_micro_step is not None and run_id in (None, known):
                spool.discard_metrics_after(resume_micro_step)
                spool.append({"kind": "status", "status": RunStatus.to_string(RunStatus.RUNNING)})
                run = MlflowRun(self, spool, checkpoint_micro_step=resume_micro_step, verify=True)
                run.flush()
                return run
            if spool.pending():
                raise ConfigError(
                    f"{spool_dir} holds tracking records of an earlier job (MLflow run {known or 'not created yet'}) "
                    f"that did not reach {spool.state.get('uri')}. Deliver them (python run.py task=sync "
                    f"run_dir={spool_dir.parent}), continue that job (resume=auto), or choose another hydra.run.dir"
                )
            spool = Spool.fresh(spool_dir)
        spool.set_state(uri=self.uri, experiment=self.experiment_name)
        if run_id is None:
            tags = dict(tags)
            run_name = run_name or self.run_name
            if os.environ.get(PARENT_RUN_ENV):
                tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
                tags["sweep_trial"] = os.environ.get(TRIAL_ENV, "")
                run_name = f"#{tags['sweep_trial']} {run_name}"
            spool.set_state(spool_id=uuid.uuid4().hex, run_name=run_name)
            spool.append({"kind": "create", "run_name": run_name, "tags": tags})
        else:
            spool.set_state(run_id=run_id)
            spool.append({"kind": "status", "status": RunStatus.to_string(RunStatus.RUNNING)})
        run = MlflowRun(self, spool, checkpoint_micro_step=resume_micro_step)
        run.flush()
        return run

    def deliver_kept(self, spool_dir: Path, micro_step: int, drop_later: bool = False) -> None:
        """Send what a stopped job left in ``spool_dir`` up to training ``micro_step`` (its newest checkpoint);
        ``drop_later`` drops its metrics after that micro-step, which the job resumed now logs again."""
        spool = Spool(spool_dir)
        if not (spool.exists and spool.pending()):
            return
        if drop_later:
            spool.discard_metrics_after(micro_step)
        MlflowRun(self, spool, checkpoint_micro_step=micro_step, verify=True).flush()

    @contextmanager
    def start_run(
        self,
        tags: Mapping[str, str],
        run_id: str | None = None,
        run_name: str | None = None,
        spool_dir: Path | None = None,
        resume_micro_step: int | None = None,
    ) -> Iterator[MlflowRun]:
        """``open_run`` for the block; the run ends FINISHED, FAILED on an exception, KILLED on Ctrl-C."""
        run = self.open_run(tags, run_id, run_name, spool_dir, resume_micro_step)
        status = RunStatus.FINISHED
        try:
            yield run
        except BaseException as err:
            status = RunStatus.FAILED if interrupt_behind(err) is None else RunStatus.KILLED
            raise
        finally:
            run.end(status)


class MlflowRun:
    """Logging into one MLflow run through a ``Spool``: records are sent in order, in batches, by ``flush``.

    ``checkpoint_micro_step`` (told by ``checkpointed``) is the training micro-step of the newest checkpoint:
    metrics logged after it wait for the next one, so a job resumed from that checkpoint neither loses nor
    repeats a step.
    """

    def __init__(
        self, tracker: MlflowTracker, spool: Spool, checkpoint_micro_step: int | None = None, verify: bool = False
    ):
        self.tracker, self.spool, self.checkpoint_micro_step = tracker, spool, checkpoint_micro_step
        uri = spool.state.get("uri", tracker.uri)  # a kept spool names the server its run lives on
        self.client = tracker.client() if uri == tracker.uri else MlflowClient(uri)
        self._verify = verify  # an earlier attempt may have reached the server: check before re-sending
        self._continued = verify  # a run an earlier process logged into: its params may be there already
        self._unreachable_since: float | None = None

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None while the server has not been reached to create the run."""
        return self.spool.state.get("run_id")

    @property
    def run_name(self) -> str:
        return str(self.spool.state.get("run_name", ""))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.spool.append({"kind": "params", "items": {k: str(v)[:_PARAM_VALUE_LIMIT] for k, v in params.items()}})

    def log_metrics(self, metrics: Mapping[str, float], step: int, micro_step: int | None = None) -> None:
        """Metrics at MLflow ``step``; ``micro_step`` is the training micro-step that produced them (default
        ``step``: per-epoch metrics are plotted by epoch but belong to the epoch's last micro-step)."""
        timestamp = int(time.time() * 1000)
        items = [[k, float(v), timestamp, step] for k, v in metrics.items()]
        self.spool.append({"kind": "metrics", "micro_step": step if micro_step is None else micro_step, "items": items})

    @contextmanager
    def system_metrics(self, interval: float = 10.0) -> Iterator[None]:
        """MLflow's sampler of CPU, memory, disk, network (and GPU) into the run as ``system/*`` metrics while the
        block runs, every ``interval`` s (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides it). It logs
        directly, not through the spool, so only while the run exists on its server; its stop waits at most 10 s
        (MLflow's client retries an unreachable server for minutes)."""
        if self.run_id is None:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            self.run_id, interval, resume_logging=self._continued, tracking_uri=self.client.tracking_uri
        )
        monitor.start()
        try:
            yield
        finally:
            stopping = threading.Thread(target=monitor.finish, daemon=True)
            stopping.start()
            stopping.join(timeout=10)

    def checkpointed(self, micro_step: int) -> None:
        """A checkpoint of ``micro_step`` is on disk: what was logged up to it is sent now (and later records
        wait for the next one, so a job resumed from the newest checkpoint logs each step once)."""
        self.checkpoint_micro_step = micro_step
        self.flush()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.spool.append({"kind": "tags", "items": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.spool.append({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        self.spool.append({"kind": "text", "text": text, "artifact_file": artifact_file})

    def log_dataset(self, name: str, digest: str, source: str, context: str, profile: Mapping[str, Any]) -> None:
        """A dataset input of the run (the run page's Datasets): ``name``, content ``digest``, where its images
        come from, its role (``train``, ``validation``) and ``profile`` (counts, class map)."""
        record = {"name": name, "digest": digest, "source": source, "context": context, "profile": dict(profile)}
        self.spool.append({"kind": "dataset", **record})

    def log_model(self, path: Path, step: int, register: str | None = None, description: str = "") -> None:
        """The MLflow model saved in the folder ``path`` as the run's logged model ``model`` (MLflow 3's
        LoggedModel: in the run's Models, loadable as ``runs:/<run_id>/model``), at training ``step``;
        ``register``: also a new version of that registered model, described by ``description``."""
        record = {"path": str(Path(path).resolve()), "step": step, "register": register, "description": description}
        self.spool.append({"kind": "model", **record})

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure as an image artifact (saved as a file first when the records are kept on disk)."""
        if self.spool.folder is None:
            self.spool.append({"kind": "figure", "figure": figure, "artifact_file": artifact_file})
            return
        path = self.spool.folder / "artifacts" / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
        self.log_artifact(path, str(Path(artifact_file).parent) if "/" in artifact_file else None)

    def end(self, status: RunStatus) -> None:
        """Record the final status and deliver what can be (all of it unless KILLED: metrics after the last
        checkpoint then wait, to be dropped by a resumed job or sent by ``task=sync``)."""
        name = RunStatus.to_string(status)
        self.spool.append({"kind": "status", "status": name})
        delivered = self.flush(everything=status != RunStatus.KILLED)
        if delivered and self.spool.pending():  # held metrics before it: the status itself goes now too
            try:
                self.client.set_terminated(self.run_id, name)
            except MlflowException:
                delivered = False
        if not delivered:
            print(
                f"MLflow at {self.client.tracking_uri} did not take this run's last records; "
                f"{len(self.spool.pending())} wait in {self.spool.folder}. Deliver them with: "
                f"python run.py task=sync run_dir={self.spool.folder.parent}",
                file=sys.stderr,
            )

    def flush(self, everything: bool = False) -> bool:
        """Send the pending records in order; False when the server did not answer (they stay spooled).

        Without a spool folder a failure raises, as there is nowhere to keep the records.
        """
        self.spool.sync()
        try:
            with _fail_fast() if self.spool.folder is not None else nullcontext():
                self._deliver(everything)
        except (MlflowException, RequestException, OSError) as err:  # the server or the connection failed
            if self.spool.folder is None or _is_rejection(err):
                raise
            if self._unreachable_since is None:
                self._unreachable_since = time.monotonic()
                reason = str(err).splitlines()[0][:200]
                print(
                    f"warning: MLflow at {self.client.tracking_uri} does not answer ({reason}); "
                    f"the job goes on and its tracking records wait in {self.spool.folder} until it does",
                    file=sys.stderr,
                )
            self._verify = True
            return False
        if self._unreachable_since is not None:
            print(f"MLflow at {self.client.tracking_uri} answers again; the waiting records were delivered")
            self._unreachable_since = None
        return True

    def _deliver(self, everything: bool) -> None:
        while self.spool.pending():
            pending = self.spool.pending()
            if not everything and self._held(pending[0]):
                return
            kind = pending[0]["kind"]
            if kind == "metrics":
                batch = list(
                    itertools.takewhile(lambda r: r["kind"] == "metrics" and (everything or not self._held(r)), pending)
                )
                count = self._send_metrics(batch)
            else:
                self._send(pending[0])
                count = 1
            self.spool.mark_delivered(count)
            self._verify = False

    def _held(self, record: dict[str, Any]) -> bool:
        held_after = self.checkpoint_micro_step
        return record["kind"] == "metrics" and held_after is not None and record_micro_step(record) > held_after

    def _send_metrics(self, records: list[dict[str, Any]]) -> int:
        """Send up to ``_METRIC_BATCH`` metrics from whole records; returns how many records went."""
        count, items = 0, []
        for record in records:
            if items and len(items) + len(record["items"]) > _METRIC_BATCH:
                break
            items += record["items"]
            count += 1
        if self._verify:  # leave out what an interrupted earlier attempt already delivered
            keys = {item[0] for item in items}
            known = {
                (m.key, m.step, m.timestamp) for key in keys for m in self.client.get_metric_history(self.run_id, key)
            }
            items = [item for item in items if (item[0], item[3], item[2]) not in known]
        for i in range(0, len(items), _METRIC_BATCH):
            metrics = [Metric(k, v, t, s) for k, v, t, s in items[i : i + _METRIC_BATCH]]
            self.client.log_batch(self.run_id, metrics=metrics)
        return count

    def _send(self, record: dict[str, Any]) -> None:
        kind, client, run_id = record["kind"], self.client, self.run_id
        if kind == "create":
            self.spool.set_state(run_id=self._create_run(record))
            if self.spool.folder is not None:  # bookkeeping for the creation only, not a tag for users
                client.delete_tag(self.run_id, "spool_id")
        elif kind == "status":
            if record["status"] == RunStatus.to_string(RunStatus.RUNNING):
                try:
                    info = client.get_run(run_id).info
                except MlflowException as err:
                    if _is_rejection(err):  # no such run there
                        message = f"cannot continue MLflow run {run_id} at {client.tracking_uri}: {err.message}"
                        raise ConfigError(message) from err
                    raise
                self.spool.set_state(run_name=info.run_name)
                client.update_run(run_id, status=record["status"])
            else:
                client.set_terminated(run_id, record["status"])
        elif kind == "params":
            items = record["items"]
            if self._continued:  # MLflow keeps a param's first value; a job started over keeps the run's
                logged = client.get_run(run_id).data.params
                kept = sorted(k for k, v in items.items() if k in logged and logged[k] != v)
                if kept:
                    print(f"note: MLflow run {run_id} keeps its first values of {', '.join(kept)}", file=sys.stderr)
                items = {k: v for k, v in items.items() if k not in logged}
            params = [Param(k, v) for k, v in items.items()]
            for i in range(0, len(params), _PARAM_BATCH):
                client.log_batch(run_id, params=params[i : i + _PARAM_BATCH])
        elif kind == "tags":
            for key, value in record["items"].items():
                client.set_tag(run_id, key, value)
        elif kind == "text":
            client.log_text(run_id, record["text"], record["artifact_file"])
        elif kind == "figure":
            client.log_figure(run_id, record["figure"], record["artifact_file"])
        elif kind == "dataset":
            self._send_dataset(record)
        elif kind == "model":
            self._send_model(record)
        elif kind == "artifact":
            if Path(record["path"]).is_file():
                client.log_artifact(run_id, record["path"], record["artifact_path"])
            else:
                print(f"warning: {record['path']} is gone; not logged to MLflow run {run_id}", file=sys.stderr)

    def _send_dataset(self, record: dict[str, Any]) -> None:
        """Log a dataset input once per run (a run continued by a job started over has it already)."""
        client, run_id = self.client, self.run_id
        logged = {(i.dataset.name, i.dataset.digest) for i in client.get_run(run_id).inputs.dataset_inputs}
        if (record["name"], record["digest"]) in logged:
            return
        source = json.dumps({"uri": record["source"]})
        dataset = Dataset(record["name"], record["digest"], "local", source, profile=json.dumps(record["profile"]))
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", record["context"])])]
        try:
            client.log_inputs(run_id, datasets=inputs)
        except MlflowException:
            # MLflow's store looks a dataset up, then inserts it: parallel sweep trials logging the same new dataset
            # race, and the later insert fails on the datasets table's key. Once there, the look-up finds it.
            client.log_inputs(run_id, datasets=inputs)

    def _send_model(self, record: dict[str, Any]) -> None:
        """Log the saved model as the run's LoggedModel and register it. One model per run: a retry, or a resumed
        job's newer weights, replace the files of the one the run has."""
        client, run_id = self.client, self.run_id
        run = client.get_run(run_id)
        found = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
        model = found[0] if found else client.create_logged_model(run.info.experiment_id, "model", source_run_id=run_id)
        client.log_model_artifacts(model.model_id, record["path"])
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        if model.model_id not in {output.model_id for output in (run.outputs.model_outputs if run.outputs else [])}:
            client.log_outputs(run_id, [LoggedModelOutput(model.model_id, record["step"])])
        name = record["register"]
        if not name or client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            return
        if not client.search_registered_models(f"name = '{name}'"):
            try:
                client.create_registered_model(name)
            except MlflowException:  # registered concurrently (parallel sweep trials)
                pass
        version = client.create_model_version(
            name, model.artifact_location, run_id, description=record["description"], model_id=model.model_id
        )
        # the link the UI shows on the logged model's page ("Registered versions"), as mlflow.register_model sets
        listed = json.loads(client.get_logged_model(model.model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
        listed.append({"name": name, "version": version.version})
        client.set_logged_model_tags(model.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed)})
        print(f"registered model {name} version {version.version}: models:/{name}/{version.version}")

    def _create_run(self, record: dict[str, Any]) -> str:
        """Create the run, or find the one an interrupted earlier attempt created (by the spool's id)."""
        spool_id = self.spool.state.get("spool_id")
        experiment_id = self.tracker.experiment_id(self.client, self.spool.state.get("experiment"))
        if self._verify:
            found = self.client.search_runs([experiment_id], f"tags.spool_id = '{spool_id}'")
            if found:
                return found[0].info.run_id
        tags = {**record["tags"], "spool_id": spool_id} if self.spool.folder is not None else record["tags"]
        name = self._unique_name(experiment_id, record["run_name"])
        self.spool.set_state(run_name=name)
        return self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def _unique_name(self, experiment_id: str, name: str | None) -> str | None:
        """``name``, or ``name (2)``, ``(3)``... when the experiment has a run of that name: the run list tells
        runs apart by name."""
        if not name:
            return name
        prefix = re.split(r"['\"\\%]", name)[0]  # LIKE's other wildcard, _, only widens the search
        found = self.client.search_runs([experiment_id], f"attributes.run_name LIKE '{prefix}%'", max_results=5000)
        taken = {run.info.run_name for run in found}
        unique, number = name, 1
        while unique in taken:
            number += 1
            unique = f"{name} ({number})"
        return unique


def _is_rejection(err: Exception) -> bool:
    """The server answered and refused the request (a bad value): re-sending cannot help."""
    return isinstance(err, MlflowException) and 400 <= err.get_http_status_code() < 500


def _fail_fast() -> AbstractContextManager[None]:
    """MLflow's client retries a dead server for minutes by default; the spool retries at the next flush."""
    return environment({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"})
