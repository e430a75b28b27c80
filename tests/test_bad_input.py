"""Bad run specs fail before any work with one clear message, and leave no MLflow run behind."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from framework.config import ConfigError, build, check_config, command_line_problem
from framework.paths import PROJECT_ROOT
from framework.tasks import execute
from framework.tasks.eval import evaluate_checkpoint
from framework.tasks.train import train
from framework.tracking.spool import Spool
from tests.conftest import TEST_MODEL, all_runs, compose_config, empty_mlflow_db, mlflow_client

FAST_TINY = [TEST_MODEL, "dataset.image_size=16", "engine.epochs=1", "engine.limit_train_batches=2"]


def assert_no_runs(tmp_path: Path) -> None:
    db = tmp_path / "mlflow" / "mlflow.db"
    assert not db.exists() or all_runs(mlflow_client(tmp_path)) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["model=resnext5O"], "model=resnext5O: no such choice in config group 'model'; choices: conformer_ti, "),
        (["epochz=3"], "unknown config group or key 'epochz' (epochz=3): the config's top level has allowed_targets,"),
        (
            ["trainer.max_epochs=1"],  # the unknown part is the group, not its key
            "unknown config group or key 'trainer' (trainer.max_epochs=1): the config's top level has allowed_targets,",
        ),
        (
            ["engin.epochs=1"],
            "unknown config group or key 'engin' (engin.epochs=1). Did you mean 'engine'? Fix: engine.epochs=1",
        ),
        (
            ["engine.epoch=3"],
            "unknown config group or key 'engine.epoch' (engine.epoch=3). Did you mean 'engine.epochs'? "
            "Fix: engine.epochs=3",
        ),
        (
            ["-m", "tracking.experimnt=a,b"],
            "Did you mean 'tracking.experiment_name'? Fix: tracking.experiment_name=a,b",
        ),
        (["-m", "scheduler.lrr=tag(log, interval(0.01, 1))"], "Did you mean 'scheduler.lr'?"),
        (["engine.epochs=[1"], "cannot read the override 'engine.epochs=[1': "),
        (["hydra/sweeper=optunaa"], "hydra/sweeper=optunaa: no such choice in config group 'hydra/sweeper'; choices: "),
    ],
)
def test_a_command_line_hydra_cannot_compose_gets_one_line(argv, message):
    """What Hydra would report in several lines (exit 1) is found before it runs, as one line."""
    problem = command_line_problem(argv, PROJECT_ROOT / "conf")
    assert problem is not None and "\n" not in problem and message in problem


def test_a_command_line_that_composes_has_no_problem():
    argv = ["-m", "sweeps=optuna_tpe", "model=resnext_test,resnext50", "hydra.run.dir=/tmp/x", "~seed", "+x.y=1"]
    assert command_line_problem(argv, PROJECT_ROOT / "conf") is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dataset.batch_size=0", r"dataset.batch_size must be > 0, got 0"),
        ("dataset.eval_batch_size=-8", r"dataset.eval_batch_size must be > 0, got -8"),
        ("scheduler.lr=0", r"scheduler.lr must be > 0, got 0"),
        ("scheduler.lr=-0.1", r"scheduler.lr must be > 0, got -0.1"),
        ("engine.epochs=0", r"engine.epochs must be > 0"),
        (
            "dataset.image_size=abc",
            r"dataset.image_size='abc' has the wrong type: expected an integer .*image_size: int",
        ),
        ("+optimizer.momentun=0.5", r"unknown key 'optimizer.momentun'.*Did you mean 'optimizer.momentum'"),
        ("+engine.epoch=3", r"unknown key 'engine.epoch'.*Did you mean 'engine.epochs'"),
        ("dataset.batch_size=5000", r"dataset.batch_size=5000 is larger than the train split"),
        (
            "+model.depth=3",
            r"unknown key 'model.depth': framework.models.create_model takes name, pretrained, pretrained_head, ",
        ),
        ("+model.drop_rte=0.1", r"unknown key 'model.drop_rte'.*Did you mean 'model.drop_rate'"),
        ("model.drop_rate=abc", r"model.drop_rate='abc' has the wrong type: expected a number"),
        ("seed=-1", r"seed must be in \[0, 4294967296\), got -1"),
        ("engine.clip_grad_norm=0", r"engine.clip_grad_norm must be > 0, got 0"),
        ("engine.ema_decay=1.5", r"engine.ema_decay must be in \(0, 1\), got 1.5"),
        ("hardware=gpu", r"hardware.device_target=GPU: this MindSpore build \(.*\) cannot use GPU devices"),
        ("dataset.val_fraction=1.5", r"dataset.val_fraction must be in \(0, 1\), got 1.5"),
        ("dataset=folder", r"dataset.path: required but not set .*Fix: add dataset.path=<value>"),
        (
            "dataset.num_parallel_workers=0",
            r"dataset.num_parallel_workers must be > 0, got 0. Fix: dataset.num_parallel_workers=<number > 0>",
        ),
        ("model.name=resnet9", r"unknown model 'resnet9' \(model.name\); registered models: conformer_test, .*"),
        ("engine.epochs=2.5", r"engine.epochs=2.5 has the wrong type: expected an integer .*Trainer takes epochs: int"),
        ("engine.eval_ema=maybe", r"engine.eval_ema='maybe' has the wrong type: expected true/false"),
        ("seed=x", r"seed='x' has the wrong type: expected an integer"),
        ("resume=3", r"resume=3 has the wrong type: expected a string or null"),
        ("optimizer.momentum=1.5", r"optimizer.momentum must be in \[0, 1\), got 1.5"),
        ("loss.label_smoothing=-0.1", r"loss.label_smoothing must be in \[0, 1\), got -0.1"),
        ("optimizer.weight_decay=-1e-4", r"optimizer.weight_decay must be >= 0, got -0.0001"),
        ("engine.checkpoint_every_n_steps=-1", r"engine.checkpoint_every_n_steps must be >= 0, got -1"),
        ("engine.max_nonfinite_steps=0", r"engine.max_nonfinite_steps must be > 0, got 0"),
        ("+epochz=3", r"unknown top-level key 'epochz' \(\+epochz=3\): nothing reads it"),
        ("model._target_=os.system", r"model._target_='os.system' is not allowed: only framework.\*, mindspore.\*"),
        ("dataset.mixup._target_=subprocess.run", r"dataset.mixup._target_='subprocess.run' is not allowed"),
        ("allowed_targets=os.system", r"allowed_targets must be a list of names"),
        ("hardware.device_target=TPU", r"hardware.device_target must be one of 'CPU', 'GPU', 'Ascend', got 'TPU'"),
        (
            "optimizer.name=adamm",
            r"^optimizer.name must be one of 'sgd', 'momentum', 'adamw', 'rmsprop_tf', 'sgd_agc', got 'adamm'. "
            r"Fix: optimizer.name=adamw$",
        ),
        ("dataset.augment.hflip=1.5", r"^dataset.augment.hflip must be in \[0, 1\], got 1.5. Fix: "),
        (
            "engine.recompute=[layer]",
            r"^engine.recompute: 'layer' matches no cell name in full \(e.g. conv1, .*\). Fix: ",
        ),
        ("engine.recompute=['(']", r"^engine.recompute: '\(' is no regular expression"),
    ],
)
def test_bad_values_fail_before_training(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train(compose_config([override], tmp_path))
    assert_no_runs(tmp_path)


ANY = "<one of those>"


@pytest.mark.parametrize(
    ("override", "choices", "fix"),
    [
        ("engine.amp_level=O5", "'O0', 'O1', 'O2', 'O3'", ANY),
        ("dataset.mixup.mode=pairs", "'batch', 'pair', 'elem'", "pair"),
        ("dataset.interpolation=bicubc", "'bilinear', 'bicubic', 'nearest'", "bicubic"),
        ("lr_scaling.rule=cubic", "'none', 'linear', 'sqrt'", ANY),
        ("engine.monitor_mode=maximum", "'max', 'min'", "max"),
        ("dataset.augment.re_mode=noise", "'pixel', 'rand', 'const'", ANY),
        ("optimizer.name=rmsprop", "'sgd', 'momentum', 'adamw', 'rmsprop_tf', 'sgd_agc'", "rmsprop_tf"),
    ],
)
def test_a_choice_outside_its_literal_is_one_line_from_the_schema(tmp_path, monkeypatch, override, choices, fix):
    """The schema check alone refuses it, building nothing, in one line naming the key, the choices and the fix;
    a typo close to a choice gets that choice as the fix."""
    cfg = compose_config([override], tmp_path)
    monkeypatch.setattr("framework.config.instantiate", lambda *args, **kwargs: pytest.fail("built an object"))
    key, value = override.split("=")
    with pytest.raises(ConfigError) as error:
        check_config(cfg)
    assert str(error.value) == f"{key} must be one of {choices}, got '{value}'. Fix: {key}={fix}"


def test_a_class_count_the_digits_do_not_have_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.num_classes=100 but digits has 10. Fix: dataset.num_classes=10"):
        build(compose_config(["dataset.num_classes=100"], tmp_path), "dataset")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dataset.augment.hflip=-0.5"], "dataset.augment.hflip must be in [0, 1], got -0.5"),
        (["dataset.mixup.prob=2.0"], "dataset.mixup.prob must be in [0, 1], got 2.0"),
        (["dataset.mixup.cutmix_alpha=-1.0"], "dataset.mixup.cutmix_alpha must be >= 0, got -1.0"),
        (["dataset.crop_pct=1.5"], "dataset.crop_pct must be in (0, 1], got 1.5"),
        (["dataset.std=[0.2,0.2,0.0]"], "dataset.std[2] must be > 0, got 0.0"),
        (["optimizer=adamw", "optimizer.eps=0.0"], "optimizer.eps must be > 0, got 0.0"),
        (["optimizer=rmsprop_tf", "optimizer.rmsprop_decay=1.0"], "optimizer.rmsprop_decay must be in [0, 1), got 1.0"),
        (["optimizer=adamw", "optimizer.betas=[0.9,1.5]"], "optimizer.betas[1] must be in [0, 1), got 1.5"),
        (["scheduler=exponential", "scheduler.decay_rate=0.0"], "scheduler.decay_rate must be in (0, 1], got 0.0"),
        (["scheduler=cosine_annealing", "scheduler.t_max=0"], "scheduler.t_max must be > 0, got 0"),
        (["lr_scaling.reference_batch_size=0"], "lr_scaling.reference_batch_size must be > 0, got 0"),
        (["engine.loss_scale_factor=1"], "engine.loss_scale_factor must be > 1, got 1"),
        (["engine.loss_scale_window=0"], "engine.loss_scale_window must be > 0, got 0"),
    ],
)
def test_ranges_once_checked_only_when_built_are_refused_by_the_schema(tmp_path, overrides, message):
    """These passed the schema check before and failed only inside their constructor, once built."""
    with pytest.raises(ConfigError) as error:
        check_config(compose_config(overrides, tmp_path))
    assert str(error.value).startswith(f"{message}. Fix: ")


def test_missing_checkpoint(tmp_path):
    cfg = compose_config(["task=eval", f"ckpt={tmp_path / 'nope.ckpt'}"], tmp_path)
    with pytest.raises(ConfigError, match="no such checkpoint file"):
        evaluate_checkpoint(cfg)
    assert_no_runs(tmp_path)


def test_eval_without_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="this task needs a checkpoint: ckpt="):
        evaluate_checkpoint(compose_config(["task=eval"], tmp_path))
    assert_no_runs(tmp_path)


def test_unknown_mlflow_run_checkpoint(tmp_path):
    cfg = compose_config(["task=eval", "ckpt=runs:/0123456789abcdef/checkpoints/best.ckpt"], tmp_path)
    with pytest.raises(ConfigError, match="cannot fetch it from"):
        evaluate_checkpoint(cfg)


def test_cli_reports_config_error_and_exit_code(tmp_path):
    """`python run.py` prints one line naming the key and the fix, and exits 2."""
    proc = subprocess.run(
        [
            sys.executable,
            "run.py",
            "dataset.batch_size=0",
            f"tracking.local_store={tmp_path / 'mlflow'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    expected = "config error: dataset.batch_size must be > 0, got 0. Fix: dataset.batch_size=<number > 0>"
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_no_runs(tmp_path)


def test_mindspores_compile_cache_is_refused(tmp_path):
    """MS_COMPILER_CACHE_ENABLE=1 would let run.py execute graphs cached for another model: one line, exit 2."""
    command = [sys.executable, "run.py", f"tracking.local_store={tmp_path / 'mlflow'}", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "MS_COMPILER_CACHE_ENABLE": "1", "MS_COMPILER_CACHE_PATH": str(tmp_path / "cache")}
    proc = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("config error: MS_COMPILER_CACHE_ENABLE=1 (environment): ") and "Fix: unset" in line
    assert_no_runs(tmp_path)


def test_an_unwritable_compile_cache_folder_is_one_line_before_anything_runs(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run_py(tmp_path, f"hardware.compile_cache={blocker / 'cache'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line == (
        f"config error: hardware.compile_cache={blocker / 'cache'}: {blocker} is not a folder this user can write. "
        "Fix: a writable folder, or hardware.compile_cache=null to compile every time"
    )
    assert_no_runs(tmp_path)


def test_target_from_a_yaml_outside_the_allowlist_is_never_imported(tmp_path):
    """A model config in a user's config folder naming ``os.system`` fails the check; the command never runs."""
    marker = tmp_path / "pwned"
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "evil.yaml").write_text(
        f"_target_: os.system\n_args_: ['touch {marker}']\nname: evil\n"
    )
    proc = run_py(tmp_path, "model=evil", f"hydra.searchpath=[file://{tmp_path / 'conf'}]")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error: model._target_='os.system' is not allowed" in proc.stderr
    assert not marker.exists()
    assert_no_runs(tmp_path)


