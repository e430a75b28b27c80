"""The launching side of a data-parallel training job: relaunch through msrun, then file the job into MLflow."""

from __future__ import annotations

import sys
from pathlib import Path

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from framework.config import build, overrides
from framework.engine import FitResult
from framework.engine.checkpoint import read_micro_step
from framework.launch import Hardware
from framework.launch.msrun import JobOutcome, job_logs, rank_checksums, relaunch
from framework.tracking import MlflowTracker


def launch_data_parallel(cfg: DictConfig, hardware: Hardware, run_dir: Path) -> FitResult:
    """Relaunch the job through msrun; rank 0's result (on node 0). Raises as the job ended (``JobOutcome``)."""
    tracker = build(cfg, "tracking")
    try:
        outcome = relaunch(hardware, overrides(), run_dir)
        if hardware.node_rank == 0 or "mlflow_run_id" in outcome.record:
            file_job_into_run(tracker, outcome, run_dir)
        outcome.check(run_dir)
    finally:  # rank 0 may have been stopped between a checkpoint and sending the metrics it covers
        last = run_dir / "checkpoints" / "last.ckpt"
        micro_step = read_micro_step(last) if last.is_file() else 0
        tracker.deliver_kept(run_dir / "tracking", micro_step)
    record = outcome.record
    checkpoints = {k: Path(v) for k, v in record.get("checkpoints", {}).items()}
    return FitResult(record.get("history", []), record.get("best"), checkpoints, record.get("stopped"))


def file_job_into_run(tracker: MlflowTracker, outcome: JobOutcome, run_dir: Path) -> None:
    """Log every process's logs and weight checksum into rank 0's run; end it if the workers could not."""
    run_id = outcome.record.get("mlflow_run_id")
    if run_id is None:
        print(f"rank 0 opened no MLflow run; the job's logs are in {run_dir}", file=sys.stderr)
        return
    client = tracker.client()
    try:
        for artifact_path, logs in job_logs(run_dir).items():
            for log in logs:
                client.log_artifact(run_id, str(log), artifact_path)
        checksums = rank_checksums(run_dir)
        if checksums:
            identical = len(set(checksums.values())) == 1
            client.set_tag(run_id, "ranks_weights_identical", str(identical).lower())
            if not identical:
                print(f"warning: ranks ended with different weights: {checksums}", file=sys.stderr)
        if client.get_run(run_id).info.status == RunStatus.to_string(RunStatus.RUNNING):  # workers killed first
            for name in ("best", "last"):
                checkpoint = run_dir / "checkpoints" / f"{name}.ckpt"
                if checkpoint.is_file():
                    client.log_artifact(run_id, str(checkpoint), "checkpoints")
            failed = RunStatus.FAILED if outcome.returncode else RunStatus.FINISHED
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED if outcome.interrupted else failed))
    except MlflowException as err:
        print(f"could not file the job's logs into MLflow run {run_id}: {err.message}", file=sys.stderr)
