"""``hardware.compile_cache``: a repeated run reuses its compiled graphs and trains exactly as without them;
another program (here other classes, so another head) compiles its own, where MindSpore's bare cache would
run the earlier graph; a folder a killed run left half-written is emptied and filled again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from framework.launch import compile_cache as cache_module
from framework.launch.compile_cache import COMPLETE, cache_key, compile_cache
from framework.paths import PROJECT_ROOT
from tests.conftest import TEST_MODEL, mlflow_client

SHORT = [TEST_MODEL, "dataset.image_size=16", "engine.epochs=1", "engine.limit_train_batches=4"]


def train(tmp_path: Path, name: str, *overrides: str) -> dict:
    """``python run.py`` in a fresh process; its run's compile-cache tag, loss curve and val metrics."""
    command = [sys.executable, str(PROJECT_ROOT / "run.py"), *SHORT, *overrides, f"paths.output_dir={tmp_path}",
               f"hydra.run.dir={tmp_path / name}", f"tracking.local_store={tmp_path / 'mlflow'}"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow_client(tmp_path)
    (run,) = client.search_runs(["1"], order_by=["attributes.start_time DESC"], max_results=1)
    curve = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    val = {k: v for k, v in run.data.metrics.items() if k.startswith("val_")}
    return {"cache": run.data.tags.get("compile_cache"), "curve": curve, "val": val}


@pytest.mark.slow  # six training processes
def test_repeated_runs_reuse_their_graphs_and_other_programs_compile_their_own(tmp_path):
    first, again = train(tmp_path, "a"), train(tmp_path, "b")
    assert (first["cache"], again["cache"]) == ("filled", "reused")
    assert len(first["curve"]) == 4 and again["curve"] == first["curve"] and again["val"] == first["val"]
    (folder,) = (tmp_path / "compile_cache").iterdir()
    assert (folder / COMPLETE).is_file() and list(folder.glob("graphs/**/*.mindir"))

    three_classes = train(tmp_path, "c", "dataset.classes=[0,1,2]")  # another head: another folder
    uncached = train(tmp_path, "d", "dataset.classes=[0,1,2]", "hardware.compile_cache=null")
    assert three_classes["cache"] == "filled" and uncached["cache"] == "off"
    assert three_classes["curve"] == uncached["curve"] and three_classes["val"] == uncached["val"]
    assert len(list((tmp_path / "compile_cache").iterdir())) == 2

    (folder / COMPLETE).unlink()  # as a run killed while filling it leaves the folder
    for graph in folder.glob("graphs/**/*.mindir"):
        graph.write_bytes(graph.read_bytes()[:100])
    refilled = train(tmp_path, "e")
    assert refilled["cache"] == "filled" and refilled["curve"] == first["curve"] and refilled["val"] == first["val"]
    assert (folder / COMPLETE).is_file()


def test_without_a_script_a_folder_in_use_or_a_second_program_in_one_process_compiles_uncached(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "_state", {"used": False})
    monkeypatch.setattr(cache_module, "entry_script_path", str(PROJECT_ROOT / "run.py"))
    program = {"model": "x"}
    folder = tmp_path / cache_key(program)
    folder.mkdir()
    with open(folder / ".lock", "w") as held:  # another process filling or reading it
        cache_module.fcntl.flock(held, cache_module.fcntl.LOCK_EX)
        with compile_cache(tmp_path, program) as state:
            assert state == "busy"
    with compile_cache(None, program) as state:
        assert state == "off"
    monkeypatch.setattr(cache_module, "entry_script_path", str(tmp_path / "-c"))  # python -c, xdist workers
    with compile_cache(tmp_path, {"model": "z"}) as state:
        assert state == "no script"
    monkeypatch.setattr(cache_module, "_state", {"used": True})  # MindSpore fixed its folder at the first program
    with compile_cache(tmp_path, {"model": "y"}) as state:
        assert state == "not first"
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]
