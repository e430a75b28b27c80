"""Faults a long training job meets: a diverging loss, stop signals, kill -9 at random points, damaged checkpoints.

Each job here is a real ``python run.py`` process (or the train task in-process) on digits at 16 px.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from framework.config import build
from framework.engine.checkpoint import read_checkpoint
from framework.engine.trainer import TrainingDiverged
from framework.launch.msrun import free_port
from framework.paths import PROJECT_ROOT
from framework.tasks.common import resolve_resume
from framework.tasks.train import train
from framework.tracking.spool import Spool
from tests.conftest import FAST, TEST_MODEL, all_runs, compose_config, mlflow_client

pytestmark = pytest.mark.slow  # end-to-end jobs: python -m pytest -m "not slow" skips them

# 3 epochs of 6 steps, training state every 2 steps (and at each epoch's end)
JOB = [TEST_MODEL, "dataset.image_size=16", "engine.epochs=3", "engine.limit_train_batches=6"]
JOB += ["engine.checkpoint_every_n_steps=2"]
STEPS, INTERVAL = 18, 2
STEP_LINE = re.compile(r"^epoch \d+/\d+ step (\d+)/\d+ ")


def start_job(store: Path, run_dir: Path, *overrides: str) -> subprocess.Popen:
    command = [sys.executable, "run.py", *JOB, f"hydra.run.dir={run_dir}", f"tracking.local_store={store}", *overrides]
    return subprocess.Popen(
        command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
    )


def wait_for_step(job: subprocess.Popen, step: int) -> list[str]:
    """Read the job's output until it reports ``step`` done; returns the lines read."""
    lines = []
    for line in job.stdout:
        lines.append(line)
        match = STEP_LINE.match(line)
        if match and int(match.group(1)) >= step:
            return lines
    job.wait()
    raise AssertionError(f"job ended (status {job.returncode}) before step {step}: {job.stderr.read()[-3000:]}")


def last_step(lines: list[str]) -> int:
    steps = [int(m.group(1)) for m in map(STEP_LINE.match, lines) if m]
    return max(steps, default=0)


def resumed_step(output: str) -> int:
    """The step a ``resume=auto`` job went on from (0: it found no checkpoint and started over)."""
    match = re.search(r"resumed from \S+ at step (\d+)", output)
    return int(match.group(1)) if match else 0


def finished_run(store: Path):
    (run,) = all_runs(mlflow_client(store.parent))
    assert run.info.status == "FINISHED", run.info.status
    return run


def loss_curve(store: Path, run) -> list[tuple[int, float]]:
    history = mlflow_client(store.parent).get_metric_history(run.info.run_id, "train_loss")
    return sorted((m.step, m.value) for m in history)


def run_straight(root: Path, *overrides: str, updates: int = STEPS) -> dict:
    """The job run once without faults: its final weights, val metrics and loss per optimizer update."""
    job = start_job(root / "mlflow", root / "run", *overrides)
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-3000:]
    run = finished_run(root / "mlflow")
    curve = loss_curve(root / "mlflow", run)
    assert [step for step, _ in curve] == list(range(1, updates + 1))
    return {"weights": run.data.tags["weights_sha256"], "val_top1": run.data.metrics["val_top1"], "curve": curve}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    return run_straight(tmp_path_factory.mktemp("straight"))


def kill_points_rng() -> random.Random:
    """Random kill points that a failure can repeat: the seed is printed (pytest shows it with the failure), and
    KILL_POINTS_SEED=<seed> runs the same points again."""
    seed = int(os.environ.get("KILL_POINTS_SEED", random.SystemRandom().randrange(2**32)))
    print(f"kill points seed {seed}: repeat with KILL_POINTS_SEED={seed}")
    return random.Random(seed)


def assert_same_as_straight(store: Path, straight: dict) -> None:
    run = finished_run(store)
    assert run.data.tags["weights_sha256"] == straight["weights"]
    assert run.data.metrics["val_top1"] == straight["val_top1"]
    assert loss_curve(store, run) == straight["curve"]  # every step logged once, with the same loss


