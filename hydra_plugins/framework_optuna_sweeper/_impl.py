"""The Optuna sweeper: asks a stored study for trials, runs them through Hydra's launcher, tells the results.

- Budget: ``n_trials`` counts the study's trials that completed, were pruned or failed on their own, over
  every invocation, so the same command continues an interrupted study and a complete one runs nothing.
- Each trial's job learns its study trial from the environment (``hydra.job.env_set``, which every launcher
  applies in the job's own process, and msrun workers inherit); its training reports ``engine.monitor`` after
  each evaluation and stops when the trial's pruner (recorded on the trial) prunes it: the job raises
  ``optuna.TrialPruned`` and the study records PRUNED. A job that fails (or returns NaN) is recorded FAIL.
- An interrupt (Ctrl-C, SIGTERM) records the batch's trials FAIL and ``interrupted``; they do not count.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from framework.config import ConfigError
from framework.runtime.signals import held_signals
from framework.tracking.mlflow_run import TRIAL_ENV
from framework.tracking.search_space import quote
from framework.tracking.study import (
    GRID_SAMPLER,
    INTERRUPTED,
    LAUNCHED_BY,
    PRUNER,
    counts_toward_budget,
    describe_storage,
    plan_study,
    trial_environment,
)

log = logging.getLogger(__name__)


class OptunaSweeperImpl(Sweeper):
    def __init__(self, sampler: DictConfig, storage: str, study_name: str, n_jobs: int) -> None:
        self.sampler_cfg, self.storage, self.study_name, self.n_jobs = sampler, str(storage), str(study_name), n_jobs
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Plan the sweep before anything runs; a bad setting stops here with one line (exit 2)."""
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.objective = str(OmegaConf.select(config, "engine.monitor", default="objective"))
        try:
            self.plan = plan_study(config.hydra.sweeper, list(config.hydra.overrides.task))
            self.study, self.space = self.plan.study, self.plan.space
            self.study.sampler = self.plan.sampler
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            sys.exit(2)

    def sweep(self, arguments: list[str]) -> list[list[JobReturn]]:
        """Run batches of ``n_jobs`` trials until the planned trials count (see the module docstring)."""
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        plan = self.plan
        if plan.trials_left == 0:
            print(self._complete_message())
            return []
        log.info(
            f"study '{self.study_name}' in {describe_storage(self.storage)}: {plan.counted} of {plan.planned} trials "
            f"done, {plan.trials_left} to run ({self.n_jobs} at a time)"
        )
        returns = []
        while plan.trials_left > 0:
            returns.append(self._run_batch(min(self.n_jobs, plan.trials_left)))
            plan.counted += len(returns[-1])
        self._write_results(sweep_dir)
        return returns

    def _ask(self) -> optuna.Trial:
        trial = self.study.ask(self.space.distributions)
        trial.set_user_attr(LAUNCHED_BY, f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr(PRUNER, self.plan.pruner)
        return trial

    def _run_batch(self, count: int) -> list[JobReturn]:
        """Ask for ``count`` trials, run them through the launcher, tell the study each one's outcome."""
        with held_signals():  # a trial asked for is recorded as launched by this process before Ctrl-C lands
            trials = [self._ask() for _ in range(count)]
        try:
            batch = []
            for trial in trials:
                env = {**trial_environment(self.storage, self.study_name, trial.number), TRIAL_ENV: str(trial.number)}
                env_set = [f"++hydra.job.env_set.{k}={quote(v)}" for k, v in env.items()]
                batch.append([*self.space.overrides(trial.params), *env_set])
            self.validate_batch_is_legal(batch)
            results = list(self.launcher.launch(batch, initial_job_idx=self.job_idx))
        except BaseException:  # interrupted, or a batch Hydra cannot compose: these trials are not to count
            for trial in trials:
                trial.set_user_attr(INTERRUPTED, True)
                self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        self.job_idx += len(results)
        for trial, result in zip(trials, results, strict=True):
            self._tell(trial, result)
        return results

    def _tell(self, trial: optuna.Trial, result: JobReturn) -> None:
        params = " ".join(self.space.sampled(trial.params))
        if result.status == JobStatus.FAILED:  # (result.return_value would print "Error executing job" and raise)
            error = result._return_value
            if isinstance(error, optuna.TrialPruned):
                log.info(f"trial {trial.number} pruned ({params}): {error}")
                self._tell_state(trial, TrialState.PRUNED)
            else:  # the job printed its own message
                reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                log.warning(f"trial {trial.number} failed ({params}): {reason}")
                self._tell_state(trial, TrialState.FAIL)
            return
        value = result.return_value
        if isinstance(value, (int, float)) and math.isfinite(value):
            log.info(f"trial {trial.number} complete ({params}): {self.objective} {value:.4f}")
            self._tell_state(trial, TrialState.COMPLETE, float(value))
        else:  # a failed training trial returns NaN
            log.info(f"trial {trial.number} failed ({params})")
            self._tell_state(trial, TrialState.FAIL)

    def _tell_state(self, trial: optuna.Trial, state: TrialState, value: float | None = None) -> None:
        try:
            self.study.tell(trial, value, state=state)
        except RuntimeError as err:
            # Optuna's grid sampler calls study.stop() when the grid is used up, which only works inside
            # study.optimize; the trial was recorded before that
            if not (str(self.sampler_cfg._target_) == GRID_SAMPLER and "Study.stop" in str(err)):
                raise

    def _summary(self) -> dict[str, Any]:
        trials = self.study.get_trials(deepcopy=False)
        states = {name: sum(t.state == TrialState[name.upper()] for t in trials) for name in ("complete", "pruned")}
        summary: dict[str, Any] = {
            "study": self.study_name,
            "storage": describe_storage(self.storage),
            "direction": self.study.direction.name.lower(),
            "objective": self.objective,
            "n_trials": self.plan.planned,
            **states,
            "failed": sum(t.state == TrialState.FAIL and counts_toward_budget(t) for t in trials),
        }
        if states["complete"]:
            best = self.study.best_trial
            summary.update(best_trial=best.number, best_value=best.value, best_params=self.space.sampled(best.params))
        return summary

    def _write_results(self, sweep_dir: Path) -> None:
        summary = self._summary()
        OmegaConf.save(OmegaConf.create(summary), sweep_dir / "optimization_results.yaml")
        best = (
            f"; best {self.objective} {summary['best_value']:.4f} (trial {summary['best_trial']})"
            if "best_value" in summary
            else ""
        )
        log.info(
            f"study '{self.study_name}': {summary['complete']} complete, {summary['pruned']} pruned, "
            f"{summary['failed']} failed{best}"
        )

    def _complete_message(self) -> str:
        summary, plan = self._summary(), self.plan
        best = ""
        if "best_value" in summary:
            values = " ".join(summary["best_params"])
            best = f" Best {self.objective} {summary['best_value']:.4f}: trial {summary['best_trial']} ({values})."
        more = (
            "Its grid is used up."
            if plan.planned < self.config.hydra.sweeper.n_trials
            else f"To run more trials, raise its budget: hydra.sweeper.n_trials=<more than {plan.planned}>."
        )
        return (
            f"study '{self.study_name}' in {summary['storage']} is complete: {plan.counted} of {plan.planned} trials "
            f"done ({summary['complete']} complete, {summary['pruned']} pruned, {summary['failed']} failed); "
            f"nothing to run.{best} {more}"
        )
