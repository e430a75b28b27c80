"""Sweeps (``python run.py -m sweeps=<name>``, configs in ``sweeps/``) as one MLflow parent run per sweep.

``SweepRun`` is a Hydra callback (``conf/hydra/default.yaml``). When a multirun starts it opens the parent
run (tags, the sweeper config, the overrides) and exports its id; every trial's run, in this process, a
joblib worker or an msrun worker, is created as its child (``MlflowTracker.start_run`` reads the id).
When the sweep ends the parent records the best trial: its run id, swept values and objective.
An Optuna sweep keeps one parent per stored study: re-running it reopens that parent, unless the study is
complete (``framework.tracking.study.plan_study`` says so), when nothing is touched.
The objective is ``engine.monitor`` at its best epoch, better by ``engine.monitor_mode``; pruned trials
are counted but never the best.
"""

from __future__ import annotations

import atexit
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from mlflow.entities import Run, RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from framework.config import ConfigError
from framework.runtime.signals import STOP_SIGNALS, raise_interrupt
from framework.tracking.mlflow_run import PARENT_RUN_ENV, TRIAL_ENV, MlflowTracker
from framework.tracking.naming import SWEPT_ENV, command_line, source_tags, sweep_name
from framework.tracking.study import describe_storage, is_optuna_sweep, plan_study


