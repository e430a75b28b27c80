"""Sweeps (``python run.py -m``): one MLflow parent run per sweep with a child per trial, the best trial
recorded, failed trials recorded without stopping the sweep, an interrupted Optuna study continued, a complete
one left as it is, bad trials pruned (also in parallel), and the sweeper's settings checked before anything runs."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow.entities import Run
from omegaconf import DictConfig
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from framework.config import ConfigError
from framework.paths import PROJECT_ROOT
from framework.tasks.compare import compare
from framework.tracking.search_space import parse_search_space, quote
from framework.tracking.study import plan_study
from tests.conftest import CONF_DIR, TEST_MODEL, all_runs, compose_config, mlflow_client

pytestmark = pytest.mark.slow  # end-to-end jobs: python -m pytest -m "not slow" skips them

TINY = ["dataset.image_size=16", "engine.epochs=1", "engine.limit_train_batches=2"]


def sweep_command(tmp_path: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(PROJECT_ROOT / "run.py"), "-m", f"paths.output_dir={tmp_path}", *TINY, *overrides]


def run_sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run(
        sweep_command(tmp_path, *overrides), capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path
    )


def parent_and_children(tmp_path: Path) -> tuple[Run, list[Run]]:
    runs = all_runs(mlflow_client(tmp_path))
    (parent,) = [r for r in runs if r.data.tags.get("task") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1, "every other run is a trial of the sweep"
    return parent, children


def assert_best_recorded(parent: Run, children: list[Run], swept: list[str]) -> None:
    finished = [c for c in children if c.info.status == "FINISHED"]
    best = max(finished, key=lambda c: c.data.metrics["best_val_top1"])
    assert parent.data.metrics["best_val_top1"] == best.data.metrics["best_val_top1"]
    best_values = dict(o.split("=", 1) for o in parent.data.tags["best_overrides"].split())
    assert {k[len("best.") :]: v for k, v in parent.data.params.items() if k.startswith("best.")} == {
        k: best_values[k] for k in swept
    }
    winner = [c for c in finished if c.info.run_id == parent.data.tags["best_run_id"]]
    assert winner and winner[0].data.metrics["best_val_top1"] == best.data.metrics["best_val_top1"]


def test_grid_sweep_in_parallel_with_joblib(tmp_path):
    """2 models × 2 lrs, two trials at a time: four child runs under one parent that records the best;
    task=compare on the parent tabulates and plots the four."""
    out = run_sweep(
        tmp_path,
        "sweeps=grid_models_lr",
        "model=resnext_test,resnext50",
        "scheduler.lr=0.01,0.05",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    parent, children = parent_and_children(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweeper"] == "BasicSweeper"
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    assert sorted(c.data.tags["sweep_trial"] for c in children) == ["0", "1", "2", "3"]
    # named by what the sweep varies; the parent by what its trials share, and how it was run
    for c in children:
        assert (
            c.info.run_name
            == f"#{c.data.tags['sweep_trial']} {c.data.params['model.name']} lr={c.data.params['scheduler.lr']}"
        )
    assert (
        parent.info.run_name
        == "sweep over model, lr: image_size=16 epochs=1 limit_train_batches=2 sweeps=grid_models_lr"
    )
    assert parent.data.tags["mlflow.note.content"].startswith("`python run.py -m hydra/launcher=joblib")
    assert parent.data.tags["mlflow.source.name"] == "run.py" and parent.data.tags["mlflow.user"]
    combos = {(c.data.params["model.name"], c.data.params["scheduler.lr"]) for c in children}
    assert combos == {(m, lr) for m in ("resnext_test", "resnext50_32x4d") for lr in ("0.01", "0.05")}
    assert parent.data.metrics["trials_finished"] == 4 and parent.data.metrics["trials_failed"] == 0
    assert_best_recorded(parent, children, ["model", "scheduler.lr"])
    artifacts = {a.path for a in mlflow_client(tmp_path).list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/sweeper.yaml", "sweep/overrides.yaml", "sweep/best_trial.yaml"} <= artifacts

    rows = compare(compose_config(["task=compare", f"compare.parent={parent.info.run_id}"], tmp_path))
    assert {r["run_id"] for r in rows} == {c.info.run_id for c in children}
    assert {"model.name", "scheduler.lr"} <= set(rows[0])
    plot = tmp_path / "run" / "val_top1_per_epoch.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    out = run_sweep(tmp_path, TEST_MODEL, "dataset.batch_size=5000,32")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trial 0 failed, the sweep goes on: config error: dataset.batch_size=5000" in out.stderr
    parent, children = parent_and_children(tmp_path)
    by_trial = {c.data.tags["sweep_trial"]: c for c in children}
    assert by_trial["0"].info.status == "FAILED" and "batch_size=5000" in by_trial["0"].data.tags["error"]
    assert by_trial["1"].info.status == "FINISHED"
    assert parent.info.status == "FINISHED"
    assert (parent.data.metrics["trials_failed"], parent.data.metrics["trials_finished"]) == (1, 1)
    assert parent.data.tags["best_run_id"] == by_trial["1"].info.run_id
    assert parent.data.params["best.dataset.batch_size"] == "32"


def _complete_trials(storage: Path) -> int:
    """Complete trials of the study that a sweep in progress writes, read straight from its SQLite file (opening
    it through Optuna would set the file up too, racing with the sweep's own set-up)."""
    if not storage.is_file():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{storage}?mode=ro", uri=True, timeout=30)) as db:
            return db.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.OperationalError:  # its tables are not there yet
        return 0


def all_run_records(tmp_path: Path) -> list[tuple]:
    """Everything MLflow holds about every run, to check that a command changed nothing."""
    return sorted(
        (r.info.run_id, r.info.status, r.info.end_time, r.data.tags, r.data.metrics, r.data.params)
        for r in all_runs(mlflow_client(tmp_path))
    )


def test_optuna_study_survives_an_interrupt_and_completes(tmp_path):
    """A 6-trial TPE study, interrupted (Ctrl-C) after two trials, then re-run: it continues the stored study
    and the same MLflow parent until six trials completed, and records the best. Run once more, the complete
    study says so, exits 0 and leaves every run as it was."""
    storage = tmp_path / "sweeps" / "digits_resnext_test_tpe.db"
    overrides = [TEST_MODEL, "sweeps=optuna_tpe", "hydra.sweeper.n_trials=6"]  # 4 trials left when interrupted
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    first = subprocess.Popen(
        sweep_command(tmp_path, *overrides),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while _complete_trials(storage) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert first.poll() is None, first.stderr.read()[-3000:]
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C
    _, errors = first.communicate(timeout=120)
    done_before = _complete_trials(storage)
    assert first.returncode != 0, f"{done_before} trials complete; the sweep's stderr ends: {errors[-3000:]}"
    assert 2 <= done_before < 6
    parent, _ = parent_and_children(tmp_path)
    assert parent.info.status == "KILLED"

    out = run_sweep(tmp_path, *overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _complete_trials(storage) == 6
    again, children = parent_and_children(tmp_path)
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 6 and len({c.data.tags["sweep_trial"] for c in children}) == len(children)
    for child in finished:
        assert 0.003 <= float(child.data.params["scheduler.lr"]) <= 0.3
        assert 0.0 <= float(child.data.params["loss.label_smoothing"]) <= 0.2
    assert len({c.data.params["scheduler.lr"] for c in finished}) == 6, "a continued study samples new points"
    assert_best_recorded(again, children, ["scheduler.lr", "optimizer.weight_decay", "loss.label_smoothing"])
    assert not [k for k in again.data.tags if k.startswith("best.")], "the interrupted run's best-so-far tags are gone"
    study = optuna.load_study(study_name="digits_resnext_test_tpe", storage=f"sqlite:///{storage}")
    assert study.best_value == pytest.approx(again.data.metrics["best_val_top1"])
    interrupted = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert all(t.user_attrs.get("interrupted") for t in interrupted), "the interrupted trial does not count"
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]

    before = all_run_records(tmp_path)
    done = run_sweep(tmp_path, *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "study 'digits_resnext_test_tpe' in sqlite:///" in done.stdout
        and "is complete: 6 of 6 trials done" in done.stdout
    )
    assert "hydra.sweeper.n_trials=<more than 6>" in done.stdout
    assert all_run_records(tmp_path) == before


def enqueue(tmp_path: Path, study_name: str, *lrs: float) -> None:
    """Create the study a sweep will use, holding one finished trial (val top-1 0.12 after epoch 1, as a median
    to prune against), with the next trials' learning rates fixed."""
    (tmp_path / "sweeps").mkdir(exist_ok=True)
    study = optuna.create_study(
        study_name=study_name, storage=f"sqlite:///{tmp_path}/sweeps/{study_name}.db", direction="maximize"
    )
    space = {"scheduler.lr": FloatDistribution(1e-5, 0.1, log=True)}
    study.add_trial(
        optuna.trial.create_trial(
            params={"scheduler.lr": 0.01},
            distributions=space,
            value=0.2,
            intermediate_values={1: 0.12, 2: 0.2},
        )
    )
    for lr in lrs:
        study.enqueue_trial({"scheduler.lr": lr})


# lr 0.05 reaches val top-1 ~0.16 after one epoch of 15 steps, lr 1e-5 stays at chance (~0.06): above and below
# the finished trial's 0.12 of enqueue()
PRUNING = [
    TEST_MODEL, "hydra/sweeper=optuna", "hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=1",
    "scheduler.lr=tag(log,interval(1e-5,0.1))", "engine.epochs=2", "engine.limit_train_batches=15",
]  # fmt: skip


def test_median_pruner_stops_a_bad_trial_among_parallel_ones(tmp_path):
    """Two trials at once in joblib workers: the bad one is pruned after epoch 1 (worse than the median of the
    finished trial), the good one completes. The pruned trial's MLflow run ends FINISHED tagged pruned with its
    checkpoints, the study records PRUNED, and the best is the completed one."""
    enqueue(tmp_path, "sweep_resnext_test", 0.05, 1e-5)
    out = run_sweep(tmp_path, *PRUNING, "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2", "hydra/launcher=joblib")
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(
        study_name="sweep_resnext_test", storage=f"sqlite:///{tmp_path}/sweeps/sweep_resnext_test.db"
    )
    assert {t.number: t.state.name for t in study.trials} == {0: "COMPLETE", 1: "COMPLETE", 2: "PRUNED"}
    assert list(study.trials[2].intermediate_values) == [1] and list(study.trials[1].intermediate_values) == [1, 2]
    assert "trial 2 pruned (scheduler.lr=1e-05): pruned by MedianPruner (Optuna trial 2): val_top1" in out.stdout

    parent, children = parent_and_children(tmp_path)
    by_trial = {c.data.tags["sweep_trial"]: c for c in children}
    pruned, complete = by_trial["2"], by_trial["1"]
    assert pruned.info.status == "FINISHED" and pruned.data.tags["pruned"] == "true"
    assert pruned.data.tags["stopped_epoch"] == "1" and "MedianPruner" in pruned.data.tags["stop_reason"]
    client = mlflow_client(tmp_path)
    assert len(client.get_metric_history(pruned.info.run_id, "val_top1")) == 1
    assert {a.path for a in client.list_artifacts(pruned.info.run_id, "checkpoints")} >= {
        "checkpoints/best.ckpt", "checkpoints/last.ckpt"
    }  # fmt: skip
    assert "pruned" not in complete.data.tags and len(client.get_metric_history(complete.info.run_id, "val_top1")) == 2
    assert (parent.data.metrics["trials_pruned"], parent.data.metrics["trials_finished"]) == (1, 1)
    assert parent.data.tags["best_run_id"] == complete.info.run_id
    assert parent.data.tags["pruner"] == "MedianPruner" and parent.data.tags["optuna_study"] == "sweep_resnext_test"
    assert study.best_value == pytest.approx(parent.data.metrics["best_val_top1"])


def test_grid_sampler_on_a_journal_file_runs_each_point_once(tmp_path):
    """Optuna's grid sampler over 2 learning rates × 2 batch sizes, the study in a journal file (as for a study
    shared over NFS): four trials although n_trials is 6, the two with a batch larger than the data fail (FAIL,
    FAILED children) and the sweep goes on; run again, the used-up grid is reported and nothing runs."""
    journal = tmp_path / "shared" / "grid.log"
    overrides = [
        TEST_MODEL, "hydra/sweeper=optuna", "hydra/sweeper/sampler=grid", f"hydra.sweeper.storage=journal:{journal}",
        "hydra.sweeper.n_trials=6", "scheduler.lr=choice(0.01,0.05)", "dataset.batch_size=choice(32,5000)",
    ]  # fmt: skip
    out = run_sweep(tmp_path, *overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name="sweep_resnext_test", storage=storage)
    points = {(t.params["scheduler.lr"], t.params["dataset.batch_size"]): t.state.name for t in study.trials}
    assert points == {(lr, b): "COMPLETE" if b == 32 else "FAIL" for lr in (0.01, 0.05) for b in (32, 5000)}
    parent, children = parent_and_children(tmp_path)
    states = {(c.data.params.get("scheduler.lr"), c.info.status) for c in children if c.info.status == "FINISHED"}
    assert states == {("0.01", "FINISHED"), ("0.05", "FINISHED")}
    assert sum(c.info.status == "FAILED" for c in children) == 2 and parent.data.metrics["trials_failed"] == 2
    again = run_sweep(tmp_path, *overrides)
    assert again.returncode == 0 and "is complete: 4 of 4 trials done (2 complete, 0 pruned, 2 failed)" in again.stdout
    assert "Its grid is used up." in again.stdout


def test_trials_on_submitit_processes_report_to_their_study(tmp_path):
    """Hydra's submitit launcher (here its local executor, a process per job as SLURM would start): the trial's
    identity reaches the job through the launcher, so the bad trial is pruned there as in-process."""
    enqueue(tmp_path, "sweep_resnext_test", 1e-5)
    out = run_sweep(tmp_path, *PRUNING, "hydra.sweeper.n_trials=2", "hydra/launcher=submitit_local")
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(
        study_name="sweep_resnext_test", storage=f"sqlite:///{tmp_path}/sweeps/sweep_resnext_test.db"
    )
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"]
    _, children = parent_and_children(tmp_path)
    assert {c.data.tags["sweep_trial"]: c.data.tags.get("pruned") for c in children} == {"1": "true"}


def sweep_config(tmp_path: Path, *overrides: str) -> DictConfig:
    """The composed config of ``python run.py -m <overrides>``, Hydra's part included."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", [f"paths.output_dir={tmp_path}", *overrides], return_hydra_config=True)


TPE = "sweeps=optuna_tpe"


@pytest.mark.parametrize(
    ("settings", "space", "message"),
    [
        (["hydra/sweeper=optuna"], [], "the Optuna sweep has nothing to search"),
        ([TPE, "hydra.sweeper.n_trials=0"], [], "hydra.sweeper.n_trials must be a whole number >= 1, got 0"),
        ([TPE, "hydra/sweeper/sampler=grid"], [], "the grid sampler needs a finite set of values, but"),
        ([TPE, "hydra.sweeper.direction=up"], [], "hydra.sweeper.direction must be max or min"),
        ([TPE, "+hydra.sweeper.pruner.n_startup=3"], [], "hydra.sweeper.pruner: TypeError:"),
        ([TPE, "hydra.sweeper.sampler._target_=os.system"], [], "a sampler must be one of optuna.samplers"),
        ([TPE, "hydra.sweeper.pruner._target_=os.system"], [], "a pruner must be one of optuna.pruners"),
        ([TPE], ["scheduler.lr=interval(0.1,0.01)"], "scheduler.lr=interval(0.1,0.01) is empty"),
        ([TPE], ["scheduler.lr=range(0.1,0.1,0.1)"], "scheduler.lr=range(0.1,0.1,0.1) holds no value"),
        ([TPE], ["scheduler.lr=interval(0.1"], "cannot read the search space"),
    ],
)
def test_bad_sweeper_settings_are_refused_with_one_line(tmp_path, settings, space, message):
    cfg = sweep_config(tmp_path, TEST_MODEL, *settings)
    with pytest.raises(ConfigError) as refused:
        plan_study(cfg.hydra.sweeper, space)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_bad_sweeper_setting_stops_the_command_before_any_run(tmp_path):
    """The command: one line, exit 2, and no MLflow run (the sweep callback checks before it opens one)."""
    out = run_sweep(tmp_path, TEST_MODEL, "sweeps=optuna_tpe", "hydra/sweeper/sampler=grid")
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip() and "INFO mlflow" not in line]
    assert len(lines) == 1 and lines[0].startswith("config error: the grid sampler needs a finite set of values")
    assert not (tmp_path / "mlflow" / "mlflow.db").exists() or not all_runs(mlflow_client(tmp_path))


def test_a_stored_study_of_the_other_direction_is_refused(tmp_path):
    (tmp_path / "sweeps").mkdir()
    optuna.create_study(
        study_name="digits_resnext_test_tpe", storage=f"sqlite:///{tmp_path}/sweeps/digits_resnext_test_tpe.db"
    )
    cfg = sweep_config(tmp_path, TEST_MODEL, "sweeps=optuna_tpe")
    with pytest.raises(
        ConfigError, match="was made to minimize, this sweep would maximize: choose another hydra.sweeper"
    ):
        plan_study(cfg.hydra.sweeper, [])


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "grid"])
def test_each_sampler_config_samples_the_space_and_moves_its_seed_on(tmp_path, sampler):
    """The sampler configs build, sample inside the space, and a continued study does not replay its samples."""
    space = ["scheduler.lr=range(0.01,0.1,0.01)" if sampler == "grid" else "scheduler.lr=tag(log,interval(1e-4,0.1))"]
    space.append("dataset.batch_size=choice(16,32)" if sampler != "cmaes" else "dataset.batch_size=range(16,48,16)")
    cfg = sweep_config(tmp_path, "hydra/sweeper=optuna", f"hydra/sweeper/sampler={sampler}")
    first = []
    for _ in range(2):  # two invocations of the same study
        plan = plan_study(cfg.hydra.sweeper, space)
        plan.study.sampler = plan.sampler
        trial = plan.study.ask(plan.space.distributions)
        plan.study.tell(trial, float(trial.params["scheduler.lr"]))
        first.append(trial.params)
    assert first[0] != first[1]
    for params in first:
        assert 1e-4 <= params["scheduler.lr"] <= 0.1 and params["dataset.batch_size"] in (16, 32)
    assert plan.counted == 1 and plan.planned == (18 if sampler == "grid" else 20)


def test_search_space_in_hydra_grammar_becomes_optuna_distributions():
    space = parse_search_space(
        ["a=range(0.01,0.1,0.01)", "b=int(interval(1,5))", "c=tag(log,interval(1e-4,0.1))", "d=choice(x,'y z',3)",
         "e=shuffle(range(3))", "f=range(5,1,-2)", "seed=7", "g=8,16"]
    )  # fmt: skip
    dists = space.distributions
    assert dists["a"] == FloatDistribution(0.01, 0.09, step=0.01)  # 9 values: stop excluded, counted in decimal
    assert dists["b"] == IntDistribution(1, 5) and dists["c"] == FloatDistribution(1e-4, 0.1, log=True)
    assert dists["d"] == CategoricalDistribution(["x", "y z", 3]) and sorted(dists["e"].choices) == [0, 1, 2]
    assert dists["f"] == IntDistribution(3, 5, step=2) and dists["g"] == CategoricalDistribution([8, 16])
    assert space.fixed == ["seed=7"]
    overrides = space.overrides({"a": 0.03, "b": 2, "c": 0.001, "d": "y z", "e": 1, "f": 5, "g": 16})
    assert overrides == ["seed=7", "a=0.03", "b=2", "c=0.001", "d=y\\ z", "e=1", "f=5", "g=16"]
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(overrides)}
    assert parsed["d"] == "y z" and parsed["c"] == 0.001


@pytest.mark.parametrize(
    "value", ["sqlite:////tmp/a b/it's.db", "journal:/x,y=(z).log", "a\\", "postgresql://u:p@h/db"]
)
def test_values_handed_to_trials_survive_hydra_parsing(value):
    (override,) = OverridesParser.create().parse_overrides([f"++hydra.job.env_set.X={quote(value)}"])
    assert override.value() == value