def test_allowlisted_target_passes_the_check(tmp_path):
    """Naming a target in allowed_targets is how a trusted third-party class gets in."""
    cfg = compose_config(["model._target_=collections.OrderedDict"], tmp_path)
    with pytest.raises(ConfigError, match="model._target_='collections.OrderedDict' is not allowed"):
        check_config(cfg)
    check_config(compose_config(["model._target_=collections.OrderedDict", "allowed_targets=[collections.]"], tmp_path))
    with pytest.raises(ConfigError, match="model.extra._target_='collections.OrderedDict' is not allowed"):
        check_config(compose_config(["+model.extra._target_=collections.OrderedDict"], tmp_path))  # nested too


@pytest.mark.slow  # trains a job first (the train task, ~6 s)
def test_resume_from_a_truncated_checkpoint_is_refused_and_the_run_kept(tmp_path):
    """A damaged resume file stops the job before anything is built; the finished run and its files are untouched."""
    result = train(compose_config([*FAST_TINY], tmp_path))
    (run,) = all_runs(mlflow_client(tmp_path))
    last = result.checkpoints["last"]
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(last.read_bytes()[:-10_000])
    before = last.read_bytes()
    with pytest.raises(ConfigError, match=f"resume={damaged}: cannot read checkpoint {damaged}"):
        train(compose_config([*FAST_TINY, f"resume={damaged}"], tmp_path))
    assert last.read_bytes() == before
    (after,) = all_runs(mlflow_client(tmp_path))
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"


