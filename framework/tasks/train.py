"""``task=train``: build the run spec's objects, train, evaluate each epoch, log everything to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mindspore as ms
from omegaconf import DictConfig

from framework.config import ConfigError, build
from framework.engine import FitResult
from framework.launch.signals import stop_signals_interrupt
from framework.tasks.common import build_model, format_metrics, log_run_spec, prepare, print_summary, run_tags


def train(cfg: DictConfig) -> FitResult:
    """Train ``cfg.model`` on ``cfg.dataset``; every object is built before the MLflow run opens."""
    prepare(cfg)
    data = build(cfg, "dataset")
    network = build_model(cfg, data.num_classes)
    loss_fn = build(cfg, "loss")
    trainer = build(cfg, "engine")
    train_loader, val_loader = data.loader("train"), data.loader("val")
    steps_per_epoch = trainer.steps_per_epoch(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"dataset.batch_size={cfg.dataset.batch_size} is larger than the train split "
            f"({data.num_samples('train')} images), so an epoch has no full batch. Lower dataset.batch_size."
        )
    lr_per_step = build(cfg, "scheduler", epochs=trainer.epochs, steps_per_epoch=steps_per_epoch)
    optimizer = build(cfg, "optimizer", params=network.trainable_params(), learning_rate=ms.Tensor(lr_per_step))
    tracker = build(cfg, "tracking")
    checkpoint_dir = Path(cfg.paths.run_dir) / "checkpoints"

    with stop_signals_interrupt(), tracker.start_run(run_tags(cfg, "train")) as run:
        log_run_spec(run, cfg)
        run.log_text(json.dumps({"classes": data.class_names}, indent=1), "data/classes.json")
        meta = {
            "model": cfg.model.name,
            "num_classes": data.num_classes,
            "class_names": data.class_names,
            "mlflow_run_id": run.run_id,
        }
        try:
            result = trainer.fit(
                network,
                loss_fn,
                optimizer,
                lr_per_step,
                train_loader,
                val_loader,
                run,
                checkpoint_dir,
                meta,
                data_metrics=(lambda: {"data_bad_images": len(data.bad_images())}) if data.reads_files else None,
            )
        finally:
            for name in ("best", "last"):
                path = checkpoint_dir / f"{name}.ckpt"
                if path.is_file():
                    run.log_artifact(path, "checkpoints")
            if data.bad_images():
                run.log_text("\n".join(data.bad_images()) + "\n", "data/bad_images.txt")

    print_summary(
        "training finished",
        {
            "mlflow run": f"{run.run_name} ({run.run_id}) in experiment '{tracker.experiment_name}'",
            "best": format_metrics(result.best),
            "last": format_metrics(result.last),
            "best checkpoint": f"{result.checkpoints.get('best')}  = runs:/{run.run_id}/checkpoints/best.ckpt",
            "last checkpoint": str(result.checkpoints.get("last")),
            "evaluate": f"python run.py task=eval ckpt=runs:/{run.run_id}/checkpoints/best.ckpt",
            "mlflow ui": tracker.ui_command(),
        },
    )
    return result
