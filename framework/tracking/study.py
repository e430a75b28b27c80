"""Optuna studies behind ``-m`` sweeps: where a study lives, which trials count toward its budget, and the
trial a training run reports to so that the study's pruner can stop it early.

A study's storage (``hydra.sweeper.storage``) is an SQLAlchemy URL (``sqlite:///<file>.db`` by default, or a
database server that several machines share: ``postgresql://...``, ``mysql+pymysql://...``) or
``journal:<file>``, Optuna's journal file, for a study shared through a network file system.

The sweeper (``hydra_plugins/framework_optuna_sweeper``) hands each trial's identity to its job through
the environment (``STUDY_ENV``); the training run, and in a data-parallel job its rank 0, reports
``engine.monitor`` after every evaluation (``StudyTrial``) and stops when the trial's pruner says so.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from framework.config import ConfigError

if TYPE_CHECKING:
    import optuna

    from framework.tracking.search_space import SearchSpace

STUDY_ENV = "FRAMEWORK_OPTUNA_TRIAL"  # JSON {storage, study, number}: the trial this job's training reports to
INTERRUPTED = "interrupted"  # user attribute of a trial that failed because the sweep was stopped, not by itself
LAUNCHED_BY = "launched_by"  # user attribute: host and process id of the sweeper that asked for the trial
PRUNER = "pruner"  # user attribute: the pruner config (with _target_) that judges the trial
GRID_SAMPLER = "optuna.samplers.GridSampler"
_DIRECTIONS = {"max": "maximize", "min": "minimize", "maximize": "maximize", "minimize": "minimize"}


@dataclass
class StudyPlan:
    """A sweep's study as found before it runs: the study, its search space, the trials the sweep runs in
    all (``n_trials``, or a smaller grid) and those that already count toward them."""

    study: optuna.Study
    storage: optuna.storages.BaseStorage
    space: SearchSpace
    pruner: dict[str, Any]
    sampler: optuna.samplers.BaseSampler
    planned: int
    counted: int

    @property
    def trials_left(self) -> int:
        return max(self.planned - self.counted, 0)


def is_optuna_sweep(sweeper: DictConfig) -> bool:
    """Whether ``hydra.sweeper`` is this project's Optuna sweeper (a stored study)."""
    return str(sweeper.get("_target_", "")).endswith(".OptunaSweeper") and "storage" in sweeper


def plan_study(sweeper: DictConfig, overrides: list[str]) -> StudyPlan:
    """Check the sweeper settings, open (or create) the study and count its trials, before anything runs.

    ``overrides`` are the command line's; the search space is ``sweeper.params`` with them on top.
    Raises ``ConfigError`` with one line for a bad setting. Trials a killed sweep left RUNNING are failed.
    """
    import optuna

    from framework.tracking.search_space import parse_search_space

    for name in ("n_trials", "n_jobs"):
        value = sweeper.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"hydra.sweeper.{name} must be a whole number >= 1, got {value!r}")
    direction = _DIRECTIONS.get(str(sweeper.direction))
    if direction is None:
        raise ConfigError(f"hydra.sweeper.direction must be max or min (engine.monitor_mode), got {sweeper.direction}")
    space = parse_search_space([f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()] + overrides)
    pruner = OmegaConf.to_container(sweeper.pruner, resolve=True)
    checked(lambda: build_pruner(pruner), "hydra.sweeper.pruner")
    storage, name = str(sweeper.storage), str(sweeper.study_name)
    backend = checked(lambda: open_storage(storage), "hydra.sweeper.storage")
    logger = optuna.logging.get_logger("optuna")
    previous = logger.level
    logger.setLevel(logging.WARNING)  # not "A new study created ..." at every invocation
    try:
        study = optuna.create_study(storage=backend, study_name=name, direction=direction, load_if_exists=True)
    finally:
        logger.setLevel(previous)
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"study '{name}' in {describe_storage(storage)} was made to {study.direction.name.lower()}, this sweep "
            f"would {direction}: choose another hydra.sweeper.study_name"
        )
    abandoned = fail_abandoned_trials(backend, study)
    if abandoned:
        print(f"note: trials {abandoned} of study '{name}', left running by a sweep that was killed, are recorded FAIL")
    planned = sweeper.n_trials
    if str(sweeper.sampler.get("_target_")) == GRID_SAMPLER:
        planned = min(planned, math.prod(len(values) for values in space.grid().values()))
    counted = sum(counts_toward_budget(t) for t in study.get_trials(deepcopy=False))
    sampler = build_sampler(sweeper.sampler, space, len(study.trials))
    return StudyPlan(study, backend, space, pruner, sampler, planned, counted)


