"""``task=train``: build the run spec's objects, train, evaluate each epoch, log everything to MLflow.

With ``hardware.device_num`` × ``num_nodes`` > 1 the command relaunches itself through msrun and each rank
runs this same task on its data shard; rank 0 alone opens the MLflow run and writes checkpoints.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import mindspore as ms
from omegaconf import DictConfig, OmegaConf

from framework.config import ConfigError, build, overrides
from framework.engine import FitResult, Observer, Stop
from framework.engine.checkpoint import read_checkpoint, weights_sha256
from framework.engine.trainer import TrainingDiverged
from framework.launch import Hardware
from framework.launch.distributed import World, is_msrun_process
from framework.launch.msrun import RESULT_FILE, JobFailed, relaunch
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
from framework.tracking.study import StudyTrial


def train(cfg: DictConfig) -> FitResult:
    """Train ``cfg.model`` on ``cfg.dataset``; every object is built before the MLflow run opens.

    A job that stops early (signal, diverged loss, failed worker) with a checkpoint written says how to
    continue it.
    """
    hardware = prepare(cfg)
    run_dir = Path(cfg.paths.run_dir)
    try:
        return _train(cfg, hardware, run_dir)
    except (KeyboardInterrupt, TrainingDiverged, JobFailed):
        if not is_msrun_process() and (run_dir / "checkpoints" / "last.ckpt").is_file():
            print(f"continue it with: {resume_command(run_dir)}", file=sys.stderr)
        raise


def resume_command(run_dir: Path) -> str:
    """This job's command line, continuing from the newest intact checkpoint in ``run_dir``."""
    kept = [o for o in overrides() if not o.startswith(("resume=", "hydra.run.dir=", "paths.run_dir="))]
    return " ".join(["python run.py", *kept, "resume=auto", f"hydra.run.dir={run_dir}"])


def _train(cfg: DictConfig, hardware: Hardware, run_dir: Path) -> FitResult:
    if hardware.distributed and not is_msrun_process():
        tracker = build(cfg, "tracking")
        try:
            record = relaunch(hardware, overrides(), run_dir, tracker)  # rank 0's, on node 0
        finally:  # rank 0 may have been stopped between a checkpoint and sending the metrics it covers
            last = run_dir / "checkpoints" / "last.ckpt"
            tracker.deliver_kept(run_dir / "tracking", resume_step(last) if last.is_file() else 0)
        checkpoints = {k: Path(v) for k, v in record.get("checkpoints", {}).items()}
        return FitResult(record.get("history", []), record.get("best"), checkpoints, record.get("stopped"))
    world = hardware.setup(cfg.seed)
    data = build(cfg, "dataset")
    network = build_model(cfg, data.num_classes)
    loss_fn = build(cfg, "loss")
    trainer = build(cfg, "engine")
    updates_per_epoch = trainer.updates_per_epoch(data.steps_per_epoch(world.size))
    if updates_per_epoch == 0:
        raise ConfigError(
            f"dataset.batch_size={cfg.dataset.batch_size} is larger than the train split "
            f"({data.num_samples('train')} images, {world.size} shard(s)), or engine.accumulation_steps="
            f"{trainer.accumulation_steps} exceeds the batches per epoch, so an epoch has no optimizer update. "
            "Lower one of them."
        )
    global_batch_size = cfg.dataset.batch_size * world.size * trainer.accumulation_steps
    lr_factor = build(cfg, "lr_scaling").factor(global_batch_size)
    schedule = build(cfg, "scheduler", epochs=trainer.epochs, steps_per_epoch=updates_per_epoch)
    lr_per_update = (schedule * lr_factor).astype(schedule.dtype)
    optimizer = build(cfg, "optimizer", params=network.trainable_params(), learning_rate=ms.Tensor(lr_per_update))
    tracker = build(cfg, "tracking")
    checkpoint_dir = run_dir / "checkpoints"
    resume_from, resume_run_id = resolve_resume(
        cfg.get("resume"), tracker, run_dir, run_dir / "resume" / f"rank_{world.rank}"
    )

    # Rank 0 alone tracks the job; the other ranks train and evaluate without a run.
    # the spool keeps the run's records in the run dir while the tracking server does not answer
    tags, spool_dir = {**run_tags(cfg, "train"), "run_dir": str(run_dir)}, run_dir / "tracking"
    resume_position = resume_step(resume_from) if resume_from is not None else 0 if cfg.get("resume") else None
    earlier_spool = resume_from.parent.parent / "tracking" if resume_from is not None else spool_dir
    if world.is_main and earlier_spool.resolve() != spool_dir.resolve():  # resumed from another job's folder
        tracker.deliver_kept(earlier_spool, resume_position, drop_later=True)
    tracking = (
        tracker.start_run(tags, resume_run_id, spool_dir=spool_dir, resume_position=resume_position)
        if world.is_main
        else nullcontext()
    )
    with stop_signals_interrupt(), tracking as run:
        if run is not None:
            _write_result(run_dir, {"mlflow_run_id": run.run_id})
            if resume_from is None:
                log_run_spec(run, cfg)
                run.log_params(
                    {"world_size": world.size, "global_batch_size": global_batch_size, "lr_scale_factor": lr_factor}
                )
                run.log_text(json.dumps({"classes": data.class_names}, indent=1), "data/classes.json")
                fingerprint = data.fingerprint()
                run.log_text(json.dumps(fingerprint, indent=1), "data/fingerprint.json")
                run.set_tags({"data_train_sha256": str(fingerprint["train_sha256"])[:16]})
                title = f"{cfg.scheduler._target_.rsplit('.', 1)[-1]} schedule, {len(lr_per_update)} updates"
                run.log_figure(plot_schedule(lr_per_update, updates_per_epoch, title), "lr_schedule.png")
            else:  # params are fixed once logged; the resumed job's config is kept beside the original one
                stamp = time.strftime("%Y%m%d-%H%M%S")
                run.log_text(OmegaConf.to_yaml(cfg, resolve=True), f"config/resumed_{stamp}.yaml")
                run.set_tags({"resumed_from": str(cfg.resume)})
        meta = {
            "model": cfg.model.name,
            "num_classes": data.num_classes,
            "class_names": data.class_names,
            "mlflow_run_id": run.run_id if run is not None else None,
        }
        study_trial = StudyTrial.from_environment() if world.is_main else None  # rank 0 reports to a sweep's study
        observers = (PruneTrial(study_trial, trainer.monitor),) if study_trial is not None else ()
        try:
            result = trainer.fit(
                network,
                loss_fn,
                optimizer,
                lr_per_update,
                data,
                run,
                checkpoint_dir,
                meta,
                resume_from=resume_from,
                world=world,
                observers=observers,
            )
        finally:
            if run is not None:
                for name in ("best", "last"):
                    path = checkpoint_dir / f"{name}.ckpt"
                    if path.is_file():
                        run.log_artifact(path, "checkpoints")
                if (checkpoint_dir / "last.ckpt").is_file():  # stopped anywhere: what its newest state covers may go
                    run.checkpointed = resume_step(checkpoint_dir / "last.ckpt")
                bad_images = data.bad_images()
                if bad_images:
                    run.log_text("\n".join(bad_images) + "\n", "data/bad_images.txt")
        checksum = _record_weights(network, run_dir, world)
        if run is not None:
            run.set_tags({"weights_sha256": checksum})
            if result.best is not None:
                best_epoch = int(result.best["epoch"])
                run.log_metrics({f"best_{trainer.monitor}": result.best[trainer.monitor]}, step=best_epoch)
            if result.stopped is not None:
                run.set_tags(stop_tags(result.stopped))

    if not world.is_main:
        print(f"rank {world.rank}: training finished, weights sha256 {checksum}")
        return result
    _write_result(
        run_dir,
        {
            "mlflow_run_id": run.run_id,
            "history": result.history,
            "best": result.best,
            "checkpoints": {k: str(v) for k, v in result.checkpoints.items()},
            "stopped": result.stopped,
        },
    )
    best = f"runs:/{run.run_id}/checkpoints/best.ckpt" if run.run_id else str(result.checkpoints.get("best"))
    print_summary(
        "training finished",
        {
            "mlflow run": f"{run.run_name} ({run.run_id or 'not created: the server did not answer'}) "
            f"in experiment '{tracker.experiment_name}'",
            "best": format_metrics(result.best),
            "last": format_metrics(result.last),
            **(
                {"stopped early": f"after epoch {result.stopped['epoch']}: {result.stopped['reason']}"}
                if result.stopped
                else {}
            ),
            "best checkpoint": f"{result.checkpoints.get('best')}  = {best}",
            "last checkpoint": str(result.checkpoints.get("last")),
            "weights sha256": checksum,
            "evaluate": f"python run.py task=eval ckpt={best}",
            "mlflow ui": tracker.ui_command(),
        },
    )
    return result


