"""``task=benchmark_table``: README's side-by-side with timm, measured anew and written in place, by one command.

Each row (model, image size, batch) is ``python run.py task=benchmark benchmark=vs_timm ...`` in a process of its
own (its own MLflow run, as when typed); the figures come from the files those runs write. The table (ours /
timm and the ratio for train, eval, peak RSS and time to the first step, with the date, versions, CPU and the
command) replaces what stands between ``<!-- benchmark-table -->`` and ``<!-- /benchmark-table -->`` in
``benchmark_table.readme``, and is logged as ``benchmark/table.md`` to a run of the benchmarks experiment.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import mindspore as ms
from omegaconf import DictConfig

from framework.config import ConfigError, build
from framework.errors import UserError
from framework.paths import PROJECT_ROOT
from framework.runtime.signals import stop_signals_interrupt
from framework.schema import Positive
from framework.tasks.benchmark import memory_gib
from framework.tasks.common import console, log_run_spec, prepare, print_summary, run_tags

BEGIN, END = "<!-- benchmark-table -->", "<!-- /benchmark-table -->"
NAMES = {"resnext50": "ResNeXt-50 32×4d", "efficientnet_b2": "EfficientNet-B2", "nfnet_f0": "NFNet-F0"}


@dataclass
class TableSpec:
    """The rows to measure (``[model config, image size, batch]``), how long, and the README to write."""

    rows: list[tuple[str, Annotated[int, Positive], Annotated[int, Positive]]] = field(default_factory=list)
    rounds: Annotated[int, Positive] = 2
    steps: Annotated[int, Positive] = 5
    readme: str | None = None  # null: print the table only


class RowFailed(UserError, RuntimeError):
    """A row's benchmark process failed: its command and last lines."""

    kind = "benchmark error"


def benchmark_table(cfg: DictConfig) -> str:
    """Measure every row in its own ``task=benchmark`` process, then write, log and print the table."""
    prepare(cfg)
    spec: TableSpec = build(cfg, "benchmark_table")
    readme = Path(spec.readme) if spec.readme else None
    if readme is not None and not (readme.is_file() and BEGIN in readme.read_text() and END in readme.read_text()):
        raise ConfigError(f"benchmark_table.readme={readme}: no such file with {BEGIN} ... {END} in it")
    run_dir = Path(cfg.paths.run_dir)
    rows = []
    for number, (model, size, batch) in enumerate(spec.rows, 1):
        console.print(f"row {number}/{len(spec.rows)}: {model}, {size} px, batch {batch}: ours, then timm")
        rows.append(measure_row(cfg, spec, model, size, batch, run_dir / f"{model}_{size}"))
    table = markdown_table(rows, spec.rounds)
    if readme is not None:
        write_between_markers(readme, table)
    tracker = build(cfg, "tracking")
    tracker.experiment_name += "-benchmarks"
    name = cfg.tracking.run_name or "benchmark table"
    with stop_signals_interrupt(), tracker.start_run(run_tags(cfg, "benchmark_table"), run_name=name) as run:
        log_run_spec(run, cfg)
        run.log_text(table, "benchmark/table.md")
    console.print(table, highlight=False)
    print_summary("benchmark table", {"readme": str(readme or "-"), "mlflow run": f"{run.run_name} ({run.run_id})"})
    return table


def measure_row(cfg: DictConfig, spec: TableSpec, model: str, size: int, batch: int, folder: Path) -> dict[str, Any]:
    """One row's figures: ``task=benchmark benchmark=vs_timm`` run as a user types it, writing into ``folder``."""
    overrides = [f"model={model}", f"benchmark.image_size={size}", f"benchmark.batch_size={batch}"]
    overrides += ["benchmark.measure=[train_step,eval,timm]", f"benchmark.rounds={spec.rounds}"]
    overrides += [f"benchmark.steps={spec.steps}"]
    command = [sys.executable, str(PROJECT_ROOT / "run.py"), "task=benchmark", "benchmark=vs_timm", *overrides]
    where = [f"hydra.run.dir={folder}", f"tracking.local_store={cfg.tracking.local_store}", f"seed={cfg.seed}"]
    where += [f"tracking.uri={cfg.tracking.uri}"] if cfg.tracking.uri else []
    done = subprocess.run([*command, *where], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = " | ".join(line for line in done.stderr.strip().splitlines()[-3:])
        raise RowFailed(f"{' '.join(['python run.py', *command[2:]])} failed (exit {done.returncode}): {tail}")
    ours = json.loads((folder / "benchmark" / "mindspore.result.json").read_text())
    cached = json.loads((folder / "benchmark" / "cached.result.json").read_text())  # hardware.compile_cache's run
    ours["time_to_first_step_cached_s"] = cached["time_to_first_step_s"]
    timm = json.loads((folder / "benchmark" / "timm.result.json").read_text())
    return {"model": model, "size": size, "batch": batch, "ours": ours, "timm": timm}


def markdown_table(rows: list[dict[str, Any]], rounds: int) -> str:
    """The rows as README's table: ours / timm (ratio) per figure; the date, versions and machine above it."""
    versions = rows[0]["timm"]["versions"] if rows else {}
    about = (
        f"Measured {datetime.date.today():%Y-%m-%d} by `python run.py task=benchmark_table` on {cpu_name()} "
        f"({os.cpu_count()} cores, {memory_gib():.0f} GiB; MindSpore {ms.__version__}, torch "
        f"{versions.get('torch', '-')}, timm {versions.get('timm', '-')}; 1000 classes, 2 threads, "
        "`optimizer=momentum` (SGD with momentum and weight decay, the same on both sides); "
        f"img/s, median of {rounds} rounds; ours / timm (ratio)). Our eval runs on the engine `task=eval` uses "
        '(`inference`); "eval on MindSpore" is the network run by MindSpore itself; "repeated run" is a second '
        "process of the same run spec, its graph from the compile cache the first filled (`hardware.compile_cache`):"
    )
    lines = [
        textwrap.fill(about, width=115),
        "",
        "| model | size | batch | train | eval | eval on MindSpore | peak RSS MiB (training) | first step s "
        "| first step s, repeated run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours, timm = row["ours"], row["timm"]
        lines.append(
            f"| {NAMES.get(row['model'], row['model'])} | {row['size']} | {row['batch']} "
            f"| {versus(ours['train_step_img_per_s'], timm['train_img_per_s'], 1)} "
            f"| {versus(ours['eval_img_per_s'], timm['eval_img_per_s'], 1)} | {ours['eval_mindspore_img_per_s']:.1f} "
            f"| {versus(ours['peak_rss_mb'], timm['peak_rss_mb'], 0)} "
            f"| {versus(ours['time_to_first_step_s'], timm['time_to_first_step_s'], 1)} "
            f"| {versus(ours['time_to_first_step_cached_s'], timm['time_to_first_step_s'], 1)} |"
        )
    return "\n".join(lines) + "\n"


def versus(ours: float, timm: float, digits: int) -> str:
    return f"{ours:,.{digits}f} / {timm:,.{digits}f} ({ours / timm:.2f})"


def write_between_markers(readme: Path, table: str) -> None:
    """Replace what stands between the markers in ``readme`` by ``table``."""
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