class SweepRun(Callback):
    """Owns a multirun's MLflow parent run (no-op in single runs)."""

    def __init__(self) -> None:
        self.tracker: MlflowTracker | None = None
        self.parent_id: str | None = None
        self.monitor, self.mode = "val_top1", "max"
        self.swept_keys: list[str] = []
        self.trial_offset = 0  # trials a continued study's parent already has
        self.previous_handlers: dict[int, Any] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        study = None
        if is_optuna_sweep(sweeper):
            try:  # (Hydra calls this before the sweeper's own setup, which plans the same way)
                study = plan_study(sweeper, list(config.hydra.overrides.task))
            except ConfigError as err:
                print(f"config error: {err}", file=sys.stderr)
                sys.exit(2)
            if study.trials_left == 0:
                return  # a complete study: the sweeper says so, and its parent run stays as it is
        self.tracker = instantiate(config.tracking)
        self.monitor, self.mode = str(config.engine.monitor), str(config.engine.monitor_mode)
        sweep_dir = Path(config.hydra.sweep.dir)
        tags = {
            "task": "sweep",
            "sweeper": str(sweeper._target_).rsplit(".", 1)[-1],
            "sweep_dir": str(sweep_dir),
            "objective": self.monitor,
            "objective_mode": self.mode,
        }
        if study is not None:
            tags.update(
                optuna_storage=describe_storage(str(sweeper.storage)),
                optuna_study=str(sweeper.study_name),
                sampler=str(sweeper.sampler._target_).rsplit(".", 1)[-1],
                pruner=str(sweeper.pruner._target_).rsplit(".", 1)[-1],
            )
        self.swept_keys = swept_keys(config)
        task_overrides = list(config.hydra.overrides.task)
        own = [o for o in config.hydra.overrides.hydra if not o.startswith(("hydra.sweep.dir", "hydra.run.dir"))]
        tags.update(source_tags(command_line([*own, *task_overrides], multirun=True)))
        previous = self._previous_parent(tags) if study is not None else None
        name = sweep_name(str(config.model.name), task_overrides, self.swept_keys)
        parent = self.tracker.open_run(tags, run_id=previous, run_name=name)
        self.parent_id = parent.run_id
        parent.log_text(OmegaConf.to_yaml(sweeper), "sweep/sweeper.yaml")
        parent.log_text("\n".join(config.hydra.overrides.task) + "\n", "sweep/overrides.yaml")
        parent.log_text(OmegaConf.to_yaml({k: v for k, v in config.items() if k != "hydra"}), "sweep/config.yaml")
        parent.flush()
        self.trial_offset = len(child_runs(parent.client, self.parent_id))
        os.environ[PARENT_RUN_ENV] = self.parent_id
        os.environ[SWEPT_ENV] = ",".join(self.swept_keys)
        atexit.register(self._end, RunStatus.KILLED)  # the sweep stopped before on_multirun_end (Ctrl-C, crash)
        # MindSpore answers Ctrl-C by sending SIGTERM, which would end the process without atexit: make it an
        # interrupt while the sweep runs
        self.previous_handlers = {signum: signal.signal(signum, raise_interrupt) for signum in STOP_SIGNALS}
        print(f"sweep parent MLflow run {self.parent_id} in experiment '{self.tracker.experiment_name}'")
        print(f"its run page: {self.tracker.run_url(self.parent_id)}")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Export the trial number for the trial's run (here or in a joblib worker; msrun workers inherit it):
        the Optuna sweeper sets its study's trial number itself, the basic sweeper counts jobs."""
        hydra = HydraConfig.get()
        if PARENT_RUN_ENV in os.environ and hydra.mode == RunMode.MULTIRUN and TRIAL_ENV not in hydra.job.env_set:
            os.environ[TRIAL_ENV] = str(self.trial_offset + hydra.job.num)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Take the stop signals back after each trial: the MindSpore graphs a trial ran leave MindSpore's own
        SIGINT handler installed, which lost a Ctrl-C pressed between two trials (the sweep went on)."""
        if self.previous_handlers:
            for signum in STOP_SIGNALS:
                signal.signal(signum, raise_interrupt)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        results = sweep_dir / "optimization_results.yaml"
        if results.is_file() and self.tracker is not None and self.parent_id is not None:
            self.tracker.client().log_artifact(self.parent_id, str(results), "sweep")
        self._end(RunStatus.FINISHED)

    def _previous_parent(self, tags: dict[str, str]) -> str | None:
        """The parent run of an earlier invocation of the same stored Optuna study, if any."""
        assert self.tracker is not None
        client = self.tracker.client()
        experiment = client.get_experiment_by_name(self.tracker.experiment_name)
        if experiment is None:
            return None
        query = " and ".join(f"tags.{k} = '{tags[k]}'" for k in ("task", "optuna_storage", "optuna_study"))
        found = client.search_runs([experiment.experiment_id], query, order_by=["start_time DESC"], max_results=1)
        return found[0].info.run_id if found else None

    def _end(self, status: int) -> None:
        """Record the best finished trial in the parent run and end it with ``status`` (once)."""
        if self.tracker is None or self.parent_id is None:
            return
        parent_id, self.parent_id = self.parent_id, None
        os.environ.pop(PARENT_RUN_ENV, None)
        os.environ.pop(TRIAL_ENV, None)
        os.environ.pop(SWEPT_ENV, None)
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers = {}
        client = self.tracker.client()
        children = child_runs(client, parent_id)
        key = f"best_{self.monitor}"
        finished = [r for r in children if r.info.status == "FINISHED"]
        pruned = {r.info.run_id for r in finished if r.data.tags.get("pruned") == "true"}
        # as Optuna's best trial, the best is a trial that ran to its end (a pruned one stopped early)
        scored = [
            r for r in finished if r.info.run_id not in pruned and math.isfinite(r.data.metrics.get(key, math.nan))
        ]
        sign = 1.0 if self.mode == "max" else -1.0
        summary = {
            "trials": len(children),
            "trials_finished": len(finished) - len(pruned),
            "trials_pruned": len(pruned),
            "trials_failed": sum(r.info.status == "FAILED" for r in children),
        }
        for name, value in summary.items():
            client.log_metric(parent_id, name, value)
        if scored:
            best = max(scored, key=lambda r: sign * r.data.metrics[key])
            client.set_tag(parent_id, "best_run_id", best.info.run_id)
            client.set_tag(parent_id, "best_overrides", best.data.tags.get("overrides", ""))
            client.log_metric(parent_id, key, best.data.metrics[key])
            chosen = dict(o.split("=", 1) for o in best.data.tags.get("overrides", "").split() if "=" in o)
            swept = {k: v for k, v in chosen.items() if k in self.swept_keys}
            logged = client.get_run(parent_id).data
            for name, value in swept.items():
                # params are write-once: the best so far of an unfinished sweep, or a better trial found by a
                # continued study after its first completion, is recorded as a tag instead
                if status == RunStatus.FINISHED and logged.params.get(f"best.{name}", value) == value:
                    client.log_param(parent_id, f"best.{name}", value)
                    if f"best.{name}" in logged.tags:
                        client.delete_tag(parent_id, f"best.{name}")
                else:
                    client.set_tag(parent_id, f"best.{name}", value)
            client.log_text(
                parent_id,
                OmegaConf.to_yaml({"run_id": best.info.run_id, key: best.data.metrics[key], "overrides": swept}),
                "sweep/best_trial.yaml",
            )
            print(f"best trial: run {best.info.run_id} {key}={best.data.metrics[key]:.4f} {swept}")
        client.set_terminated(parent_id, RunStatus.to_string(status))


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a sweep varies: its sweeper's ``params`` and the command-line overrides that are sweeps
    (``a,b``, ``range(...)``, ``choice(...)``, ...)."""
    keys = list(config.hydra.sweeper.get("params") or {})
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    return keys + [o.key_or_group for o in parsed if o.is_sweep_override() and o.key_or_group not in keys]


def child_runs(client: MlflowClient, parent_id: str, condition: str = "", **search: Any) -> list[Run]:
    """The runs nested under ``parent_id`` (optionally also matching an MLflow search ``condition``);
    ``search`` goes to ``MlflowClient.search_runs`` (order_by, max_results)."""
    query = f"tags.`mlflow.parentRunId` = '{parent_id}'" + (f" and {condition}" if condition else "")
    return client.search_runs([client.get_run(parent_id).info.experiment_id], query, **search)
