"""Data parallel through msrun: command lines per hardware config, SLURM fields, and real 2-process CPU training."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from framework.config import ConfigError, build, check_config
from framework.engine.checkpoint import read_checkpoint, weights_sha256
from framework.launch import Hardware
from framework.launch.msrun import msrun_command
from framework.launch.slurm import first_host
from framework.paths import PROJECT_ROOT
from framework.tasks.train import train
from tests.conftest import TEST_MODEL, all_runs, compose_config, mlflow_client

pytestmark = pytest.mark.slow  # end-to-end jobs: python -m pytest -m "not slow" skips them

TINY = [TEST_MODEL, "dataset.image_size=16", "engine.epochs=2", "engine.limit_train_batches=3"]


def run_py(
    tmp_path: Path, *overrides: str, timeout: int = 600, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """``python run.py [flags] <overrides>`` with every output (run dirs, MLflow store) under ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SLURM_"))}
    command = [sys.executable, str(PROJECT_ROOT / "run.py"), *flags, f"paths.output_dir={tmp_path}", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


@pytest.mark.parametrize(
    ("hardware", "target", "devices"), [("gpu8", "GPU", 8), ("ascend8", "Ascend", 8), ("cpu2", "CPU", 2)]
)
def test_multi_device_configs_compose_to_msrun(make_config, hardware, target, devices, tmp_path):
    hw = instantiate(make_config(f"hardware={hardware}", "hardware.master_port=8118").hardware)
    assert isinstance(hw, Hardware) and hw.device_target == target and hw.world_size == devices and hw.distributed
    command = msrun_command(hw, [f"hardware={hardware}", "scheduler.lr=0.1"], tmp_path / "run", 8118)
    assert command[:3] == [sys.executable, "-m", "mindspore.parallel.cluster.run"]
    options = dict(arg[2:].split("=", 1) for arg in command[3:] if arg.startswith("--"))
    assert options == {
        "worker_num": str(devices),
        "local_worker_num": str(devices),
        "master_addr": "127.0.0.1",
        "master_port": "8118",
        "node_rank": "0",
        "log_dir": str(tmp_path / "run" / "msrun"),
        "join": "True",
        "cluster_time_out": "600",
    }
    script = command.index(str(PROJECT_ROOT / "run.py"))
    assert command[script + 1 :] == [
        f"hardware={hardware}",
        "scheduler.lr=0.1",
        f"paths.run_dir={tmp_path / 'run'}",
        f"hydra.run.dir={tmp_path / 'run'}/ranks/${{rank_dir:}}",
    ]


def test_several_nodes_compose_to_msrun_per_node(make_config, tmp_path):
    hw = instantiate(
        make_config(
            "hardware=ascend8",
            "hardware.num_nodes=4",
            "hardware.node_rank=2",
            "hardware.master_addr=10.0.0.7",
            "hardware.master_port=29500",
        ).hardware
    )
    command = msrun_command(hw, [], tmp_path, 29500)
    for option in ("--worker_num=32", "--local_worker_num=8", "--node_rank=2", "--master_addr=10.0.0.7"):
        assert option in command


def test_single_device_configs_do_not_relaunch(make_config):
    for hardware in ("cpu", "gpu", "ascend"):
        hw = instantiate(make_config(f"hardware={hardware}").hardware)
        assert hw.world_size == 1 and not hw.distributed


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["hardware.num_nodes=2"], "master_port is required with several nodes"),
        (["hardware.num_nodes=2", "hardware.master_port=8118", "hardware.node_rank=2"], "node_rank=2 must be in"),
        (["hardware.master_port=80"], r"hardware.master_port must be in \[1024, 65535\], got 80"),
        (["hardware.device_num=0"], "hardware.device_num must be > 0, got 0"),
    ],
)
def test_bad_node_settings_are_refused(make_config, overrides, message):
    cfg = make_config("hardware=gpu8", *overrides)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)  # the schema (types, ranges) and then the settings that must agree
        build(cfg, "hardware")


def test_slurm_job_sets_node_rank_and_master(make_config, monkeypatch):
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    hw = instantiate(make_config("hardware=gpu8", "hardware.num_nodes=2", "hardware.master_port=8118").hardware)
    assert (hw.node_rank, hw.master_addr) == (1, "gpu07")
    assert first_host("node[003,9-10],cpu1") == "node003" and first_host("a1-ib,a2-ib") == "a1-ib"


