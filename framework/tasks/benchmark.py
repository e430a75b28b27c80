"""``task=benchmark``: how fast the composed run spec trains, next to a hand-written loop and timm.

Measurements (``benchmark.measure``):
- ``data``: the configured train pipeline alone (decode, augment, batch, mixup), img/s after warm-up batches;
- ``train_step``: our compiled train step (``engine`` config: amp, loss scale, clipping, accumulation) as the
  Trainer drives it, with the loss and finite flag read back every step; also the time from process start to
  the end of the first step (imports, model build, graph compile) and the peak RSS;
- ``eval``: the network's inference forward as ``task=eval`` runs it (the ``inference`` config's engine: ONNX
  Runtime on the CPU where it computes what MindSpore does) and as MindSpore runs it, img/s;
- ``hand_loop``: two minimal hand-written MindSpore steps on the same network, loss and optimizer, no
  framework step: ``value_and_grad`` + ``ms.jit`` (MindSpore's tutorial form) and ``nn.TrainOneStepCell``
  (what ``mindspore.Model`` runs); the framework's overhead is measured against the faster of the two;
- ``timm``: the same network in timm/PyTorch (``benchmark_timm.py``; needs the ``bench`` extra).

Model measurements use one random batch of ``benchmark.batch_size`` × 3 × ``image_size``² kept on the device
(no data loading), each framework in a fresh process of its own (clean time-to-first-step and peak RSS), with
``benchmark.threads`` CPU threads. Rates are the median of ``rounds`` rounds of ``steps`` steps, the rounds of
our step and the hand loops interleaved so drift hits all alike. ``benchmark.profile=true`` adds an op-level
profile of both train steps (MindSpore profiler, torch.profiler) as CSV artifacts.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import mindspore as ms
import mindspore.dataset as ds
import mindspore.nn as nn
import numpy as np
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from framework.config import ConfigError, build
from framework.engine.inference import mindspore_forward
from framework.engine.losses import HeadsLoss
from framework.errors import UserError
from framework.launch.compile_cache import compile_cache
from framework.optim.optimizers import NO_DECAY_NAMES
from framework.optim.schedules import UpdateLr
from framework.runtime.signals import stop_signals_interrupt
from framework.schema import NonNegative, Positive
from framework.tasks import benchmark_timm
from framework.tasks.benchmark_timm import images_per_second, peak_rss_mb, seconds_since_process_start
from framework.tasks.common import console, log_run_spec, prepare, print_summary, run_tags
from framework.tracking.naming import run_name

Measurement = Literal["data", "train_step", "eval", "hand_loop", "timm"]
MEASUREMENTS = get_args(Measurement)
# our model name → timm's name for the same architecture (NASNet-A-Mobile and Conformer-Ti have none in timm)
TIMM_MODELS = {"resnext50_32x4d": "resnext50_32x4d", "efficientnet_b2": "efficientnet_b2", "nfnet_f0": "dm_nfnet_f0"}


@dataclass
class Benchmark:
    """What to measure, on what input, for how long (``benchmark/`` configs)."""

    measure: Sequence[Measurement] = ("data", "train_step", "eval", "hand_loop")
    image_size: Annotated[int, Positive] = 224
    batch_size: Annotated[int, Positive] = 32
    num_classes: Annotated[int, Positive] = 1000
    threads: Annotated[int, Positive] | None = None  # CPU threads for MindSpore kernels and torch; null: default
    warmup_steps: Annotated[int, NonNegative] = 2
    steps: Annotated[int, Positive] = 5
    rounds: Annotated[int, Positive] = 3
    warmup_batches: Annotated[int, NonNegative] = 5
    batches: Annotated[int, Positive] = 50
    timm_model: str | None = None  # null: TIMM_MODELS[model.name]
    profile: bool = False

    def __post_init__(self) -> None:  # choices and ranges: the schema's, checked before any task runs
        self.measure = [str(m) for m in self.measure]

    @property
    def models(self) -> bool:
        return bool({"train_step", "eval", "hand_loop"} & set(self.measure))


def data_images_per_second(loader: ds.Dataset, warmup_batches: int, batches: int) -> float:
    """img/s of iterating ``loader`` (numpy output, nothing else done, epochs repeated) after ``warmup_batches``."""
    iterator = loader.repeat().create_tuple_iterator(output_numpy=True)
    for _ in range(warmup_batches):
        next(iterator)
    return images_per_second(lambda: next(iterator), loader.get_batch_size(), batches, 1)


def benchmark(cfg: DictConfig) -> dict[str, float]:
    """Run the measurements ``cfg.benchmark`` selects for ``cfg.model``; print a table, log an MLflow run."""
    prepare(cfg).setup(cfg.seed)
    bench: Benchmark = build(cfg, "benchmark")
    timm_model = (bench.timm_model or TIMM_MODELS.get(str(cfg.model.name))) if "timm" in bench.measure else None
    if "timm" in bench.measure and timm_model is None:
        raise ConfigError(
            f"benchmark.measure has timm but timm has no {cfg.model.name}; models with a timm twin: "
            f"{', '.join(TIMM_MODELS)} (or name one: benchmark.timm_model=<timm name>)"
        )
    timm_sgd = timm_optimizer(cfg.optimizer) if "timm" in bench.measure else None
    work_dir = Path(cfg.paths.run_dir) / "benchmark"
    work_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, float] = {}
    if "data" in bench.measure:
        data = build(cfg, "dataset")
        if data.steps_per_epoch() == 0:
            raise ConfigError(f"dataset.batch_size={cfg.dataset.batch_size} is larger than the train split")
        results["data_img_per_s"] = data_images_per_second(data.loader("train"), bench.warmup_batches, bench.batches)
    if bench.models:
        results.update(measure_in_fresh_processes(cfg, bench, work_dir))
    versions: dict[str, str] = {}
    if "timm" in bench.measure:
        spec = {
            **{
                k: getattr(bench, k)
                for k in ("image_size", "batch_size", "num_classes", "threads", "warmup_steps", "steps", "rounds")
            },
            "model": timm_model,
            # the same network: our model config's dropout and stochastic depth (timm's defaults are 0)
            "model_kwargs": {k: float(cfg.model.get(k) or 0.0) for k in ("drop_rate", "drop_path_rate")},
            "seed": int(cfg.seed),
            "optimizer": timm_sgd,
            "device": "cuda" if cfg.hardware.device_target == "GPU" else "cpu",
            "profile": str(work_dir / "profile_timm.csv") if bench.profile else None,
        }
        timm_results = in_fresh_process([sys.executable, benchmark_timm.__file__], spec, work_dir / "timm")
        versions = timm_results.pop("versions")
        results.update({f"timm_{k}": v for k, v in timm_results.items()})
        if "train_step_img_per_s" in results:
            results["train_ratio_vs_timm"] = results["train_step_img_per_s"] / results["timm_train_img_per_s"]
        if "eval_img_per_s" in results:
            results["eval_ratio_vs_timm"] = results["eval_img_per_s"] / results["timm_eval_img_per_s"]
    if "data_img_per_s" in results and "train_step_img_per_s" in results:
        results["data_over_train_step"] = results["data_img_per_s"] / results["train_step_img_per_s"]
    engine = results.pop("eval_engine", None)
    run = log_benchmark(cfg, results, {"timm_model": timm_model, "inference_engine": engine, **versions}, work_dir)
    console.print(results_table(cfg, bench, timm_model, results, engine))
    for profile in sorted(work_dir.glob("profile_*.csv")):
        console.print(profile_table(profile))
    print_summary(
        f"benchmark: {cfg.model.name}", {"mlflow run": f"{run.run_name} ({run.run_id})", "files": str(work_dir)}
    )
    return results


def timm_optimizer(optimizer: DictConfig) -> dict[str, Any]:
    """Our optimizer config for timm's side, which runs torch's SGD: the same momentum, Nesterov flag and weight
    decay on the same parameters (``filter_bias_and_norm``: not biases, gains and norm parameters; else MindSpore's
    rule, not norm parameters). Other optimizers have no SGD twin: the comparison would time different updates."""
    if optimizer.name not in ("sgd", "momentum"):
        raise ConfigError(
            f"benchmark.measure has timm, whose side trains with SGD (momentum); optimizer.name={optimizer.name} "
            "has no twin there: compare with optimizer=momentum (or sgd)"
        )
    filtered = bool(optimizer.get("filter_bias_and_norm", False))
    return {
        "momentum": float(optimizer.momentum),
        "nesterov": bool(optimizer.nesterov),
        "weight_decay": float(optimizer.weight_decay),
        "no_decay_names": list(NO_DECAY_NAMES) if filtered else [],
        "no_decay_ndim1": filtered,
    }


def results_table(
    cfg: DictConfig, bench: Benchmark, timm_model: str | None, results: dict[str, float], engine: str | None = None
) -> Table:
    """One row per implementation (ours, the hand-written loops, timm): train and eval img/s, start-up, memory;
    our eval on the engine task=eval runs (``engine``), and on MindSpore."""
    table = Table(
        title=f"{cfg.model.name}: {bench.image_size} px, batch {bench.batch_size}, "
        f"{bench.threads or 'default'} threads, {cfg.hardware.device_target}"
        + (f"; timm: {timm_model}" if timm_model else "")
    )
    for column in ("", "train img/s", "eval img/s", "first step s", "peak RSS MiB", "train vs ours"):
        table.add_column(column, justify="right")

    def cell(key: str, digits: int = 1) -> str:
        return f"{results[key]:.{digits}f}" if key in results else "-"

    def versus_ours(key: str) -> str:
        if key not in results or "train_step_img_per_s" not in results:
            return "-"
        return f"{results[key] / results['train_step_img_per_s']:.2f}"

    first_step = cell("time_to_first_step_s")
    if "time_to_first_step_cached_s" in results:  # a repeated run: the graph from hardware.compile_cache
        first_step += f" (cached {cell('time_to_first_step_cached_s')})"
    table.add_row(
        "ours", cell("train_step_img_per_s"), cell("eval_img_per_s"), first_step,
        cell("peak_rss_mb", 0), "1.00" if "train_step_img_per_s" in results else "-",
    )  # fmt: skip
    if "eval_mindspore_img_per_s" in results and engine and not engine.startswith("mindspore"):
        table.add_row("on MindSpore", "", cell("eval_mindspore_img_per_s"), "", "", "")
    if "hand_jit_img_per_s" in results:
        table.add_row("hand: jit", cell("hand_jit_img_per_s"), "", "", "", versus_ours("hand_jit_img_per_s"))
        table.add_row("hand: cell", cell("hand_cell_img_per_s"), "", "", "", versus_ours("hand_cell_img_per_s"))
    if "timm_train_img_per_s" in results:
        table.add_row(
            "timm", cell("timm_train_img_per_s"), cell("timm_eval_img_per_s"),
            cell("timm_time_to_first_step_s"), cell("timm_peak_rss_mb", 0), versus_ours("timm_train_img_per_s"),
        )  # fmt: skip
    notes = []
    if "framework_overhead_pct" in results:
        notes.append(f"framework overhead vs the faster hand loop: {results['framework_overhead_pct']:.1f} %")
    if "train_ratio_vs_timm" in results:
        notes.append(f"ours/timm train {results['train_ratio_vs_timm']:.2f}")
    if "eval_ratio_vs_timm" in results:
        notes.append(f"ours/timm eval {results['eval_ratio_vs_timm']:.2f}")
    if engine:
        notes.append(f"eval engine: {engine}")
    if "data_img_per_s" in results:
        notes.append(f"data pipeline {results['data_img_per_s']:.0f} img/s")
    table.caption = "; ".join(notes)
    if "hand_jit_img_per_s" in results:
        table.caption += "\nhand: jit = value_and_grad + ms.jit step; hand: cell = nn.TrainOneStepCell"
    return table


def profile_table(path: Path, rows: int = 8) -> Table:
    """The slowest ops of one op-level profile CSV."""
    with path.open() as f:
        ops = list(csv.DictReader(f))
    table = Table(title=f"{path.stem}: slowest of {len(ops)} op types, per train step")
    for column in ("op", "calls", "ms", "%"):
        table.add_column(column, justify="left" if column == "op" else "right")
    for op in ops[:rows]:
        table.add_row(
            op["op"],
            f"{float(op['calls_per_step']):.0f}",
            f"{float(op['ms_per_step']):.1f}",
            f"{float(op['percent']):.1f}",
        )
    return table


def log_benchmark(cfg: DictConfig, results: dict[str, float], tags: dict[str, str | None], work_dir: Path) -> Any:
    """A run of its own in the ``<experiment>-benchmarks`` experiment (kept out of the training runs' charts):
    the run spec, ``tags`` that are set, every figure as a metric and in ``benchmark/results.json``, profiles."""
    tracker = build(cfg, "tracking")
    tracker.experiment_name += "-benchmarks"
    with (
        stop_signals_interrupt(),
        tracker.start_run(run_tags(cfg, "benchmark"), run_name=run_name(cfg, "benchmark")) as run,
    ):
        log_run_spec(run, cfg)
        run.set_tags({key: value for key, value in tags.items() if value})
        run.log_metrics(results, step=0)
        run.log_text(json.dumps(results, indent=2), "benchmark/results.json")
        for profile in sorted(work_dir.glob("profile_*.csv")):
            run.log_artifact(profile, "benchmark")
    return run


def memory_gib() -> float:
    """This machine's memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def mindspore_worker_command() -> list[str]:
    return [sys.executable, str(Path(__file__).with_name("benchmark_worker.py"))]


class BenchmarkFailed(UserError, RuntimeError):
    """A measuring process died: its exit status or signal and its last error lines."""

    kind = "benchmark error"


def in_fresh_process(command: list[str], spec: dict[str, Any], stem: Path) -> dict[str, Any]:
    """Run ``command SPEC.json`` in a new process; it writes its results to ``spec['result']`` as JSON.

    Its output goes to the terminal as it runs; a failure raises with the command's last error lines.
    """
    spec_path, result_path = stem.with_suffix(".spec.json"), stem.with_suffix(".result.json")
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    with tempfile.TemporaryFile("w+") as errors:
        done = subprocess.run([*command, str(spec_path)], stderr=errors, check=False)
        errors.seek(0)
        tail = [line.rstrip() for line in errors if line.strip() and "WARNING" not in line][-5:]
    if done.returncode != 0 or not result_path.is_file():
        if any("No module named 'torch'" in line or "No module named 'timm'" in line for line in tail):
            raise ConfigError('benchmark.measure has timm, which needs the bench extra: pip install -e ".[bench]"')
        if done.returncode == -signal.SIGKILL:
            memory = memory_gib()
            raise BenchmarkFailed(
                f"the {stem.name} benchmark process was killed (SIGKILL), most likely out of memory "
                f"({memory:.0f} GiB here); lower benchmark.batch_size or benchmark.image_size"
            )
        raise BenchmarkFailed(f"the {stem.name} benchmark process failed (exit {done.returncode}): " + " | ".join(tail))
    results = json.loads(result_path.read_text())
    if "config_error" in results:
        raise ConfigError(results["config_error"])
    return results


def measure_in_fresh_processes(cfg: DictConfig, bench: Benchmark, work_dir: Path) -> dict[str, float]:
    """Our measurements in a fresh process; with ``hardware.compile_cache`` set, the first step once more in
    another, reusing the graph the first compiled into an emptied folder (start-up both ways)."""
    cache = str(work_dir / "compile_cache") if cfg.hardware.compile_cache and "train_step" in bench.measure else None
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
    spec = {"config": OmegaConf.to_container(cfg, resolve=True), "benchmark": asdict(bench), "cache": cache}
    results = in_fresh_process(mindspore_worker_command(), {**spec, "first_step_only": False}, work_dir / "mindspore")
    if cache is not None:
        again = in_fresh_process(mindspore_worker_command(), {**spec, "first_step_only": True}, work_dir / "cached")
        results["time_to_first_step_cached_s"] = again["time_to_first_step_s"]
    return results


def mindspore_worker() -> None:
    """Entry of the MindSpore benchmark process: read the spec named on the command line, write results."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    cfg, bench = OmegaConf.create(spec["config"]), Benchmark(**spec["benchmark"])
    try:
        results: dict[str, Any] = measure_mindspore(
            cfg, bench, Path(spec["result"]).parent, spec["cache"], spec["first_step_only"]
        )
    except ConfigError as err:
        results = {"config_error": str(err)}
    Path(spec["result"]).write_text(json.dumps(results))


def measure_mindspore(
    cfg: DictConfig, bench: Benchmark, work_dir: Path, cache: str | None = None, first_step_only: bool = False
) -> dict[str, float]:
    """Our train step (and eval, hand-written loops, profile) on one random batch, in this fresh process; its
    first step compiled with the compile cache in ``cache`` (``first_step_only``: the graph must be there)."""
    build(cfg, "hardware").setup(cfg.seed)
    if bench.threads and cfg.hardware.device_target == "CPU":
        ms.device_context.cpu.op_tuning.threads_num(bench.threads)
    rng = np.random.default_rng(cfg.seed)
    shape = (bench.batch_size, 3, bench.image_size, bench.image_size)
    images = ms.Tensor(rng.standard_normal(shape, dtype=np.float32))
    labels = ms.Tensor(rng.integers(0, bench.num_classes, bench.batch_size, dtype=np.int32))
    network = build(cfg, "model", num_classes=bench.num_classes)
    steps_per_epoch = bench.warmup_steps + bench.steps * bench.rounds + 1
    peak_lr = float(np.max(np.asarray(build(cfg, "scheduler", epochs=1, steps_per_epoch=steps_per_epoch))))
    update_lr = UpdateLr(peak_lr)
    optimizer = build(cfg, "optimizer", params=network.trainable_params(), learning_rate=update_lr)
    network, step = build(cfg, "engine").train_step(network, build(cfg, "loss"), optimizer)
    network.set_train(True)

    def framework_step() -> None:  # as Trainer.fit: the lr set, the loss and the finite flag back to the host
        update_lr.set(peak_lr)
        loss, finite = step(images, labels)
        float(loss.asnumpy()), bool(finite.asnumpy())

    with compile_cache(cache, {"config": OmegaConf.to_container(cfg), "benchmark": asdict(bench)}) as cached:
        framework_step()
    results = {"time_to_first_step_s": seconds_since_process_start()}
    if first_step_only:
        if cached != "reused":
            raise BenchmarkFailed(f"the compile cache in {cache} did not hold the first process's graph ({cached})")
        return results
    for _ in range(bench.warmup_steps):
        framework_step()
    loops: dict[str, Callable[[], Any]] = {"train_step": framework_step}
    results["peak_rss_mb"] = peak_rss_mb()  # training's, before eval's engine (an export, an ONNX Runtime session)
    if "eval" in bench.measure:
        results.update(measure_eval(cfg, bench, network, images.asnumpy(), work_dir))
    if "hand_loop" in bench.measure:
        for name, loop in (("hand_jit", hand_jit_loop), ("hand_cell", hand_cell_loop)):
            hand_network = build(cfg, "model", num_classes=bench.num_classes)
            hand_optimizer = build(cfg, "optimizer", params=hand_network.trainable_params(), learning_rate=peak_lr)
            loops[name] = loop(hand_network, build(cfg, "loss"), hand_optimizer, images, labels)
        for name in ("hand_jit", "hand_cell"):
            for _ in range(bench.warmup_steps + 1):
                loops[name]()
    if "train_step" in bench.measure or "hand_loop" in bench.measure:
        rates: dict[str, list[float]] = {name: [] for name in loops}
        for _ in range(bench.rounds):  # interleaved rounds: the loops share any drift of the machine
            for name, run in loops.items():
                rates[name].append(images_per_second(run, bench.batch_size, bench.steps, 1))
        results.update({f"{name}_img_per_s": float(np.median(r)) for name, r in rates.items()})
    if "hand_loop" in bench.measure:
        fastest_hand = max(results["hand_jit_img_per_s"], results["hand_cell_img_per_s"])
        results["framework_overhead_pct"] = 100 * (1 - results["train_step_img_per_s"] / fastest_hand)
    if bench.profile:
        profile_train_step(framework_step, bench.steps, work_dir)
    return results


def measure_eval(
    cfg: DictConfig, bench: Benchmark, network: nn.Cell, images: np.ndarray, work_dir: Path
) -> dict[str, Any]:
    """Eval img/s on the engine ``task=eval`` runs (``eval_engine`` says which) and on MindSpore."""
    forward, engine = build(cfg, "inference").forward(
        network, bench.image_size, cfg.hardware.device_target, work_dir / "inference"
    )
    results: dict[str, Any] = {"eval_engine": engine}
    for name, run in (("eval", forward), ("eval_mindspore", mindspore_forward(network))):
        run(images)
        results[f"{name}_img_per_s"] = images_per_second(
            lambda run=run: run(images), bench.batch_size, bench.steps, bench.rounds
        )
    network.set_train(True)
    return results


def hand_jit_loop(
    network: nn.Cell, loss_fn: nn.Cell, optimizer: nn.Optimizer, images: ms.Tensor, labels: ms.Tensor
) -> Callable[[], Any]:
    """MindSpore's tutorial training loop: ``value_and_grad`` of a loss function, the update under ``ms.jit``."""

    weights = tuple(float(w) for w in getattr(network, "head_loss_weights", (1.0,)))

    def forward(x: ms.Tensor, y: ms.Tensor) -> ms.Tensor:
        logits = network(x)
        if isinstance(logits, tuple):  # NASNet (aux head) and Conformer (two heads) train every head
            return sum(w * loss_fn(head, y) for w, head in zip(weights, logits))  # noqa: B905 (compiled by MindSpore, whose graph syntax has no zip keywords)
        return loss_fn(logits, y)

    grad_fn = ms.value_and_grad(forward, None, optimizer.parameters)

    @ms.jit
    def train_step(x: ms.Tensor, y: ms.Tensor) -> ms.Tensor:
        loss, grads = grad_fn(x, y)
        optimizer(grads)
        return loss

    network.set_train(True)
    return lambda: train_step(images, labels).asnumpy()


def hand_cell_loop(
    network: nn.Cell, loss_fn: nn.Cell, optimizer: nn.Optimizer, images: ms.Tensor, labels: ms.Tensor
) -> Callable[[], Any]:
    """The loop MindSpore's ``Model`` runs: ``nn.TrainOneStepCell`` around network + loss, one compiled cell."""
    step = nn.TrainOneStepCell(HeadsLoss(network, loss_fn), optimizer)
    step.set_train(True)
    return lambda: step(images, labels).asnumpy()


def profile_train_step(run: Callable[[], Any], steps: int, work_dir: Path) -> None:
    """Op-level profile of ``steps`` train steps with MindSpore's profiler → ``profile_mindspore.csv`` (CPU)."""
    output = work_dir / "mindspore_profiler"
    profiler = ms.Profiler(output_path=str(output))
    for _ in range(steps):
        run()
    profiler.analyse()
    found = sorted(output.glob("**/cpu_op_type_info_*.csv"))
    if not found:  # GPU/Ascend keep their own formats: the profiler's folder is there to read
        return
    with found[0].open() as f:
        table = [line.rstrip("\n").split(",") for line in f][1:]
    total = sum(float(row[3]) for row in table)
    rows = [
        {
            "op": op,
            "calls_per_step": int(count) / steps,
            "ms_per_step": float(ms_total) / steps,
            "percent": 100 * float(ms_total) / total,
        }
        for op, count, _, ms_total, *_ in sorted(table, key=lambda row: -float(row[3]))
    ]
    benchmark_timm.write_profile(rows, work_dir / "profile_mindspore.csv")
