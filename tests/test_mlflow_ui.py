"""The MLflow UI from the project's own environment, as a person uses it: the command a training run prints opens
it on the local store, and a real browser (Debian's Chromium driven by Playwright, no browser download) shows a
short training run and a 2-trial sweep the way issue 19 asks: the runs table with distinct names and metric
columns, the run page with its source, description, datasets and model, train and val curves on one chart, the
comparison of the sweep's trials and the registered model. Screenshots go to outputs/ui-screenshots/."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from playwright.sync_api import Page, sync_playwright

from framework.launch.msrun import free_port
from framework.paths import PROJECT_ROOT
from tests.conftest import FAST

pytestmark = pytest.mark.slow  # end-to-end jobs: python -m pytest -m "not slow" skips them

SHOTS = PROJECT_ROOT / "outputs" / "ui-screenshots"
VIEWPORT = {"width": 1600, "height": 1000}
SETTLE_MS = 8000  # the single-page app fetches its data after the first paint
ROW_EXPANDER = "button[data-component-id*='runnamecellrenderer']"  # the +/- left of a run name (an icon, no label)
T = TypeVar("T")


def run_py(tmp_path: Path, *overrides: str) -> str:
    """``python run.py <overrides>`` writing into ``tmp_path``; its printed output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    command = [sys.executable, str(PROJECT_ROOT / "run.py"), *overrides, f"paths.output_dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def printed(stdout: str, row: str) -> str:
    """The value of a row of a printed summary (``run page   http://...``)."""
    found = re.search(rf"^{row}\s+(\S.*)$", stdout, re.MULTILINE)
    assert found, stdout[-2000:]
    return found.group(1).strip()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A store holding a short training run (registered as ``digits``), a 2-trial sweep and a comparison of its
    trials, served by the ``mlflow ui`` command training printed (port changed), run as typed in a shell where
    the project's environment is active. Yields the UI's address and the pages the commands printed."""
    train = run_py(tmp_path, *FAST, "engine.limit_train_batches=6", "tracking.register_model=digits")
    sweep = run_py(tmp_path, "-m", *FAST, "engine.limit_train_batches=6", "scheduler.lr=0.01,0.05")
    parent = re.search(r"^sweep parent MLflow run ([0-9a-f]{32})", sweep, re.MULTILINE)
    assert parent, sweep[-2000:]
    compare = run_py(tmp_path, "task=compare", f"compare.parent={parent.group(1)}")
    command = printed(train, "mlflow ui").split("#")[0].strip()
    assert command.startswith(f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_")}
    log = open(tmp_path / "ui.log", "w")  # noqa: SIM115 (the server writes it while it runs)
    ui = subprocess.Popen(
        command.replace("--port 5000", f"--port {port}"), shell=True, cwd=tmp_path, env=env,
        stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    pages = {
        "run page": printed(train, "run page"),
        "all runs": printed(train, "all runs"),
        "compare": printed(compare, "compare in mlflow"),
    }
    try:
        wait_for_health(base, ui, tmp_path / "ui.log")
        yield base, {name: url.replace("http://127.0.0.1:5000", base) for name, url in pages.items()}
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)


def wait_for_health(base: str, ui: subprocess.Popen, log: Path) -> None:
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                assert answer.read().strip() == b"OK"
            print(f"mlflow ui answered /health after {time.monotonic() - started:.1f} s")
            return
        except OSError:
            assert ui.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() - started < 180, "mlflow ui did not answer /health"
            time.sleep(0.5)


def api(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


def test_what_a_person_sees_in_the_mlflow_ui(served):
    base, pages = served
    experiment_id, run_id = re.search(r"/experiments/(\d+)/runs/([0-9a-f]{32})", pages["run page"]).groups()
    run = api(base, f"runs/get?run_id={run_id}")["run"]  # the printed run page names the run and its experiment
    assert run["info"]["experiment_id"] == experiment_id
    runs = api(base, "runs/search", {"experiment_ids": [experiment_id], "max_results": 100})["runs"]
    names = {r["info"]["run_id"]: r["info"]["run_name"] for r in runs}
    assert len(set(names.values())) == len(names) == 4  # the training run, the sweep parent and its 2 trials
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            for check in (check_runs_table, check_run_page, check_curves, check_comparison, check_model):
                page = browser.new_context(viewport=VIEWPORT).new_page()  # nothing kept from the screen before
                check(page, base, pages, names, run)
                page.context.close()
        finally:
            browser.close()


def chromium() -> str:
    """Debian's Chromium (``apt-get install chromium``; .ci/run installs it)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("no chromium on PATH: install Debian's package (sudo apt-get install chromium), as .ci/run does")
    return found


def open_page(page: Page, url: str) -> str:
    """Go to ``url``, let the app load, close MLflow 3.17's assistant panel (open by default on a third of the
    width); the page's visible text."""
    page.goto(url)
    page.wait_for_timeout(SETTLE_MS)
    if page.get_by_role("button", name="New Chat").count():
        page.get_by_role("button", name="Close", exact=True).first.click()
        page.wait_for_timeout(1000)
    return page.inner_text("body")


def settled(page: Page, read: Callable[[], T], done: Callable[[T], bool], seconds: float = 60) -> T:
    """``read()`` once ``done`` holds of it, or as it is after ``seconds``: the app fills the screen in as its
    requests return, later on a busy machine than any fixed pause allows for."""
    deadline = time.monotonic() + seconds
    value = read()
    while not done(value) and time.monotonic() < deadline:
        page.wait_for_timeout(500)
        value = read()
    return value


def shoot(page: Page, name: str, height: int = VIEWPORT["height"]) -> None:
    """A screenshot of what the window shows (``height`` px tall: the app scrolls inside its own panes)."""
    page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
    page.wait_for_timeout(1500)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def check_runs_table(page: Page, base: str, pages: dict, names: dict, run: dict) -> None:
    """The URL training printed ("all runs"): the saved view "training runs" with metric and param columns;
    the sweep parent expands to its trials; every name is on screen whole and differs from the others."""
    page.set_viewport_size({"width": 1920, "height": VIEWPORT["height"]})  # the grid draws visible columns only
    text = open_page(page, pages["all runs"])
    columns = {"best_val_top1", "val_top1", "val_loss", "scheduler.lr"}
    headers = settled(
        page,
        lambda: {" ".join(h.split()) for h in page.locator(".ag-header-cell").all_inner_texts()},
        lambda shown: columns <= shown,
    )
    assert columns <= headers, headers
    parent = next(i for i, name in names.items() if name.startswith("sweep "))
    page.locator(f'.ag-row[row-id="{parent}"]').locator(ROW_EXPANDER).first.click()
    links = page.locator(".ag-cell[col-id='attributes.`Run Name`'] a")
    shown = settled(
        page,
        lambda: sorted(" ".join(c.split()) for c in links.all_inner_texts()),
        lambda shown: shown == sorted(names.values()),
    )
    assert shown == sorted(names.values()), (shown, text[-1500:])
    truncated = links.evaluate_all(  # a name cut with an ellipsis is wider than its box
        "links => links.filter(a => [a, ...a.querySelectorAll('*')].some(e => e.scrollWidth > e.clientWidth + 1))"
        ".length"
    )
    assert truncated == 0, "run names cut off in the run-name column"
    assert "0.05" in page.inner_text(".ag-center-cols-container")  # a trial's lr in its column
    page.screenshot(path=str(SHOTS / "1_runs_table.png"))


def check_run_page(page: Page, base: str, pages: dict, names: dict, run: dict) -> None:
    """The printed run page: description (command and result), source and commit, user, datasets, the logged
    and the registered model."""
    text = open_page(page, pages["run page"])
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    tags = {tag["key"]: tag["value"] for tag in run["data"]["tags"]}
    description = lines[lines.index("Description") + 1 : lines.index("Description") + 3]
    assert description[0].startswith("python run.py ") and description[1].startswith("best val_top1 "), description
    about = lines[lines.index("About this run") :]
    assert about[about.index("Source") + 1 : about.index("Source") + 3] == [
        "run.py",
        tags["mlflow.source.git.commit"][:7],
    ]
    assert about[about.index("Created by") + 1] == tags["mlflow.user"]
    assert about[about.index("Datasets") + 1].startswith("digits/train (")  # and "+1": the val split
    assert "Logged models (1)" in lines and about[about.index("Registered models") + 1 :][:2] == ["digits", "v1"]
    shoot(page, "2_run_page", 1600)


def check_curves(page: Page, base: str, pages: dict, names: dict, run: dict) -> None:
    """The view's chart mode: one chart holds train_loss and val_loss of each run over the epoch metric."""
    open_page(page, pages["all runs"] + "&compareRunsMode=CHART")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": 1600})  # charts below the fold are not drawn
    page.wait_for_timeout(2500)
    card = page.evaluate(
        """title => {  // the chart card: the closest block around the title that holds a plot
            const head = [...document.querySelectorAll('*')].find(e => e.children.length === 0
                && e.textContent.trim() === title);
            for (let e = head; e; e = e.parentElement)
                if (e.querySelector('svg.main-svg'))
                    return {text: e.innerText, curves: e.querySelectorAll('path.js-line').length};
            return null;
        }""",
        "train_loss vs val_loss",
    )
    assert card is not None, "no chart 'train_loss vs val_loss'"
    legend, training = card["text"].splitlines(), run["info"]["run_name"]
    assert f"{training} (train_loss)" in legend and f"{training} (val_loss)" in legend, legend
    assert "epoch" in legend and card["curves"] >= 2, card  # over the epoch metric, both curves drawn
    shoot(page, "3_curves", 1600)


def check_comparison(page: Page, base: str, pages: dict, names: dict, run: dict) -> None:
    """MLflow's comparison page that task=compare printed for the sweep's trials: both trials side by side,
    the swept lr among their params."""
    text = open_page(page, pages["compare"])
    trials = [name for name in names.values() if name.startswith("#")]
    assert len(trials) == 2 and all(name in text for name in trials), text[:3000]
    assert re.search(r"scheduler\.lr\s+0\.01\s+0\.05|scheduler\.lr\s+0\.05\s+0\.01", text), text[-3000:]
    shoot(page, "4_compare_trials", 1600)


def check_model(page: Page, base: str, pages: dict, names: dict, run: dict) -> None:
    """The registered model: version 1, made from the training run, its description the monitored result."""
    text = open_page(page, f"{base}/#/models/digits")
    assert "Version 1" in text, text[:2000]
    shoot(page, "5_registered_model")
    page.get_by_role("link", name=re.compile(r"^Version 1$")).first.click()
    page.wait_for_timeout(SETTLE_MS)
    text = page.inner_text("body")
    assert run["info"]["run_name"] in text and "val_top1" in text, text[:3000]
    shoot(page, "6_model_version", 1400)
