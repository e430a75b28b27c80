"""``task=eval``: evaluate a checkpoint on the configured dataset's val split, logged as a new MLflow run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from framework.config import build
from framework.engine import evaluate
from framework.engine.checkpoint import MICRO_STEP
from framework.runtime.signals import stop_signals_interrupt
from framework.tasks.common import (
    build_model,
    checkpoint_meta,
    derived_run_tags,
    format_metrics,
    load_weights,
    log_run_spec,
    prepare,
    print_summary,
    resolve_checkpoint,
    run_tags,
)
from framework.tracking.naming import run_name


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, float]:
    """Load ``cfg.ckpt`` into ``cfg.model`` and report val loss/top-1/top-5; tags the run with its source run."""
    prepare(cfg).setup(cfg.seed)
    tracker = build(cfg, "tracking")
    checkpoint, uri_run_id = resolve_checkpoint(cfg.ckpt, tracker, Path(cfg.paths.run_dir) / "checkpoint")
    written = checkpoint_meta(cfg, checkpoint)
    data = build(cfg, "dataset")
    network = build_model(cfg, data.num_classes, settings=written.get("model_settings"))
    meta = load_weights(cfg, checkpoint, network)
    forward, engine = build(cfg, "inference").forward(
        network, data.eval_image_size, cfg.hardware.device_target, Path(cfg.paths.run_dir) / "inference"
    )
    source_run_id = uri_run_id or meta.get("mlflow_run_id")
    tags = derived_run_tags(tracker, {**run_tags(cfg, "eval"), "inference_engine": engine}, source_run_id)
    with stop_signals_interrupt(), tracker.start_run(tags, run_name=run_name(cfg, "eval")) as run:
        log_run_spec(run, cfg)
        metrics = {f"val_{k}": v for k, v in evaluate(forward, data.loader("val")).items()}
        run.log_metrics({**metrics, "epoch": meta.get("epoch", 0)}, step=training_update(meta))
    print_summary(
        "evaluation finished",
        {
            "checkpoint": f"{cfg.ckpt}" + (f" (epoch {meta['epoch']})" if "epoch" in meta else ""),
            "metrics": format_metrics(metrics),
            "engine": engine,
            "mlflow run": f"{run.run_name} ({run.run_id}), source run {source_run_id or '-'}",
            "mlflow ui": tracker.ui_command(),
            "run page": tracker.run_url(run.run_id) or "-",
        },
    )
    return metrics


def training_update(meta: dict[str, Any]) -> int:
    """The optimizer update at which the checkpoint was written: the step its training run logged its metrics
    at, so the eval run's metrics line up with the training curves (0 for a checkpoint without a record)."""
    if MICRO_STEP not in meta:
        return 0
    return int(meta[MICRO_STEP]) // int(meta.get("accumulation_steps", 1))
