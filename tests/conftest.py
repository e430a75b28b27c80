"""Shared fixtures: compose the real run spec with Hydra's compose API, isolated in a temp dir."""

from __future__ import annotations

# isort: off
import mindspore  # noqa: F401  (before MLflow: MindSpore selects the protobuf backend it needs only if first)

# isort: on

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import mindspore as ms
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, open_dict

from framework.launch.msrun import free_port
from framework.tasks import register_resolvers

register_resolvers()  # as run.py does

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# The training machinery at test cost: the 4-block test ResNeXt (conf/model/resnext_test.yaml). The real
# models are trained, exported and run with their recipes in test_models, test_export and test_experiments.
TEST_MODEL = "model=resnext_test"
# A run small enough for a test: the test model on 16 px digits, two epochs.
FAST = [TEST_MODEL, "dataset.image_size=16", "engine.epochs=2"]


@cache
def empty_mlflow_db() -> Path:
    """An MLflow SQLite store with its tables made once (MLflow's migrations take ~2 s per new store)."""
    folder = Path(tempfile.mkdtemp(prefix="empty-mlflow-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


def compose_config(overrides: list[str], tmp_path: Path) -> DictConfig:
    """Compose conf/config.yaml as ``python run.py <overrides>`` would, writing only under ``tmp_path``, whose
    MLflow store starts as a copy of an empty one."""
    store = tmp_path / "mlflow" / "mlflow.db"
    if not store.exists():
        store.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(empty_mlflow_db(), store)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                f"paths.run_dir={tmp_path / 'run'}",
                f"tracking.local_store={tmp_path / 'mlflow'}",
                f"hardware.compile_cache={tmp_path / 'compile_cache'}",
                *overrides,
            ],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., DictConfig]:
    return lambda *overrides: compose_config(list(overrides), tmp_path)


def mlflow_client(tmp_path: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")


def all_runs(client: MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


@contextmanager
def served_model(tmp_path: Path, model_uri: str) -> Iterator[Callable[[dict], dict]]:
    """``mlflow models serve -m <model_uri> --env-manager local`` on ``tmp_path``'s store, as a user in the
    activated project environment runs it; yields a function that posts a JSON body to /invocations."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"}
    # the server execs `uvicorn` from PATH: put this environment's scripts first, as activating it would
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    base, started = f"http://127.0.0.1:{port}", time.monotonic()
    try:
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            assert time.monotonic() - started < 180, "the model server did not answer /ping"
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        print(f"mlflow models serve answered after {time.monotonic() - started:.1f} s")

        def invoke(body: dict) -> dict:
            headers = {"Content-Type": "application/json"}
            request = urllib.request.Request(f"{base}/invocations", data=json.dumps(body).encode(), headers=headers)
            with urllib.request.urlopen(request, timeout=120) as answer:
                return json.load(answer)

        yield invoke
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


@pytest.fixture(autouse=True)
def _local_tracking_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests use their own local MLflow store, never a server named in the environment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(autouse=True)
def _restore_execution_mode() -> Iterator[None]:
    """Tests that switch MindSpore between graph and PyNative mode do not leak it to the next test."""
    previous = ms.get_context("mode")
    yield
    ms.set_context(mode=previous)