@pytest.mark.slow  # trains a job first (the train task, ~6 s)
def test_resume_auto_with_only_damaged_checkpoints_is_refused(tmp_path):
    train(compose_config([*FAST_TINY], tmp_path))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:-10_000])
    (tmp_path / "run" / "checkpoints" / "best.ckpt").unlink()
    with pytest.raises(ConfigError, match="resume=auto: no intact training checkpoint in"):
        train(compose_config([*FAST_TINY, "resume=auto"], tmp_path))
    assert last.exists()  # kept for inspection, not overwritten by a fresh start


def test_new_job_in_a_folder_with_undelivered_tracking_records_is_refused(tmp_path):
    """Records that never reached MLflow are not thrown away by a new job in the same folder."""
    spool = Spool(tmp_path / "run" / "tracking")
    spool.set_state(uri="http://127.0.0.1:9", experiment="classification", spool_id="x", run_name="old")
    spool.append({"kind": "create", "run_name": "old", "tags": {}})
    with pytest.raises(ConfigError, match=r"holds tracking records of an earlier job .*task=sync run_dir="):
        train(compose_config([*FAST_TINY], tmp_path))
    assert Spool(tmp_path / "run" / "tracking").pending()  # still there
    assert_no_runs(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], r"task=sync needs run_dir=<the training job's folder>"),
        (["run_dir=/nonexistent/job"], r"run_dir=/nonexistent/job: no tracking records in /nonexistent/job/tracking"),
        # the run spec is checked before sync runs too
        (["run_dir=/nonexistent/job", "+tracking.experiment=a"], r"unknown key 'tracking.experiment'.*Did you mean"),
        (["run_dir=3"], r"^run_dir=3 has the wrong type: expected a string or null"),
    ],
)
def test_sync_without_records(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        execute(compose_config(["task=sync", *overrides], tmp_path))  # checked, then synced


def run_py(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "run.py", *overrides, f"tracking.local_store={tmp_path / 'mlflow'}"]
    command.append(f"hydra.run.dir={tmp_path / 'run'}")
    return subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)