def test_kill9_and_sigterm_at_random_points_then_resume_auto_ends_as_a_straight_run(tmp_path, straight):
    """Three kill -9s at random steps (and random moments within them), then a SIGTERM. Each restart with
    ``resume=auto`` goes on from the newest checkpoint: after kill -9 losing at most one checkpoint interval,
    after SIGTERM nothing (the step in progress ends, its state is saved, the run is KILLED and the command to
    continue is printed). The end is bit-identical to the straight run, with every step logged once."""
    store, run_dir = tmp_path / "mlflow", tmp_path / "run"
    rng = kill_points_rng()
    targets = sorted(rng.sample(range(2, STEPS - 2), 4))
    done = 0
    for target in targets[:3]:
        job = start_job(store, run_dir, "resume=auto")
        lines = wait_for_step(job, max(target, done + 1))
        assert done - INTERVAL <= resumed_step("".join(lines)) <= done + 1  # at most one interval lost
        time.sleep(rng.uniform(0.0, 0.05))  # about one step of the test model: inside a step or a save
        job.kill()  # SIGKILL: no handler, no cleanup
        lines += job.stdout.readlines()
        job.wait()
        done = last_step(lines)

    job = start_job(store, run_dir, "resume=auto")
    lines = wait_for_step(job, max(targets[3], done + 1))
    assert done - INTERVAL <= resumed_step("".join(lines)) <= done + 1
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 143, err[-3000:]  # 128 + SIGTERM, as shells expect
    stopped = re.search(r"stopped by SIGTERM at step (\d+) \(epoch \d\); training state saved in (\S+\.ckpt)", err)
    assert stopped, err[-3000:]
    _, meta = read_checkpoint(stopped.group(2), meta_only=True)
    assert meta["micro_step"] == int(stopped.group(1)) >= last_step(lines)  # nothing done is lost
    (run,) = all_runs(mlflow_client(tmp_path))
    assert run.info.status == "KILLED"
    command = re.search(r"continue it with: (python run\.py .*)", err).group(1)
    assert f"resume=auto hydra.run.dir={run_dir}" in command

    resumed = subprocess.run(
        [sys.executable, *shlex.split(command)[1:]], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_step(resumed.stdout) == int(stopped.group(1))
    assert "did not take" not in resumed.stderr, resumed.stderr[-3000:]
    assert_same_as_straight(store, straight)


ACCUMULATED = "engine.accumulation_steps=2"  # 6 micro-steps per epoch = 3 updates; state every 2 updates


def test_sigterm_inside_an_accumulation_stops_at_its_end_and_resumes_exactly(tmp_path, tmp_path_factory):
    """With gradient accumulation a stop waits for the update that ends the accumulation in progress (its partial
    gradient sum is not part of the saved state), and the resumed job ends bit-identical to a straight one."""
    straight = run_straight(tmp_path_factory.mktemp("straight_accumulated"), ACCUMULATED, updates=STEPS // 2)
    store, run_dir = tmp_path / "mlflow", tmp_path / "run"
    job = start_job(store, run_dir, ACCUMULATED)
    wait_for_step(job, 9)  # micro-step 9, the first half of update 5, is done: the signal comes mid-accumulation
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 143, err[-3000:]
    stopped = re.search(r"stopped by SIGTERM at step (\d+) \(epoch \d\); training state saved in (\S+\.ckpt)", err)
    assert stopped and int(stopped.group(1)) % 2 == 0 and int(stopped.group(1)) >= 10, err[-3000:]
    _, meta = read_checkpoint(stopped.group(2), meta_only=True)
    assert meta["micro_step"] == int(stopped.group(1))
    resumed = start_job(store, run_dir, ACCUMULATED, "resume=auto")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert resumed_step(out) == int(stopped.group(1))
    assert_same_as_straight(store, straight)


def test_a_damaged_newest_checkpoint_is_passed_over(tmp_path, capsys):
    """resume=auto warns about a corrupt last.ckpt and continues from the newest intact periodic checkpoint."""
    overrides = [*FAST, "engine.epochs=1", "engine.limit_train_batches=6", "engine.checkpoint_every_n_steps=2"]
    cfg = compose_config(overrides, tmp_path)
    train(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[:-50_000])
    resume = resolve_resume("auto", build(cfg, "tracking"), tmp_path / "run", tmp_path / "download")
    assert resume.path == checkpoints / "step_00000004.ckpt" and resume.state.micro_step == 4
    assert resume.run_id == all_runs(mlflow_client(tmp_path))[0].info.run_id
    assert "passed over cannot read checkpoint" in capsys.readouterr().out


def test_nonfinite_loss_stops_the_run_with_the_last_good_checkpoint(tmp_path):
    """The lr jumps ×1e37 after epoch 1: the loss turns NaN/Inf, those updates are skipped, and after
    ``max_nonfinite_steps`` of them the run is FAILED with last.ckpt still the finite epoch-1 state."""
    overrides = [*FAST, "engine.epochs=3", "engine.limit_train_batches=4", "engine.max_nonfinite_steps=3"]
    overrides += ["scheduler=multistep", "scheduler.milestones=[1]", "scheduler.gamma=1e37"]
    pattern = (
        r"train loss was (nan|inf) for 3 consecutive steps \(steps \d+-\d+, epoch 2; engine.max_nonfinite_steps=3\); "
        r"their updates were skipped. Last good checkpoint: \S+last.ckpt"
    )
    with pytest.raises(TrainingDiverged, match=pattern):
        train(compose_config(overrides, tmp_path))
    (run,) = all_runs(mlflow_client(tmp_path))
    assert run.info.status == "FAILED"
    params, meta = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert meta["micro_step"] == 4  # the end of epoch 1, before the streak
    assert all(np.isfinite(p.asnumpy()).all() for p in params.values())
    client = mlflow_client(tmp_path)
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    # the charts keep their scale: bad values are left out (epoch 1's 4 steps and the first of epoch 2, whose loss
    # comes before its ×1e37 update, are finite)
    assert len(losses) == 5 and all(np.isfinite(losses))
    assert [m.value for m in client.get_metric_history(run.info.run_id, "nonfinite_values")] == [1, 2, 3]


class TrackingServer:
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite store, which the test stops and starts again."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.folder}/db.sqlite",
        ]
        command += ["--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--workers", "1"]
        log = open(self.folder / "server.log", "a")  # noqa: SIM115 (the server writes it while it runs)
        self.process = subprocess.Popen(command, cwd=self.folder, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                assert self.process.poll() is None, (self.folder / "server.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow server did not come up"
                time.sleep(0.5)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=60)


def test_tracking_server_down_mid_run_and_at_start_loses_and_repeats_no_metric(tmp_path):
    """Job A loses its server after step 3 and ends without it (``task=sync`` delivers the rest); job B starts with
    the server down and finds it back during training. Both runs end FINISHED with every step logged exactly once."""
    (tmp_path / "server").mkdir()
    server = TrackingServer(tmp_path / "server")  # from this environment, as users start it
    server.start()
    tracked = f"tracking.uri={server.uri}"
    try:
        job_a = start_job(tmp_path / "unused", tmp_path / "a", tracked)
        wait_for_step(job_a, 3)
        job_a.send_signal(signal.SIGSTOP)  # the server goes away between two steps
        server.stop()
        job_a.send_signal(signal.SIGCONT)
        _, err_a = job_a.communicate(timeout=600)
        assert job_a.returncode == 0, err_a[-3000:]
        assert f"MLflow at {server.uri} does not answer" in err_a
        assert f"python run.py task=sync run_dir={tmp_path / 'a'}" in err_a

        job_b = start_job(tmp_path / "unused", tmp_path / "b", tracked)
        wait_for_step(job_b, 3)
        job_b.send_signal(signal.SIGSTOP)
        server.start()  # back while job B trains
        job_b.send_signal(signal.SIGCONT)
        out_b, err_b = job_b.communicate(timeout=600)
        assert job_b.returncode == 0, err_b[-3000:]
        assert f"MLflow at {server.uri} answers again" in out_b

        sync = subprocess.run(
            [sys.executable, "run.py", "task=sync", f"run_dir={tmp_path / 'a'}"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert sync.returncode == 0, sync.stderr[-3000:]

        client = MlflowClient(server.uri)
        for job in ("a", "b"):
            run_id = json.loads((tmp_path / job / "tracking" / "state.json").read_text())["run_id"]
            run = client.get_run(run_id)
            assert run.info.status == "FINISHED"
            steps = sorted(m.step for m in client.get_metric_history(run_id, "train_loss"))
            assert steps == list(range(1, STEPS + 1))
            assert sorted(m.step for m in client.get_metric_history(run_id, "val_top1")) == [6, 12, 18]
            assert run.data.params["engine.checkpoint_every_n_steps"] == "2"
            artifacts = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
            assert artifacts == {"checkpoints/best.ckpt", "checkpoints/last.ckpt"}
            assert {"lr_schedule.png", "config", "data"} <= {a.path for a in client.list_artifacts(run_id)}
    finally:
        if server.process.poll() is None:
            server.stop()


def test_spool_survives_a_torn_write_and_drops_only_undelivered_metrics_after_the_resume_step(tmp_path):
    folder = tmp_path / "tracking"
    spool = Spool(folder)
    spool.set_state(run_id="r1")
    for step in range(1, 7):
        spool.append({"kind": "metrics", "micro_step": step, "items": [["train_loss", 1.0 / step, 0, step]]})
    spool.append({"kind": "tags", "items": {"a": "b"}})
    spool.mark_delivered(2)
    with open(folder / "records.jsonl", "a") as file:
        file.write('{"kind": "metr')  # killed in the middle of a line
    reopened = Spool(folder)
    assert reopened.exists and reopened.state["run_id"] == "r1" and reopened.delivered == 2
    assert len(reopened.records) == 7  # the torn line is gone, nothing else
    assert reopened.discard_metrics_after(4) == 2  # steps 5 and 6: the resumed job logs them again
    kept = Spool(folder).pending()
    assert [r.get("micro_step") for r in kept] == [3, 4, None]
    reopened.mark_delivered(len(kept))
    assert (folder / "records.jsonl").read_text() == "" and Spool(folder).pending() == []


def test_resume_auto_before_the_first_checkpoint_starts_over_in_the_same_run(tmp_path, capsys):
    """Killed before any checkpoint: ``resume=auto`` trains from the beginning in the run the killed job opened;
    params it logged keep their first values (MLflow cannot change them), the new ones are added."""
    overrides = [*FAST, "engine.epochs=1", "engine.limit_train_batches=2", "resume=auto"]
    train(compose_config([*overrides, "engine.keep_checkpoint_max=3"], tmp_path))
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if killed before its first checkpoint
    train(compose_config([*overrides, "engine.keep_checkpoint_max=4"], tmp_path))
    assert "keeps its first values of engine.keep_checkpoint_max" in capsys.readouterr().err
    (run,) = all_runs(mlflow_client(tmp_path))
    assert run.info.status == "FINISHED" and run.data.params["engine.keep_checkpoint_max"] == "3"
