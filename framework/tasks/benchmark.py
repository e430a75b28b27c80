"""``task=benchmark``: measure throughput of the configured run spec, print a table, log it to MLflow.

Measurements (``benchmark.measure``):
- ``data``: the train pipeline (decode, augment, batch, mixup) alone, img/s after warm-up batches;
- ``train_step``: the compiled train step (forward, backward, optimizer) alone on one batch taken
  from the pipeline and reused, img/s after warm-up steps (so no data loading is timed).
Both use every core of the machine, one after the other; their ratio says whether the pipeline can
keep up with training.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import mindspore.dataset as ds
from omegaconf import DictConfig

from framework.config import ConfigError, build
from framework.engine.step import TrainStep
from framework.launch.signals import stop_signals_interrupt
from framework.tasks.common import build_model, log_run_spec, prepare, print_summary, run_tags

MEASUREMENTS = ("data", "train_step")


@dataclass
class Benchmark:
    """What to measure and for how long (``benchmark/`` configs)."""

    measure: Sequence[str] = MEASUREMENTS
    warmup_batches: int = 5
    batches: int = 50
    warmup_steps: int = 2
    steps: int = 10

    def __post_init__(self) -> None:
        unknown = sorted(set(self.measure) - set(MEASUREMENTS))
        if unknown:
            raise ValueError(f"benchmark.measure: unknown {unknown}; choose from {list(MEASUREMENTS)}")


def data_images_per_second(loader: ds.Dataset, warmup_batches: int, batches: int) -> float:
    """img/s of iterating ``loader`` (numpy output, nothing else done) after ``warmup_batches``."""
    iterator = loader.create_tuple_iterator(output_numpy=True, num_epochs=-1)
    for _ in range(warmup_batches):
        next(iterator)
    images, start = 0, time.perf_counter()
    for _ in range(batches):
        images += len(next(iterator)[0])
    return images / (time.perf_counter() - start)


def train_step_images_per_second(step: TrainStep, images, labels, warmup_steps: int, steps: int) -> float:
    """img/s of ``step(images, labels)`` repeated ``steps`` times after ``warmup_steps`` (compilation)."""
    for _ in range(warmup_steps):
        step(images, labels)[0].asnumpy()
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = step(images, labels)
    loss.asnumpy()  # wait for the last step
    return steps * images.shape[0] / (time.perf_counter() - start)


def benchmark(cfg: DictConfig) -> dict[str, float]:
    """Run the measurements ``cfg.benchmark`` selects for ``cfg.model`` on ``cfg.dataset``."""
    prepare(cfg).setup(cfg.seed)
    bench: Benchmark = build(cfg, "benchmark")
    data = build(cfg, "dataset")
    if data.steps_per_epoch() == 0:
        raise ConfigError(f"dataset.batch_size={cfg.dataset.batch_size} is larger than the train split")
    loader = data.loader("train")
    results: dict[str, float] = {}
    if "data" in bench.measure:
        results["data_img_per_s"] = data_images_per_second(loader, bench.warmup_batches, bench.batches)
    if "train_step" in bench.measure:
        network = build_model(cfg, data.num_classes)
        peak_lr = float(build(cfg, "scheduler", epochs=1, steps_per_epoch=bench.warmup_steps + bench.steps).max())
        optimizer = build(cfg, "optimizer", params=network.trainable_params(), learning_rate=peak_lr)
        network, step = build(cfg, "engine").train_step(network, build(cfg, "loss"), optimizer)
        network.set_train(True)
        images, labels = next(loader.create_tuple_iterator(num_epochs=1))
        results["train_step_img_per_s"] = train_step_images_per_second(
            step, images, labels, bench.warmup_steps, bench.steps
        )
    if len(results) == 2:
        results["data_over_train_step"] = results["data_img_per_s"] / results["train_step_img_per_s"]
    tracker = build(cfg, "tracking")
    with stop_signals_interrupt(), tracker.start_run(run_tags(cfg, "benchmark")) as run:
        log_run_spec(run, cfg)
        run.log_metrics(results, step=0)
    size = f"{cfg.dataset.image_size} px, batch {cfg.dataset.batch_size}, {cfg.dataset.num_parallel_workers} workers"
    print_summary(
        f"benchmark: {cfg.model.name}, {size}",
        {**{k: f"{v:.2f}" for k, v in results.items()}, "mlflow run": f"{run.run_name} ({run.run_id})"},
    )
    return results