def snapshot(tmp_path: Path) -> list[tuple]:
    """Every run's status, end time, params, metrics, tags and artifact list: what a command must not change."""
    client = mlflow_client(tmp_path)
    return sorted(
        (r.info.run_id, r.info.status, r.info.end_time, r.data.params, r.data.metrics, r.data.tags,
         sorted(a.path for a in client.list_artifacts(r.info.run_id, "config")))
        for r in all_runs(client)
    )  # fmt: skip


@pytest.fixture
def finished_job(tmp_path: Path):
    """A finished 1-epoch training run of the test model, and the store's contents afterwards."""
    result = train(compose_config([*FAST_TINY], tmp_path))
    return result, snapshot(tmp_path)


@pytest.mark.slow  # trains a job first (the train task, ~6 s)
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=efficientnet_b2"], r"resume=.*: the checkpoint was written by model resnext_test \(10 classes\)"),
        ([TEST_MODEL, "engine.ema_decay=0.99"], r"does not fit this run's training state: it lacks ema\."),
        ([TEST_MODEL, "optimizer=adamw"], r"does not fit this run's training state: it lacks "),
    ],
)
def test_resume_that_does_not_fit_is_refused_and_the_run_untouched(tmp_path, finished_job, overrides, message):
    """Another model, another optimizer, EMA added: refused with one line before the finished run is touched."""
    result, before = finished_job
    same_run = [o for o in FAST_TINY if o != TEST_MODEL]
    with pytest.raises(ConfigError, match=message):
        train(compose_config([*same_run, *overrides, f"resume={result.checkpoints['last']}"], tmp_path))
    assert snapshot(tmp_path) == before


