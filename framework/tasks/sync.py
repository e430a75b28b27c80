"""``task=sync run_dir=<run dir>``: deliver the tracking records a training job left in ``<run dir>/tracking``.

A job whose MLflow server did not answer (at the start, mid-run or at the end), or that was killed, keeps
its params, metrics, tags, artifacts and final status there; this sends them, in order and once each, to
the server the job was tracking to.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from framework.config import ConfigError, build
from framework.errors import UserError
from framework.tasks.common import print_summary
from framework.tracking import MlflowRun
from framework.tracking.spool import STATE_FILE, Spool


class TrackingUnreachable(UserError, RuntimeError):
    """The MLflow server still does not answer; the records stay where they were."""

    kind = "tracking error"


def sync(cfg: DictConfig) -> int:
    """Deliver the waiting records of ``cfg.run_dir``; returns how many were delivered."""
    if not cfg.get("run_dir"):
        raise ConfigError("task=sync needs run_dir=<the training job's folder> (the one holding tracking/)")
    folder = Path(str(cfg.run_dir)).expanduser().resolve() / "tracking"
    if not (folder / STATE_FILE).is_file():
        raise ConfigError(f"run_dir={cfg.run_dir}: no tracking records in {folder}; is it a training job's folder?")
    run = MlflowRun(build(cfg, "tracking"), Spool(folder), verify=True)
    waiting = len(run.spool.pending())
    if not run.flush(everything=True):
        raise TrackingUnreachable(
            f"MLflow at {run.client.tracking_uri} still does not answer; {waiting} records wait in {folder}. "
            "Run task=sync again once it is up"
        )
    print_summary(
        "tracking records delivered",
        {"records": waiting, "mlflow run": f"{run.run_name} ({run.run_id})", "tracking uri": run.client.tracking_uri},
    )
    return waiting