def build_sampler(cfg: DictConfig, space: SearchSpace, trials_so_far: int) -> optuna.samplers.BaseSampler:
    """The configured sampler (``_target_`` under ``optuna.samplers.``); its seed moves on by the study's
    trials, so a continued study does not replay the random points it started with."""
    target = str(cfg.get("_target_", ""))
    if not target.startswith("optuna.samplers."):
        raise ConfigError(f"hydra.sweeper.sampler._target_={target!r}: a sampler must be one of optuna.samplers.*")
    extra: dict[str, Any] = {}
    if cfg.get("seed") is not None:
        extra["seed"] = int(cfg.seed) + trials_so_far
    if target == GRID_SAMPLER:
        extra["search_space"] = space.grid()
    return checked(lambda: instantiate(cfg, **extra), "hydra.sweeper.sampler")


def checked(make: Any, key: str) -> Any:
    """``make()``, its failure (a bad sampler, pruner or storage setting) as a one-line ConfigError naming ``key``."""
    try:
        return make()
    except ConfigError:
        raise
    except Exception as err:
        cause = err.__cause__ or err
        raise ConfigError(f"{key}: {type(cause).__name__}: {str(cause).splitlines()[0]}") from err


def open_storage(spec: str) -> optuna.storages.BaseStorage:
    """The storage named by ``spec`` (``journal:<file>`` or an SQLAlchemy URL), its folder made if local."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if spec.startswith("journal:"):
        path = Path(spec[len("journal:") :]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs: dict[str, Any] = {}
    if spec.startswith("sqlite:///"):
        Path(spec[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        # parallel trials write their reports into one file: wait for its lock instead of failing after 5 s
        engine_kwargs["connect_args"] = {"timeout": 60}
    return optuna.storages.RDBStorage(spec, engine_kwargs=engine_kwargs)


def describe_storage(spec: str) -> str:
    """``spec`` fit to print and tag: a database password is masked."""
    if spec.startswith("journal:"):
        return spec
    from sqlalchemy.engine import make_url

    try:
        return make_url(spec).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can read: the storage itself will say so
        return spec


def counts_toward_budget(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial used up one of ``n_trials``: it completed, was pruned, or failed on its own (a trial
    failed because its sweep was interrupted is run again by the continued study)."""
    from optuna.trial import TrialState

    if trial.state == TrialState.FAIL:
        return not trial.user_attrs.get(INTERRUPTED, False)
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED)


def fail_abandoned_trials(storage: optuna.storages.BaseStorage, study: optuna.Study) -> list[int]:
    """Mark FAIL (interrupted) the RUNNING trials whose sweeper process on this host is gone (killed); a
    RUNNING trial of another host or of a live process is left alone. Returns their numbers."""
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = str(trial.user_attrs.get(LAUNCHED_BY, "")).rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_user_attr(trial_id, INTERRUPTED, True)
            study.tell(trial.number, state=TrialState.FAIL)
            failed.append(trial.number)
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def trial_environment(storage: str, study: str, number: int) -> dict[str, str]:
    """Environment that tells a trial's training run which study trial to report to."""
    return {STUDY_ENV: json.dumps({"storage": storage, "study": study, "number": number})}


class StudyTrial:
    """One trial of a stored study, seen from the job that runs it: report a value per epoch, ask whether
    the trial's pruner prunes it."""

    def __init__(self, storage: str, study: str, number: int) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        backend = open_storage(storage)
        trial_id = backend.get_trial_id_from_study_id_trial_number(backend.get_study_id_from_name(study), number)
        pruner_cfg = backend.get_trial(trial_id).user_attrs.get(PRUNER) or {"_target_": "optuna.pruners.NopPruner"}
        self.pruner = build_pruner(pruner_cfg)
        self.trial = optuna.trial.Trial(
            optuna.load_study(study_name=study, storage=backend, pruner=self.pruner), trial_id
        )
        self.number = number

    @classmethod
    def from_environment(cls) -> StudyTrial | None:
        """The trial this process's job runs for, or None outside an Optuna sweep."""
        spec = os.environ.get(STUDY_ENV)
        if not spec:
            return None
        trial = json.loads(spec)
        return cls(trial["storage"], trial["study"], int(trial["number"]))

    def pruned(self, value: float, epoch: int) -> bool:
        """Report ``value`` at ``epoch``; True when the pruner stops the trial there."""
        self.trial.report(float(value), step=epoch)
        return self.trial.should_prune()


def build_pruner(cfg: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    """An Optuna pruner from its config (``_target_`` under ``optuna.pruners.``)."""
    target = str(cfg.get("_target_", ""))
    if not target.startswith("optuna.pruners."):
        raise ConfigError(f"hydra.sweeper.pruner._target_={target!r}: a pruner must be one of optuna.pruners.*")
    return instantiate(dict(cfg))