@pytest.mark.slow  # trains a job first (the train task, ~6 s)
def test_resuming_a_finished_run_does_nothing_unless_given_more_epochs(tmp_path, finished_job):
    result, before = finished_job
    again = train(compose_config([*FAST_TINY, "resume=auto"], tmp_path))
    assert snapshot(tmp_path) == before, "the finished run is left as it was"
    assert again.history == result.history
    longer = train(compose_config([*FAST_TINY, "resume=auto", "engine.epochs=2"], tmp_path))
    assert [h["epoch"] for h in longer.history] == [1, 2]
    (run,) = all_runs(mlflow_client(tmp_path))
    assert run.info.status == "FINISHED" and run.info.run_id == before[0][0]
    assert len(mlflow_client(tmp_path).get_metric_history(run.info.run_id, "val_top1")) == 2


@pytest.mark.slow  # trains a job first (the train task, ~6 s)
def test_runs_uri_continues_from_the_newest_job_of_the_run(tmp_path, finished_job):
    """``resume=runs:/<id>`` from a new folder continues the run there; the same command again finds that folder's
    newer state (the run's ``run_dir`` follows the newest job), so it has nothing left to do."""
    result, before = finished_job
    run_id = before[0][0]
    command = [*FAST_TINY, f"resume=runs:/{run_id}", "engine.epochs=2"]
    longer = train(compose_config([*command, f"paths.run_dir={tmp_path / 'second'}"], tmp_path))
    assert [h["epoch"] for h in longer.history] == [1, 2]
    after = snapshot(tmp_path)
    again = train(compose_config([*command, f"paths.run_dir={tmp_path / 'third'}"], tmp_path))
    assert again.history == longer.history and snapshot(tmp_path) == after
    (run,) = all_runs(mlflow_client(tmp_path))
    assert run.data.tags["run_dir"] == str(tmp_path / "second")


