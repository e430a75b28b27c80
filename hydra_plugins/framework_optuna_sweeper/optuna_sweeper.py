"""Hydra finds this ``Sweeper`` when it scans ``hydra_plugins``; the work is in ``_impl`` (imported only when
a sweep uses it, so that a plain ``python run.py`` does not import Optuna)."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """An Optuna study on the ask/tell API; trials run through the configured Hydra launcher.

    ``sampler`` and ``pruner`` are configs with an ``optuna.samplers.*`` / ``optuna.pruners.*`` target,
    ``direction`` is ``max``/``min`` (or ``maximize``/``minimize``), ``storage`` an SQLAlchemy URL or
    ``journal:<file>``, ``n_trials`` the study's budget over all invocations, ``n_jobs`` the trials launched
    at once, ``params`` the search space in Hydra's override grammar (``key: choice(...)``, ...).
    """

    def __init__(
        self,
        sampler: DictConfig,
        pruner: DictConfig,
        direction: str,
        storage: str,
        study_name: str,
        n_trials: int,
        n_jobs: int = 1,
        params: DictConfig | None = None,
    ) -> None:
        from hydra_plugins.framework_optuna_sweeper._impl import OptunaSweeperImpl

        # the other settings are read from the config by framework.tracking.study.plan_study (as the MLflow
        # sweep callback does), which checks them
        self.sweeper = OptunaSweeperImpl(sampler, storage, study_name, n_jobs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.sweeper.sweep(arguments)
