"""``task=train``: build the run spec's objects, train, evaluate each epoch, log everything to MLflow."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mindspore as ms
from omegaconf import DictConfig, OmegaConf

from framework.config import ConfigError, build
from framework.engine import FitResult
from framework.launch.signals import stop_signals_interrupt
from framework.optim.schedules import plot_schedule
from framework.tasks.common import (
    build_model,
    format_metrics,
    log_run_spec,
    prepare,
    print_summary,
    resolve_resume,
    run_tags,
)


def train(cfg: DictConfig) -> FitResult:
    """Train ``cfg.model`` on ``cfg.dataset``; every object is built before the MLflow run opens."""
    prepare(cfg)
    data = build(cfg, "dataset")
    network = build_model(cfg, data.num_classes)
    loss_fn = build(cfg, "loss")
    trainer = build(cfg, "engine")
    updates_per_epoch = trainer.updates_per_epoch(data.steps_per_epoch())
    if updates_per_epoch == 0:
        raise ConfigError(
            f"dataset.batch_size={cfg.dataset.batch_size} is larger than the train split "
            f"({data.num_samples('train')} images), or engine.accumulation_steps={trainer.accumulation_steps} "
            "exceeds the batches per epoch, so an epoch has no optimizer update. Lower one of them."
        )
    lr_per_update = build(cfg, "scheduler", epochs=trainer.epochs, steps_per_epoch=updates_per_epoch)
    optimizer = build(cfg, "optimizer", params=network.trainable_params(), learning_rate=ms.Tensor(lr_per_update))
    tracker = build(cfg, "tracking")
    run_dir = Path(cfg.paths.run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    resume_from, resume_run_id = resolve_resume(cfg.get("resume"), tracker, run_dir / "resume")

    with stop_signals_interrupt(), tracker.start_run(run_tags(cfg, "train"), run_id=resume_run_id) as run:
        if resume_from is None:
            log_run_spec(run, cfg)
            run.log_text(json.dumps({"classes": data.class_names}, indent=1), "data/classes.json")
            fingerprint = data.fingerprint()
            run.log_text(json.dumps(fingerprint, indent=1), "data/fingerprint.json")
            run.set_tags({"data_train_sha256": str(fingerprint["train_sha256"])[:16]})
            title = f"{cfg.scheduler._target_.rsplit('.', 1)[-1]} schedule, {len(lr_per_update)} updates"
            run.log_figure(plot_schedule(lr_per_update, updates_per_epoch, title), "lr_schedule.png")
        else:  # params are fixed once logged; the resumed job's config is kept beside the original one
            run.log_text(OmegaConf.to_yaml(cfg, resolve=True), f"config/resumed_{time.strftime('%Y%m%d-%H%M%S')}.yaml")
            run.set_tags({"resumed_from": str(cfg.resume)})
        meta = {
            "model": cfg.model.name,
            "num_classes": data.num_classes,
            "class_names": data.class_names,
            "mlflow_run_id": run.run_id,
        }
        try:
            result = trainer.fit(
                network, loss_fn, optimizer, lr_per_update, data, run, checkpoint_dir, meta, resume_from=resume_from
            )
        finally:
            for name in ("best", "last"):
                path = checkpoint_dir / f"{name}.ckpt"
                if path.is_file():
                    run.log_artifact(path, "checkpoints")
            bad_images = data.bad_images()
            if bad_images:
                run.log_text("\n".join(bad_images) + "\n", "data/bad_images.txt")

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
