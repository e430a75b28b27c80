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
from omegaconf import DictConfig, OmegaConf

from framework.config import build, check_config, command_line_problem
from framework.data.pipeline import class_count
from framework.engine import FitResult
from framework.errors import user_error
from framework.launch.slurm import slurm_gres, slurm_master_addr
from framework.paths import PROJECT_ROOT, project_root, rank_dir_name
from framework.runtime.signals import exit_status, interrupts_unwrapped
from framework.tasks.common import run_tags
from framework.tracking.mlflow_run import PARENT_RUN_ENV, TRIAL_ENV
from framework.tracking.naming import run_name
from framework.tracking.sweep import child_runs

log = logging.getLogger(__name__)

RESOLVERS = {
    "project_root": project_root,  # conf/paths: outputs under the checkout, whatever the working directory
    "rank_dir": rank_dir_name,  # a data-parallel process's own folder
    "slurm_master_addr": slurm_master_addr,  # hardware/: a multi-node job's rendezvous host
    "slurm_gres": slurm_gres,  # hydra/launcher/slurm: the devices a node asks for
    "class_count": class_count,  # dataset/digits: how many classes dataset.classes keeps
}


def register_resolvers() -> None:
    """Make the ``${name:}`` interpolations the configs use known to OmegaConf (before Hydra composes)."""
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


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
        return execute(cfg)
    except Exception as err:
        known = user_error(err)
        if known is None:
            raise
        kind, message, status = known
        print(f"{kind}: {message}", file=sys.stderr)
        sys.exit(status)
    except KeyboardInterrupt as err:
        run = "had finished" if getattr(err, "finished", False) else "is marked KILLED"
        print(f"interrupted ({err or 'stopped by Ctrl-C (SIGINT)'}); the MLflow run {run}", file=sys.stderr)
        sys.exit(exit_status(err))


def execute(cfg: DictConfig) -> Any:
    """Check the whole run spec (every key, type, choice and range), then run the task it names."""
    with interrupts_unwrapped():
        check_config(cfg)
        return get_method(cfg.task._target_)(cfg)


def run_trial(cfg: DictConfig) -> Any:
    """One sweep trial: the task's objective (``engine.monitor`` at the best epoch for training).

    A failing trial prints why, is recorded as a FAILED child run of the sweep, and returns NaN, which
    both the basic sweeper and Optuna (trial state FAIL) take without stopping the sweep. Ctrl-C stops it.
    """
    try:
        result = execute(cfg)
    except Exception as err:
        known = user_error(err)
        if known is None:
            log.exception("trial failed")
        kind, message, _ = known or ("error", f"{type(err).__name__}: {err}", 1)
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
    tags = {**run_tags(cfg, str(cfg.task._target_).rsplit(".", 1)[-1]), "error": message[:5000]}
    run = tracker.open_run(tags, run_name=run_name(cfg))
    client.set_terminated(run.run_id, "FAILED")
