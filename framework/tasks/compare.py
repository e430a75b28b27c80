"""``task=compare``: finished training runs side by side, read back from the MLflow store.

Selects runs (``compare.runs`` ids, else a sweep parent's children, else the experiment's train runs),
prints a table of the params that differ and the final and best metrics, writes ``comparison.csv`` and
``<metric>_per_epoch.png`` into the run dir and logs both to a new MLflow run tagged ``task=compare``
(in "<the compared runs' experiment>-comparisons", out of the training charts).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow.entities import Metric, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from rich.measure import Measurement
from rich.table import Table

from framework.config import ConfigError, build
from framework.tasks.common import console, print_summary
from framework.tracking import MlflowTracker
from framework.tracking.sweep import child_runs

FINAL_METRICS = ("val_top1", "val_top5", "val_loss")
IGNORED_PARAM_PREFIXES = ("paths.", "tracking.", "hydra.")  # differ between any two runs, say nothing
MODES = ("max", "min")
MISSING = "-"
ARTIFACT_DIR = "comparison"
NEWEST_FIRST = ["attributes.start_time DESC"]


def _get_run(client: MlflowClient, run_id: str, key: str, tracker: MlflowTracker) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException as err:
        raise ConfigError(
            f"{key}: no run '{run_id}' in the MLflow store {tracker.uri}. List its runs with: {tracker.ui_command()}"
        ) from err


def select_runs(client: MlflowClient, tracker: MlflowTracker, opts: DictConfig) -> tuple[list[Run], str]:
    """The runs ``opts`` (``cfg.compare``) selects, newest first, at most ``max_runs``, and what selected them."""
    limit = int(opts.max_runs)
    if limit < 1:
        raise ConfigError(f"compare.max_runs must be >= 1, got {limit}")
    if opts.runs:
        ids = [opts.runs] if isinstance(opts.runs, str) else [str(run_id) for run_id in opts.runs]
        runs = [_get_run(client, run_id, "compare.runs", tracker) for run_id in dict.fromkeys(ids)]
        runs.sort(key=lambda run: run.info.start_time, reverse=True)
        what = "runs given by compare.runs"
    elif opts.parent:
        parent = _get_run(client, str(opts.parent), "compare.parent", tracker)
        runs = child_runs(client, parent.info.run_id, order_by=NEWEST_FIRST, max_results=limit + 1)
        what = f"child runs (tag mlflow.parentRunId) of compare.parent={opts.parent}"
    else:
        experiment = client.get_experiment_by_name(str(opts.experiment))
        if experiment is None:
            names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
            raise ConfigError(
                f"compare.experiment={opts.experiment}: no such experiment in {tracker.uri} "
                f"(experiments there: {names}). Fix: compare.experiment=<name>"
            )
        runs = client.search_runs(
            [experiment.experiment_id], "tags.task = 'train'", order_by=NEWEST_FIRST, max_results=limit + 1
        )
        what = f"train runs (tag task=train) in experiment '{opts.experiment}'"
    if not runs:
        raise ConfigError(f"no {what} in {tracker.uri}. List its runs with: {tracker.ui_command()}")
    if len(runs) > limit:
        console.print(f"more {what} than compare.max_runs={limit}: comparing the newest {limit}", style="yellow")
    return list(runs[:limit]), what


def comparison_rows(
    runs: Sequence[Run], histories: dict[str, list[Metric]], metric: str, mode: str
) -> list[dict[str, Any]]:
    """One row per run: name, id, status, the params that differ between ``runs`` (``-`` where missing),
    the latest val metrics, ``best_<metric>`` over ``histories`` and its count ``epochs``; best first."""
    params = [{k: v for k, v in run.data.params.items() if not k.startswith(IGNORED_PARAM_PREFIXES)} for run in runs]
    differing = sorted(k for k in {k for p in params for k in p} if len({p.get(k, MISSING) for p in params}) > 1)
    latest = [k for k in dict.fromkeys((*FINAL_METRICS, metric)) if any(k in run.data.metrics for run in runs)]
    best_key, pick = f"best_{metric}", max if mode == "max" else min
    rows = []
    for run, run_params in zip(runs, params, strict=True):
        history = histories[run.info.run_id]
        rows.append(
            {
                "run_name": run.info.run_name,
                "run_id": run.info.run_id,
                "status": run.info.status,
                **{k: run_params.get(k, MISSING) for k in differing},
                **{k: run.data.metrics.get(k) for k in latest},
                best_key: pick(m.value for m in history) if history else None,
                "epochs": len(history),
            }
        )
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda row: (row[best_key] is None, sign * row[best_key] if row[best_key] is not None else 0))
    return rows


def _cell(key: str, value: Any) -> str:
    if value is None:
        return MISSING
    if key == "run_id":
        return value[:8]
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    """The rows as a table (short run ids, 4 decimals); cells fold rather than lose characters in a narrow
    terminal, and output that is not a terminal gets the table's full width instead of 80 columns."""
    table = Table(title=title, title_justify="left")
    for key in rows[0]:
        numeric = any(isinstance(row[key], (int, float)) for row in rows)
        table.add_column(key, justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        table.add_row(*(_cell(key, value) for key, value in row.items()))
    if not console.is_terminal:
        table.width = Measurement.get(console, console.options.update_width(10_000), table).maximum
    console.print(table, crop=False)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """The table with full run ids and unrounded metrics; a missing metric is an empty cell."""
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_metric(
    rows: list[dict[str, Any]], histories: dict[str, list[Metric]], epochs: dict[str, dict[int, float]], metric: str
) -> Figure:
    """``metric`` against the epoch (``epochs``: each run's ``epoch`` metric by step; runs logged before it had
    their val metrics at the epoch as step), one line per run in table order (no pyplot state, Agg)."""
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for row in rows:
        epoch_at = epochs[row["run_id"]]
        points = sorted((epoch_at.get(m.step, m.step), m.value) for m in histories[row["run_id"]])
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o", label=f"{row['run_name']} ({row['run_id'][:8]})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
    if ax.lines:
        ax.legend(fontsize="small")
    return fig


def compare(cfg: DictConfig) -> list[dict[str, Any]]:
    """Compare the runs ``cfg.compare`` selects; returns the table rows, best ``compare.metric`` first."""
    opts = cfg.compare
    if opts.mode not in MODES:
        raise ConfigError(f"compare.mode={opts.mode}: must be one of {', '.join(MODES)} (is a higher metric better?)")
    tracker: MlflowTracker = build(cfg, "tracking")
    client = tracker.client()
    runs, what = select_runs(client, tracker, opts)
    metric = str(opts.metric)
    histories = {run.info.run_id: client.get_metric_history(run.info.run_id, metric) for run in runs}
    epochs = {
        run.info.run_id: {m.step: m.value for m in client.get_metric_history(run.info.run_id, "epoch")} for run in runs
    }
    rows = comparison_rows(runs, histories, metric, opts.mode)
    print_table(rows, f"{len(rows)} {what}, best {metric} ({opts.mode}) first")

    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = run_dir / "comparison.csv", run_dir / f"{metric}_per_epoch.png"
    write_csv(rows, csv_path)
    plot_metric(rows, histories, epochs, metric).savefig(png_path, dpi=100)
    short_ids = ",".join(row["run_id"][:8] for row in rows)
    # filed beside what it compares, not among it (a run without the compared metrics would join the training
    # experiment's charts): in "<experiment of the newest compared run>-comparisons"
    tracker.experiment_name = f"{client.get_experiment(runs[0].info.experiment_id).name}-comparisons"
    tags = {"task": "compare", "compared_runs": short_ids[:5000]}
    name = cfg.tracking.get("run_name") or f"compare {len(rows)} runs by {metric}"
    with tracker.start_run(tags, run_name=name) as run:
        for path in (csv_path, png_path):
            run.log_artifact(path, ARTIFACT_DIR)
    print_summary(
        "comparison written",
        {
            "table": f"{csv_path}  = runs:/{run.run_id}/{ARTIFACT_DIR}/{csv_path.name}",
            "plot": f"{png_path}  = runs:/{run.run_id}/{ARTIFACT_DIR}/{png_path.name}",
            "mlflow run": f"{run.run_name} ({run.run_id}) in experiment '{tracker.experiment_name}'",
            "mlflow ui": tracker.ui_command(),
            "run page": tracker.run_url(run.run_id) or "-",
            "compare in mlflow": tracker.compare_url(
                [row["run_id"] for row in rows], [r.info.experiment_id for r in runs]
            ),
        },
    )
    return rows