def test_slurm_launcher_is_sized_from_hardware(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            ["hydra/launcher=slurm", "hardware=ascend8", "hardware.num_nodes=3", "hardware.master_port=8118"],
            return_hydra_config=True,
        )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gres"]) == (3, 1, "npu:8")


def _val_top1_of_checkpoint(tmp_path: Path, checkpoint: Path) -> float:
    from framework.tasks.eval import evaluate_checkpoint

    metrics = evaluate_checkpoint(compose_config(["task=eval", f"ckpt={checkpoint}", *TINY], tmp_path / "eval"))
    return metrics["val_top1"]


def test_cpu2_trains_data_parallel_with_one_mlflow_run(tmp_path):
    """Two msrun processes on this CPU: same final weights on both ranks, one MLflow run (rank 0's) whose
    metrics are those of the averaged model, every process's log in it."""
    out = run_py(tmp_path, "hardware=cpu2", *TINY, "lr_scaling=linear", "lr_scaling.reference_batch_size=32")
    assert out.returncode == 0, out.stderr[-3000:]
    runs = all_runs(mlflow_client(tmp_path))
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["ranks_weights_identical"] == "true"
    assert (run.data.params["world_size"], run.data.params["global_batch_size"]) == ("2", "64")
    # linear lr scaling for the global batch: 2 × 32 images per update → twice the configured peak lr
    assert run.data.params["lr_scale_factor"] == "2.0"
    peak = max(m.value for m in mlflow_client(tmp_path).get_metric_history(run.info.run_id, "lr"))
    assert peak == pytest.approx(2 * float(run.data.params["scheduler.lr"]))
    (run_dir,) = (tmp_path / "runs").glob("*/*")
    checksums = {p.parent.name: p.read_text().strip() for p in (run_dir / "ranks").glob("*/weights.sha256")}
    assert set(checksums) == {"rank_0", "rank_1"} and len(set(checksums.values())) == 1
    params, _ = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    network_params = {k: v for k, v in params.items() if k in _network_names(run_dir)}
    assert weights_sha256(network_params) == checksums["rank_0"] == run.data.tags["weights_sha256"]
    client = mlflow_client(tmp_path)
    logs = {a.path for a in client.list_artifacts(run.info.run_id, "logs/msrun")}
    assert {"logs/msrun/worker_0.log", "logs/msrun/worker_1.log", "logs/msrun/scheduler.log"} <= logs
    # the step averages the loss over ranks (each on its own shard, see test_data), so both report the same
    first = [_first_loss(run_dir / "msrun" / f"worker_{r}.log") for r in (0, 1)]
    assert first[0] == first[1]
    assert float(first[0]) == pytest.approx(min(client.get_metric_history(run.info.run_id, "train_loss"),
                                                key=lambda m: m.step).value, abs=1e-4)  # fmt: skip
    # the logged val metrics are the whole val split through the final (averaged) weights
    assert _val_top1_of_checkpoint(tmp_path, run_dir / "checkpoints" / "last.ckpt") == pytest.approx(
        run.data.metrics["val_top1"]
    )


def _network_names(run_dir: Path) -> set[str]:
    """Names of the network's own parameters in a checkpoint (best.ckpt holds exactly those)."""
    params, _ = read_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    return set(params)


def _first_loss(log: Path) -> str:
    match = re.search(r"step 1/\d+ loss (\S+)", log.read_text())
    assert match, log.read_text()[-2000:]
    return match.group(1)


def test_cpu2_worker_failure_fails_the_run_with_the_cause(tmp_path):
    out = run_py(tmp_path, "hardware=cpu2", *TINY, "scheduler.lr=1e30", "engine.max_nonfinite_steps=2")
    assert out.returncode == 1
    assert "training error: data-parallel job failed" in out.stderr
    # the loss is averaged over ranks in the step, so both stop at the same step with the same cause
    assert re.search(r"worker_0: training error: train loss was nan for 2 consecutive steps \(steps (\d+)", out.stderr)
    assert re.search(r"worker_1: training error: train loss was nan for 2 consecutive steps", out.stderr)
    (run,) = all_runs(mlflow_client(tmp_path))
    assert run.info.status == "FAILED"
    logs = {a.path for a in mlflow_client(tmp_path).list_artifacts(run.info.run_id, "logs/msrun")}
    assert "logs/msrun/worker_1.log" in logs