class PruneTrial(Observer):
    """Reports ``engine.monitor`` after each evaluation to the Optuna trial this job runs for, and ends
    training when the trial's pruner prunes it (the sweeper then records the trial as PRUNED)."""

    def __init__(self, trial: StudyTrial, monitor: str) -> None:
        self.trial, self.monitor = trial, monitor

    def on_evaluation(self, epoch: int, step: int, metrics: dict, history: list) -> Stop | None:
        value = metrics.get(self.monitor)
        if value is None or not self.trial.pruned(value, epoch):
            return None
        pruner = type(self.trial.pruner).__name__
        return Stop("pruned", f"pruned by {pruner} (Optuna trial {self.trial.number}): {self.monitor} {value:.4f}")


def stop_tags(stopped: dict) -> dict[str, str]:
    """MLflow tags of a run that ended early: at which epoch, why, and ``pruned=true`` for a pruned trial."""
    tags = {"stopped_epoch": str(stopped["epoch"]), "stop_reason": str(stopped["reason"])}
    if stopped["kind"] == "pruned":
        tags["pruned"] = "true"
    return tags


def resume_step(checkpoint: Path) -> int:
    """The optimizer micro-step a training-state checkpoint was written at."""
    return int(read_checkpoint(checkpoint, meta_only=True)[1]["global_step"])


def _record_weights(network: ms.nn.Cell, run_dir: Path, world: World) -> str:
    """Checksum of the final weights; over several ranks each writes its own so they can be compared."""
    checksum = weights_sha256(network)
    if world.size > 1:
        path = run_dir / "ranks" / f"rank_{world.rank}" / "weights.sha256"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(checksum + "\n")
    return checksum


def _write_result(run_dir: Path, record: dict) -> None:
    """Rank 0's record of the job (MLflow run id, then the result) for the process that launched it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RESULT_FILE).write_text(json.dumps(record, indent=1))
