"""Tasks (``task/`` configs): each is a function of the composed config, named by ``task._target_``."""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_method
from omegaconf import DictConfig

from framework.config import ConfigError, build, command_line_problem
from framework.data.folder import bad_image_message
from framework.engine import FitResult
from framework.engine.trainer import TrainingDiverged
from framework.launch.msrun import JobFailed
from framework.launch.signals import exit_status
from framework.paths import PROJECT_ROOT
from framework.tasks.benchmark import BenchmarkFailed
from framework.tasks.common import run_tags
from framework.tasks.export import ExportMismatch, ExportUnsupported
from framework.tasks.sync import TrackingUnreachable
from framework.tracking.mlflow_run import PARENT_RUN_ENV, TRIAL_ENV
from framework.tracking.sweep import child_runs

log = logging.getLogger(__name__)


def check_command_line(argv: list[str] | None = None) -> None:
    """Before Hydra runs: an override Hydra cannot compose (a mistyped group or key, a missing choice, bad
    grammar) gets one line, with a "did you mean" where one is close (exit 2)."""
    problem = command_line_problem(sys.argv[1:] if argv is None else argv, PROJECT_ROOT / "conf")
    if problem:
        print(f"config error: {problem}", file=sys.stderr)
        sys.exit(2)


def run(cfg: DictConfig) -> Any:
    """Run the task the config selects (``task=train`` by default).

    A bad run spec exits with status 2, an unreadable image (``dataset.on_bad_image=error``) with 1,
    a failed data-parallel worker with 1, Ctrl-C with 130 and SIGTERM with 143 (as shells expect), each with
    one line.
    In a sweep (``-m``) a trial returns its objective instead, and a failed trial does not stop the sweep.
    """
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return run_trial(cfg)
    try:
        return get_method(cfg.task._target_)(cfg)
    except (ConfigError, RuntimeError) as err:
        kind, message = error_message(err)
        if message is None:
            raise
        print(f"{kind}: {message}", file=sys.stderr)
        sys.exit(2 if isinstance(err, ConfigError) else 1)
    except KeyboardInterrupt as err:
        print(f"interrupted ({err or 'stopped by Ctrl-C (SIGINT)'}); the MLflow run is marked KILLED", file=sys.stderr)
        sys.exit(exit_status(err))


def error_message(err: BaseException) -> tuple[str, str | None]:
    """(kind, one-line message) for the errors a user can fix; message None for anything else."""
    if isinstance(err, ConfigError):
        return "config error", str(err)
    if isinstance(err, (JobFailed, TrainingDiverged)):
        return "training error", str(err)
    if isinstance(err, (ExportMismatch, ExportUnsupported)):
        return "export error", str(err)
    if isinstance(err, BenchmarkFailed):
        return "benchmark error", str(err)
    if isinstance(err, TrackingUnreachable):
        return "tracking error", str(err)
    message = bad_image_message(err)
    return "data error", message


def run_trial(cfg: DictConfig) -> Any:
    """One sweep trial: the task's objective (``engine.monitor`` at the best epoch for training).

    A failing trial prints why, is recorded as a FAILED child run of the sweep, and returns NaN, which
    both the basic sweeper and Optuna (trial state FAIL) take without stopping the sweep. Ctrl-C stops it.
    """
    try:
        result = get_method(cfg.task._target_)(cfg)
    except Exception as err:
        kind, message = error_message(err)
        if message is None:
            log.exception("trial failed")
            kind, message = "error", f"{type(err).__name__}: {err}"
        print(f"trial {os.environ.get(TRIAL_ENV, '?')} failed, the sweep goes on: {kind}: {message}", file=sys.stderr)
        record_failed_trial(cfg, f"{kind}: {message}")
        return math.nan
    if isinstance(result, FitResult):
        if result.stopped is not None and result.stopped["kind"] == "pruned":
            import optuna

            raise optuna.TrialPruned(result.stopped["reason"])  # the sweeper records the trial as PRUNED
        best = result.best or {}
        return float(best.get(cfg.engine.monitor, math.nan))
    return result


def record_failed_trial(cfg: DictConfig, message: str) -> None:
    """Make sure the sweep shows a failed trial: tag its run with the error, or create a FAILED run for it
    when it failed before opening one (e.g. a swept value the config check refused)."""
    parent = os.environ.get(PARENT_RUN_ENV)
    if not parent:
        return
    tracker = build(cfg, "tracking")
    client = tracker.client()
    trial = os.environ.get(TRIAL_ENV, "")
    found = child_runs(client, parent, f"tags.sweep_trial = '{trial}'")
    if found:
        client.set_tag(found[0].info.run_id, "error", message[:5000])
        return
    run = tracker.open_run({**run_tags(cfg, str(cfg.task._target_).rsplit(".", 1)[-1]), "error": message[:5000]})
    client.set_terminated(run.run_id, "FAILED")