def test_cpu2_interrupted_job_is_killed_and_resumes_into_the_same_run(tmp_path):
    """Ctrl-C after the first epoch: msrun stops both ranks, the run is KILLED with its last.ckpt, and
    ``resume=runs:/<id>`` finishes the job data parallel in the same MLflow run."""
    command = [sys.executable, str(PROJECT_ROOT / "run.py"), f"paths.output_dir={tmp_path}", "hardware=cpu2", *TINY]
    command[-2] = "engine.epochs=4"  # epochs 2-4 leave time to interrupt after the first checkpoint
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                           cwd=tmp_path, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("runs/*/*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.5)
    os.killpg(job.pid, signal.SIGINT)  # Ctrl-C
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 130, stderr[-3000:]
    (run,) = all_runs(mlflow_client(tmp_path))
    assert run.info.status == "KILLED"
    assert "continue it with: python run.py" in stderr and "resume=auto hydra.run.dir=" in stderr

    out = subprocess.run([*command, f"resume=runs:/{run.info.run_id}"], capture_output=True, text=True,
                         timeout=600, env=env, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = all_runs(mlflow_client(tmp_path))
    assert run.info.status == "FINISHED" and run.data.tags["ranks_weights_identical"] == "true"
    client = mlflow_client(tmp_path)
    epoch_at = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "epoch")}
    epochs = [epoch_at[m.step] for m in client.get_metric_history(run.info.run_id, "val_top1")]
    assert epochs[-1] == 4 and sorted(set(epochs)) == [1, 2, 3, 4]


def test_cpu2_sweep_trial_is_pruned_on_both_ranks(tmp_path):
    """A data-parallel Optuna trial: rank 0 reports to the study, the median pruner stops the bad trial after
    epoch 1 (worse than the study's finished trial), and rank 1 stops with it (same weights on both); the study
    records PRUNED, MLflow a FINISHED run tagged pruned."""
    import optuna

    from tests.test_sweeps import enqueue

    enqueue(tmp_path, "sweep_resnext_test", 1e-5)  # after one finished trial
    overrides = [
        TEST_MODEL, "hardware=cpu2", "dataset.image_size=16", "engine.epochs=2", "engine.limit_train_batches=15",
        "hydra/sweeper=optuna", "hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=1",
        "hydra.sweeper.n_trials=2", "scheduler.lr=tag(log,interval(1e-5,0.1))",
    ]  # fmt: skip
    out = run_py(tmp_path, *overrides, timeout=900, flags=("-m",))
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(
        study_name="sweep_resnext_test", storage=f"sqlite:///{tmp_path}/sweeps/sweep_resnext_test.db"
    )
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"]
    runs = {r.data.tags.get("sweep_trial"): r for r in all_runs(mlflow_client(tmp_path))}
    pruned = runs["1"]
    assert pruned.info.status == "FINISHED" and pruned.data.tags["pruned"] == "true"
    assert pruned.data.tags["stopped_epoch"] == "1" and pruned.data.tags["ranks_weights_identical"] == "true"
    (trial_dir,) = [d for d in (tmp_path / "multiruns").glob("*/*/0") if d.is_dir()]  # the sweep's first job
    for rank in (0, 1):
        assert "training ends after epoch 1" in (trial_dir / "msrun" / f"worker_{rank}.log").read_text()


def test_cpu2_fine_tunes_from_a_checkpoint_with_a_frozen_backbone(tmp_path):
    """model.pretrained and the fine-tuning settings data parallel: both ranks start from the checkpoint, the
    frozen backbone ends as loaded on both (weights identical across ranks), the head is trained."""
    train(compose_config([*TINY, "engine.epochs=1"], tmp_path / "source"))
    source = next((tmp_path / "source").rglob("best.ckpt"))
    settings = ["optimizer.freeze=['^(?!head[.])']", "optimizer.layer_decay=0.8", "engine.freeze_bn_stats=true"]
    out = run_py(tmp_path, "hardware=cpu2", *TINY, "engine.epochs=1", f"model.pretrained={source}", *settings)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = all_runs(mlflow_client(tmp_path))
    assert run.data.tags["ranks_weights_identical"] == "true"
    assert run.data.tags["pretrained_load"].startswith("loaded 87 tensors from checkpoint best.ckpt")
    loaded = read_checkpoint(source)[0]
    (last,) = tmp_path.glob("runs/*/*/checkpoints/last.ckpt")
    trained = read_checkpoint(last)[0]
    same = {n: np.array_equal(trained[n].asnumpy(), loaded[n].asnumpy()) for n in loaded}
    assert all(v for n, v in same.items() if not n.startswith("head.")) and not same["head.fc.weight"]
