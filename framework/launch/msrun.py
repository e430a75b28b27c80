"""Relaunch ``run.py`` through MindSpore's ``msrun`` for data-parallel training (``hardware.device_num`` > 1).

The launching process runs no training itself: it starts msrun with the job's own overrides, waits, and
returns how the job ended (``JobOutcome``) with where its processes left their logs and weight checksums;
the train task files those into the job's MLflow run (which rank 0 created).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from framework.errors import UserError
from framework.launch.hardware import Hardware
from framework.paths import PROJECT_ROOT
from framework.runtime.signals import Interrupted, signal_name

_EXCEPTION_LINE = re.compile(r"^([A-Za-z_.]*(Error|Exception|Interrupt|Diverged)|[a-z]+ error): ")
RESULT_FILE = "train_result.json"  # written by rank 0: its MLflow run id, then the fit result


class JobFailed(UserError, RuntimeError):
    """A data-parallel worker failed; msrun stopped the others."""

    kind = "training error"


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


@dataclass(frozen=True)
class JobOutcome:
    """How a data-parallel job ended: msrun's exit status, whether a signal stopped it (and which), and rank 0's
    record (its MLflow run id, then its fit result; empty if it wrote none)."""

    returncode: int
    interrupted: bool
    signum: int
    record: dict

    def check(self, run_dir: Path) -> None:
        """Raise ``Interrupted`` for a stopped job, ``JobFailed`` (with the workers' errors) for a failed one."""
        if self.interrupted:
            raise Interrupted(
                f"data-parallel job stopped by {signal_name(self.signum)}; its workers were stopped", self.signum
            )
        if self.returncode != 0:
            raise JobFailed(
                f"data-parallel job failed (msrun exit status {self.returncode}){_worker_errors(run_dir)}; "
                f"the workers' logs are in {run_dir / 'msrun'}"
            )


def relaunch(hardware: Hardware, overrides: list[str], run_dir: Path) -> JobOutcome:
    """Run the training job on ``hardware.world_size`` processes through msrun and wait for it to end.

    Ctrl-C or SIGTERM here stops the workers (msrun stops them on SIGINT) and is reported in the outcome.
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
    record = _read_result(run_dir)
    # msrun exits 0 when it was interrupted itself (it kills its workers on SIGINT): no final result then
    interrupted = interrupted or (returncode == 0 and hardware.node_rank == 0 and "history" not in record)
    return JobOutcome(returncode, interrupted, signum, record)


def job_logs(run_dir: Path) -> dict[str, list[Path]]:
    """The job's log files by the artifact folder they belong in: msrun's, and each rank's Hydra log."""
    logs = {"logs/msrun": sorted((run_dir / "msrun").glob("*.log"))}
    for log in sorted(p for p in (run_dir / "ranks").glob("*/*.log") if p.stat().st_size):
        logs.setdefault(f"logs/ranks/{log.parent.name}", []).append(log)
    return logs


def rank_checksums(run_dir: Path) -> dict[str, str]:
    """The SHA-256 of the final weights each rank wrote (``rank_<N>`` → checksum)."""
    return {p.parent.name: p.read_text().strip() for p in sorted((run_dir / "ranks").glob("*/weights.sha256"))}


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
