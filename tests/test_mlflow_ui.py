"""The MLflow UI from the project's own environment: the command a training run prints opens it on the local
store, and it serves that store's runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from framework.launch.msrun import free_port
from framework.paths import PROJECT_ROOT
from tests.conftest import FAST

pytestmark = pytest.mark.slow  # end-to-end jobs: python -m pytest -m "not slow" skips them


def test_printed_mlflow_ui_command_serves_the_local_store(tmp_path):
    command = [sys.executable, str(PROJECT_ROOT / "run.py"), *FAST, "engine.limit_train_batches=2"]
    train = subprocess.run(
        [*command, f"paths.output_dir={tmp_path}"], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert train.returncode == 0, train.stderr[-3000:]
    printed = re.search(r"^mlflow ui\s+(mlflow ui .*)$", train.stdout, re.MULTILINE)
    assert printed, train.stdout[-2000:]
    command = printed.group(1)
    assert f"--backend-store-uri sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}" in command
    run_page = r"^run page\s+http://127\.0\.0\.1:5000/#/experiments/(\d+)/runs/([0-9a-f]{32})\?workflowType="
    page = re.search(run_page, train.stdout, re.MULTILINE)
    assert page, train.stdout[-2000:]
    port = free_port()
    # as typed in a shell where the project's environment is active (its bin/ first on PATH)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_")}
    log = open(tmp_path / "ui.log", "w")  # noqa: SIM115 (the server writes it while it runs)
    ui = subprocess.Popen(
        command.replace("--port 5000", f"--port {port}"), shell=True, cwd=tmp_path, env=env,
        stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    try:
        started, base = time.monotonic(), f"http://127.0.0.1:{port}"
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                    assert answer.read().strip() == b"OK"
                break
            except OSError:
                assert ui.poll() is None, (tmp_path / "ui.log").read_text()[-3000:]
                assert time.monotonic() - started < 180, "mlflow ui did not answer /health"
                time.sleep(0.5)
        print(f"mlflow ui answered /health after {time.monotonic() - started:.1f} s")
        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/experiments/search", data=b'{"max_results": 10}',
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as answer:
            names = {e["name"] for e in json.load(answer)["experiments"]}
        assert "debug" not in names and "classification" in names
        experiment_id, run_id = page.groups()  # the printed run page names the run and its experiment
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=30) as answer:
            assert json.load(answer)["run"]["info"]["experiment_id"] == experiment_id
        with urllib.request.urlopen(f"{base}/", timeout=30) as answer:
            assert b"<html" in answer.read().lower()  # the UI's page itself
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)
