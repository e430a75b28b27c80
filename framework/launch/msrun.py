"""Relaunch ``run.py`` through MindSpore's ``msrun`` for data-parallel training (``hardware.device_num`` > 1).

The launching process runs no training itself: it starts msrun with the job's own overrides, waits, and
then files every process's log into the job's MLflow run (which rank 0 created), checks that all ranks
ended with the same weights, and marks the run FAILED or KILLED if the workers died without doing so.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import FrameType

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from framework.launch.hardware import Hardware
from framework.launch.signals import Interrupted, signal_name
from framework.paths import PROJECT_ROOT
from framework.tracking import MlflowTracker

_EXCEPTION_LINE = re.compile(r"^([A-Za-z_.]*(Error|Exception|Interrupt|Diverged)|[a-z]+ error): ")
RESULT_FILE = "train_result.json"  # written by rank 0: its MLflow run id, then the fit result


class JobFailed(RuntimeError):
    """A data-parallel worker failed; msrun stopped the others."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def msrun_command(hardware: Hardware, overrides: list[str], run_dir: Path, master_port: int) -> list[str]:
    """The msrun command line for this node: one worker per device, all writing into ``run_dir``.

    Each worker gets the job's overrides plus the shared run dir; its Hydra dir (log, composed config) is
    ``run_dir/ranks/rank_<N>``; msrun's own per-process logs go to ``run_dir/msrun``.
    """
    return [
        sys.executable,
        "-m",
        "mindspore.parallel.cluster.run",  # = the `msrun` console script, with this interpreter
        f"--worker_num={hardware.world_size}",
        f"--local_worker_num={hardware.device_num}",
        f"--master_addr={hardware.master_addr}",
        f"--master_port={master_port}",
        f"--node_rank={hardware.node_rank}",
        f"--log_dir={run_dir / 'msrun'}",
        "--join=True",
        f"--cluster_time_out={hardware.cluster_timeout}",
        str(PROJECT_ROOT / "run.py"),
        *overrides,
        f"paths.run_dir={run_dir}",
        f"hydra.run.dir={run_dir}/ranks/${{rank_dir:}}",
    ]


def relaunch(hardware: Hardware, overrides: list[str], run_dir: Path, tracker: MlflowTracker) -> dict:
    """Run the training job on ``hardware.world_size`` processes through msrun; returns rank 0's result.

    Raises ``JobFailed`` if a worker failed and ``KeyboardInterrupt`` if the job was interrupted.
    """
    port = hardware.master_port or free_port()
    command = msrun_command(hardware, overrides, run_dir, port)
    print(f"data parallel on {hardware.world_size} processes ({hardware.num_nodes} node(s)) through msrun:")
    print("  " + " ".join(command), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # msrun starts each worker as `python` from PATH: make that this interpreter.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # an earlier job's record in this folder names its run: only this job's rank 0 may name one
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    process = subprocess.Popen(command, env=env)

    def stop(signum: int, frame: FrameType | None) -> None:  # msrun stops its workers on SIGINT
        process.send_signal(signal.SIGINT)
        raise Interrupted(f"stopped by {signal_name(signum)}", signum)

    previous = signal.signal(signal.SIGTERM, stop)
    interrupted, signum = False, signal.SIGINT
    try:
        returncode = process.wait()
    except KeyboardInterrupt as err:  # Ctrl-C here (no MindSpore graph runs in this process), or SIGTERM
        interrupted, signum = True, getattr(err, "signum", signal.SIGINT)
        returncode = process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    result = _read_result(run_dir)
    # msrun exits 0 when it was interrupted itself (it kills its workers on SIGINT): no final result then
    interrupted = interrupted or (returncode == 0 and hardware.node_rank == 0 and "history" not in result)
    if hardware.node_rank == 0 or "mlflow_run_id" in result:
        _file_job_into_run(tracker, result.get("mlflow_run_id"), run_dir, returncode, interrupted)
    if interrupted:
        raise Interrupted(f"data-parallel job stopped by {signal_name(signum)}; its workers were stopped", signum)
    if returncode != 0:
        raise JobFailed(
            f"data-parallel job failed (msrun exit status {returncode}){_worker_errors(run_dir)}; "
            f"the workers' logs are in {run_dir / 'msrun'}"
        )
    return result


def _worker_errors(run_dir: Path) -> str:
    """The last error line of each worker log that has one: ``: worker_0: training error: train loss was nan ...``."""
    errors = []
    for log in sorted((run_dir / "msrun").glob("worker_*.log")):
        lines = [line for line in log.read_text(errors="replace").splitlines() if _EXCEPTION_LINE.match(line)]
        if lines:
            errors.append(f"{log.stem}: {lines[-1]}")
    return ": " + "; ".join(errors) if errors else ""


def _read_result(run_dir: Path) -> dict:
    path = run_dir / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _file_job_into_run(
    tracker: MlflowTracker, run_id: str | None, run_dir: Path, returncode: int, interrupted: bool
) -> None:
    """Log every process's logs and weight checksum into rank 0's run; end it if the workers could not."""
    if run_id is None:
        print(f"rank 0 opened no MLflow run; the job's logs are in {run_dir}", file=sys.stderr)
        return
    client = tracker.client()
    try:
        for log in sorted((run_dir / "msrun").glob("*.log")):
            client.log_artifact(run_id, str(log), "logs/msrun")
        for log in sorted(p for p in (run_dir / "ranks").glob("*/*.log") if p.stat().st_size):
            client.log_artifact(run_id, str(log), f"logs/ranks/{log.parent.name}")
        checksums = {p.parent.name: p.read_text().strip() for p in sorted((run_dir / "ranks").glob("*/weights.sha256"))}
        if checksums:
            identical = len(set(checksums.values())) == 1
            client.set_tag(run_id, "ranks_weights_identical", str(identical).lower())
            if not identical:
                print(f"warning: ranks ended with different weights: {checksums}", file=sys.stderr)
        status = client.get_run(run_id).info.status
        if status == RunStatus.to_string(RunStatus.RUNNING):  # the workers were killed before they could end it
            for name in ("best", "last"):
                checkpoint = run_dir / "checkpoints" / f"{name}.ckpt"
                if checkpoint.is_file():
                    client.log_artifact(run_id, str(checkpoint), "checkpoints")
            ended = RunStatus.KILLED if interrupted else RunStatus.FAILED if returncode else RunStatus.FINISHED
            client.set_terminated(run_id, RunStatus.to_string(ended))
    except MlflowException as err:
        print(f"could not file the job's logs into MLflow run {run_id}: {err.message}", file=sys.stderr)