@pytest.mark.slow  # trains a job first (the train task, ~6 s)
@pytest.mark.parametrize("kind", ["png", "truncated", "other model"])
def test_eval_of_a_file_that_is_no_fitting_checkpoint_is_one_line(tmp_path, finished_job, kind):
    result, before = finished_job
    last = result.checkpoints["last"]
    if kind == "png":
        path = tmp_path / "photo.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
        message = r"ckpt=.*photo.png: cannot read checkpoint .*Pass a .ckpt written by this project"
    elif kind == "truncated":
        path = tmp_path / "cut.ckpt"
        path.write_bytes(last.read_bytes()[:-20_000])
        message = r"ckpt=.*cut.ckpt: cannot read checkpoint"
    else:
        path, message = (
            last,
            r"ckpt=.*: the checkpoint was written by model resnext_test \(10 classes\); this command builds "
            "efficientnet_b2. Select its model",
        )
    model = ["model=efficientnet_b2"] if kind == "other model" else [TEST_MODEL]
    with pytest.raises(ConfigError, match=message):
        evaluate_checkpoint(compose_config(["task=eval", f"ckpt={path}", "dataset.image_size=16", *model], tmp_path))
    assert snapshot(tmp_path) == before


@pytest.fixture
def read_only_folder(tmp_path: Path):
    """``(source, view)``: a folder and a read-only view of it (a read-only bind mount as root, who may write
    anywhere else; mode 0555 for any other user)."""
    source, view = tmp_path / "source", tmp_path / "view"
    source.mkdir()
    if os.geteuid() != 0:
        source.chmod(0o555)
        yield source, source
        source.chmod(0o755)
        return
    view.mkdir()
    for command in (["mount", "--bind", str(source), str(view)], ["mount", "-o", "remount,ro,bind", str(view)]):
        if subprocess.run(command, capture_output=True).returncode != 0:
            subprocess.run(["umount", str(view)], capture_output=True)
            pytest.skip("no read-only bind mount here (root in a container without mount rights)")
    yield source, view
    subprocess.run(["umount", str(view)], check=True)


def test_outputs_folder_that_cannot_be_written_is_one_line(read_only_folder):
    _, view = read_only_folder
    proc = subprocess.run(
        [sys.executable, "run.py", TEST_MODEL, f"paths.output_dir={view / 'outputs'}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"config error: the job's folder {view / 'outputs'}/runs/")
    assert f"{view} is read-only for this user. Fix: paths.output_dir=<a writable folder>" in lines[0]


def test_read_only_mlflow_store_is_named_before_any_run(tmp_path, read_only_folder):
    source, view = read_only_folder
    (source / "mlflow").mkdir()
    shutil.copy(empty_mlflow_db(), source / "mlflow" / "mlflow.db")  # an existing store, seen read-only
    cfg = compose_config([*FAST_TINY, f"tracking.local_store={view / 'mlflow'}"], tmp_path)
    expected = f"the MLflow store {view / 'mlflow'}/mlflow.db cannot be written ({view}"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        train(cfg)


def test_a_mistyped_group_name_gets_a_did_you_mean(tmp_path):
    proc = run_py(tmp_path, "optimzer=adamw")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "config error: unknown config group or key 'optimzer' (optimzer=adamw). Did you mean 'optimizer'? "
        "Fix: optimizer=adamw"
    )


@pytest.mark.parametrize(
    ("model", "size", "message"),
    [
        ("conformer_ti", 24, "conformer_ti needs an image size that is a multiple of 16"),
        ("nasnet_a_mobile", 2, "nasnet_a_mobile needs images of at least 3 px"),
    ],
)
def test_image_sizes_a_model_cannot_use_are_refused(tmp_path, model, size, message):
    with pytest.raises(ConfigError, match=f"dataset.image_size={size}: {message}"):
        train(compose_config([f"model={model}", f"dataset.image_size={size}"], tmp_path))
    assert_no_runs(tmp_path)


def test_an_image_size_a_model_runs_poorly_on_is_warned(tmp_path, capsys):
    with pytest.raises(ConfigError, match="is larger than the train split"):  # to stop right after the warning
        train(compose_config(["model=efficientnet_b2", "dataset.image_size=7", "dataset.batch_size=5000"], tmp_path))
    assert "warning: dataset.image_size=7: efficientnet_b2 downsamples by 32: at 7 px" in capsys.readouterr().out
