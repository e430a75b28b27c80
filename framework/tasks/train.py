"""``task=train``: build the run spec's objects, train, evaluate each epoch, log everything to MLflow.

With ``hardware.device_num`` × ``num_nodes`` > 1 the command relaunches itself through msrun and each rank
runs this same task on its data shard; rank 0 alone opens the MLflow run and writes checkpoints.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mindspore as ms
from omegaconf import DictConfig, OmegaConf

from framework.config import ConfigError, build, overrides
from framework.data.pipeline import ImageData
from framework.engine import FitResult, Observer
from framework.engine.checkpoint import read_micro_step, weights_sha256
from framework.engine.progress import ProgressDisplay
from framework.engine.trainer import Prepared, Trainer, TrainingDiverged
from framework.launch import Hardware
from framework.launch.compile_cache import compile_cache, file_fingerprint
from framework.launch.msrun import RESULT_FILE, JobFailed
from framework.models.registry import parameter_depth
from framework.optim.schedules import Schedule, UpdateLr, plot_schedule
from framework.runtime.signals import (
    deferred_stop,
    interrupts_unwrapped,
    raise_unheeded_stop,
    stop_signals_interrupt,
)
from framework.runtime.world import World, is_msrun_process
from framework.tasks.common import (
    Resume,
    build_model,
    console,
    format_metrics,
    log_run_spec,
    prepare,
    print_summary,
    refuse_other_model,
    resolve_resume,
    run_tags,
)
from framework.tasks.data_parallel import launch_data_parallel
from framework.tasks.observers import PruneTrial, TrackRun, stop_tags
from framework.tasks.pyfunc_model import save_pyfunc_model
from framework.tracking import MlflowRun, MlflowTracker
from framework.tracking.naming import command_line, run_name
from framework.tracking.study import StudyTrial


def train(cfg: DictConfig) -> FitResult:
    """Train ``cfg.model`` on ``cfg.dataset``; every object is built before the MLflow run opens.

    A job that stops early (signal, diverged loss, failed worker) with a checkpoint written says how to
    continue it.
    """
    hardware = prepare(cfg)
    run_dir = Path(cfg.paths.run_dir)
    try:
        with interrupts_unwrapped():
            return _train(cfg, hardware, run_dir)
    except (KeyboardInterrupt, TrainingDiverged, JobFailed) as err:
        finished = getattr(err, "finished", False)  # a stop signal came as training ended
        if not finished and not is_msrun_process() and (run_dir / "checkpoints" / "last.ckpt").is_file():
            print(f"continue it with: {resume_command(run_dir)}", file=sys.stderr)
        raise


def resume_command(run_dir: Path) -> str:
    """This job's command line, continuing from the newest intact checkpoint in ``run_dir``."""
    kept = [o for o in overrides() if not o.startswith(("resume=", "hydra.run.dir=", "paths.run_dir="))]
    return " ".join(["python run.py", *kept, "resume=auto", f"hydra.run.dir={run_dir}"])


@dataclass
class Job:
    """Everything a training job is made of, built (and so checked) before any MLflow run opens."""

    data: ImageData
    trainer: Trainer
    schedule: Schedule
    prepared: Prepared
    updates_per_epoch: int
    global_batch_size: int
    lr_factor: float

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches per epoch (``updates_per_epoch`` × accumulation steps)."""
        return self.updates_per_epoch * self.trainer.accumulation_steps


def _train(cfg: DictConfig, hardware: Hardware, run_dir: Path) -> FitResult:
    if hardware.distributed and not is_msrun_process():
        return launch_data_parallel(cfg, hardware, run_dir)
    world = hardware.setup(cfg.seed)
    job = _build_job(cfg, world)
    tracker = build(cfg, "tracking")
    resume = resolve_resume(cfg.get("resume"), tracker, run_dir, run_dir / "resume" / f"rank_{world.rank}")
    if resume is not None:
        ended = _check_resume(cfg, job, resume)
        if ended:
            return _nothing_to_continue(cfg, resume, ended)
    with stop_signals_interrupt(), _tracking(cfg, tracker, run_dir, resume, world) as run:
        if run is not None:
            _log_start(cfg, run, job, world, resume, run_dir)
        with (
            run.system_metrics() if run is not None and tracker.system_metrics else nullcontext(),
            compile_cache(
                hardware.compile_cache if hardware.mode == "graph" else None, _program(cfg, job, resume, world)
            ) as cached,
        ):
            if run is not None:
                run.set_tags({"compile_cache": cached})
            result = _fit(cfg, job, run, run_dir, resume, world)
        checksum = _record_weights(job.prepared.network, run_dir, world)
        if run is not None:
            _log_end(run, job, result, checksum)
            _log_model(cfg, run, job, result, tracker.register_model)
    if not world.is_main:
        print(f"rank {world.rank}: training finished, weights sha256 {checksum}")
        return result
    _write_result(run_dir, {"mlflow_run_id": run.run_id, **_result_record(result)})
    _print_summary(result, run, tracker, checksum, job.trainer.monitor)
    raise_unheeded_stop()
    return result


def _build_job(cfg: DictConfig, world: World) -> Job:
    """Dataset, model, loss, trainer, lr schedule and optimizer, and the compiled step over them."""
    data = build(cfg, "dataset")
    missing = data.classes_missing_from_val()
    if missing:
        console.print(
            f"warning: the val split has no images of {len(missing)} class(es) the train split has "
            f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}): their accuracy is never measured; "
            "images per class are in data/class_counts.json of the run",
            style="yellow",
            highlight=False,
            soft_wrap=True,
        )
    network = build_model(cfg, data.num_classes, pretrained=True)
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
    schedule = build(cfg, "scheduler", epochs=trainer.epochs, steps_per_epoch=updates_per_epoch).scaled(lr_factor)
    optimizer = build(
        cfg,
        "optimizer",
        params=network.trainable_params(),
        learning_rate=UpdateLr(schedule[0]),
        depth=parameter_depth(network),
    )
    prepared = trainer.prepare(network, loss_fn, optimizer, world)
    return Job(data, trainer, schedule, prepared, updates_per_epoch, global_batch_size, lr_factor)


def _check_resume(cfg: DictConfig, job: Job, resume: Resume) -> str | None:
    """Refuse a checkpoint this job cannot continue (another model, class count or training state), before any
    MLflow run is touched; returns why there is nothing left to train, if so."""
    meta, given = resume.state.meta, f"resume={cfg.resume}"
    refuse_other_model(cfg, meta, given)
    classes = meta.get("num_classes")
    if classes is not None and classes != job.data.num_classes:
        raise ConfigError(
            f"{given}: the checkpoint has {classes} classes, the configured dataset {job.data.num_classes}. "
            "Resume with the dataset it was trained on"
        )
    mismatch = resume.state.mismatch(job.prepared.state)
    if mismatch:
        raise ConfigError(
            f"{given}: the checkpoint does not fit this run's training state: {mismatch}. Resume with the settings "
            "it was trained with (model, optimizer, engine.ema_decay, engine.loss_scale, engine.accumulation_steps)"
        )
    return job.trainer.ended(resume.state, job.steps_per_epoch)


def _nothing_to_continue(cfg: DictConfig, resume: Resume, ended: str) -> FitResult:
    """A run that has nothing left to train is left as it is; say so and how to train it longer."""
    meta = resume.state.meta
    print_summary(
        "nothing to continue",
        {
            "run": f"MLflow run {resume.run_id or '-'}: {ended}; it is left as it is",
            "checkpoint": f"{resume.path} (step {resume.state.micro_step})",
            "train longer": "raise engine.epochs (the lr schedule then follows the longer run) and resume again",
            "best": format_metrics(meta.get("best")),
        },
    )
    return FitResult(list(meta.get("history", [])), meta.get("best"), {"last": resume.path}, meta.get("stopped"))


def _tracking(
    cfg: DictConfig, tracker: MlflowTracker, run_dir: Path, resume: Resume | None, world: World
) -> AbstractContextManager[MlflowRun | None]:
    """Rank 0's MLflow run (continued when resuming), through a spool in the run dir that keeps its records
    while the tracking server does not answer; the other ranks train and evaluate without one."""
    if not world.is_main:
        return nullcontext()
    tags, spool_dir = {**run_tags(cfg, "train"), "run_dir": str(run_dir)}, run_dir / "tracking"
    micro_step = resume.state.micro_step if resume is not None else 0 if cfg.get("resume") else None
    earlier_spool = resume.path.parent.parent / "tracking" if resume is not None else spool_dir
    if earlier_spool.resolve() != spool_dir.resolve():  # resumed from another job's folder
        tracker.deliver_kept(earlier_spool, micro_step, drop_later=True)
    run_id = resume.run_id if resume is not None else None
    return tracker.start_run(tags, run_id, run_name(cfg), spool_dir, micro_step)


def _log_start(cfg: DictConfig, run: MlflowRun, job: Job, world: World, resume: Resume | None, run_dir: Path) -> None:
    """The run spec, data description and lr plot of a new run; a continued run keeps its params and gets the
    resumed job's config beside the first one."""
    _write_result(run_dir, {"mlflow_run_id": run.run_id})
    if resume is not None:  # params are fixed once logged
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run.log_text(OmegaConf.to_yaml(cfg, resolve=True), f"config/resumed_{stamp}.yaml")
        run.set_tags({"resumed_from": str(cfg.resume), "run_dir": str(run_dir)})  # where its newest state is
        return
    classes = job.data.num_classes  # a folder dataset's config leaves it to the folder
    log_run_spec(run, cfg, {"dataset.num_classes": classes, "model.num_classes": classes})
    run.log_params(
        {"world_size": world.size, "global_batch_size": job.global_batch_size, "lr_scale_factor": job.lr_factor}
    )
    run.log_text(json.dumps({"classes": job.data.class_names}, indent=1), "data/classes.json")
    counts = job.data.class_counts()
    per_class = {name: {split: counts[split][i] for split in counts} for i, name in enumerate(job.data.class_names)}
    run.log_text(json.dumps(per_class, indent=1), "data/class_counts.json")
    fingerprint = job.data.fingerprint()
    run.log_text(json.dumps(fingerprint, indent=1), "data/fingerprint.json")
    run.set_tags({"data_train_sha256": str(fingerprint["train_sha256"])[:16]})
    _log_datasets(run, job.data, fingerprint, counts)
    report = getattr(job.prepared.network, "pretrained_report", None)
    if report is not None:  # what the run started from: the weights as given, and what loading them did
        run.set_tags({"pretrained": str(cfg.model.pretrained), "pretrained_load": report.line()})
        run.log_text(report.line() + "\n", "model/pretrained.txt")
    title = f"{cfg.scheduler._target_.rsplit('.', 1)[-1]} schedule, {len(job.schedule)} updates"
    run.log_figure(plot_schedule(job.schedule, job.updates_per_epoch, title), "lr_schedule.png")


def _log_datasets(run: MlflowRun, data: ImageData, fingerprint: dict, counts: dict[str, list[int]]) -> None:
    """Train and val splits as the run's dataset inputs: where the images are, the content digest, counts and
    the class map (the run page's Datasets; data/ holds the same in full)."""
    class_map = {name: index for index, name in enumerate(data.class_names)}
    for split, context in (("train", "train"), ("val", "validation")):
        per_class = counts[split]
        profile = {
            "images": fingerprint[f"{split}_items"],
            "classes": len(class_map),
            "images_per_class": f"{min(per_class)}-{max(per_class)}",
            "class_map": json.dumps(class_map),
        }
        digest = str(fingerprint[f"{split}_sha256"])[:16]
        run.log_dataset(f"{data.name}/{split}", digest, data.locations[split], context, profile)


def _program(cfg: DictConfig, job: Job, resume: Resume | None, world: World) -> dict[str, Any]:
    """What decides the graphs training compiles (the compile cache's key): the resolved config but for where
    runs are written and tracked, the data's sizes, the weights' files and settings, the rank."""
    spec = {
        key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        for key, value in cfg.items()
        if key not in ("paths", "tracking", "resume", "run_dir")
    }
    return {
        "config": spec,
        "data": {"num_classes": job.data.num_classes, **{s: job.data.num_samples(s) for s in job.data.sources}},
        "weights": {  # the model settings a pretrained file brings (e.g. mindcv's padding) change the graph
            "settings": getattr(getattr(job.prepared.network, "pretrained_report", None), "variant", {}),
            "files": [file_fingerprint(cfg.model.get("pretrained")), file_fingerprint(resume and resume.path)],
        },
        "world": [world.rank, world.size],
    }


def _fit(
    cfg: DictConfig, job: Job, run: MlflowRun | None, run_dir: Path, resume: Resume | None, world: World
) -> FitResult:
    """Train; whatever happens, the checkpoints and skipped images written so far go to the run."""
    checkpoint_dir = run_dir / "checkpoints"
    meta = {
        "model": cfg.model.name,
        "num_classes": job.data.num_classes,
        "class_names": job.data.class_names,
        "accumulation_steps": job.trainer.accumulation_steps,  # its updates: micro_step / accumulation_steps
        # the model settings its starting weights came with (registry.weights_variant), which loads apply
        "model_settings": getattr(getattr(job.prepared.network, "pretrained_report", None), "variant", {}),
        "mlflow_run_id": run.run_id if run is not None else None,
    }
    state = resume.state if resume is not None else None
    if resume is not None:
        micro_step = resume.state.micro_step
        print(f"resumed from {resume.path} at step {micro_step} (epoch {micro_step // job.steps_per_epoch + 1})")
    with ExitStack() as stack:
        if world.size == 1:  # ranks must stop at the same step, which a signal to each cannot promise
            stack.enter_context(deferred_stop())  # a first stop signal ends training after its step, saved
        try:
            return job.trainer.fit(
                job.prepared, job.schedule, job.data, checkpoint_dir, meta, state, world, _observers(job, run, world)
            )
        finally:
            if run is not None:
                _log_checkpoints(run, checkpoint_dir, job.data.bad_images())


def _observers(job: Job, run: MlflowRun | None, world: World) -> list[Observer]:
    """What hears the trainer: the display, MLflow (rank 0), early stopping, and a sweep trial's pruning."""
    observers: list[Observer] = [ProgressDisplay(console)]
    if run is not None:
        observers.append(TrackRun(run, job.trainer.accumulation_steps))
    if job.trainer.early_stopping is not None:
        observers.append(job.trainer.early_stopping)
    study_trial = StudyTrial.from_environment() if world.is_main else None  # rank 0 reports to a sweep's study
    if study_trial is not None:
        observers.append(PruneTrial(study_trial, job.trainer.monitor))
    return observers


def _log_checkpoints(run: MlflowRun, checkpoint_dir: Path, bad_images: list[str]) -> None:
    """The checkpoints and the list of unreadable images a stopped or finished fit leaves, into the run."""
    for name in ("best", "last"):
        path = checkpoint_dir / f"{name}.ckpt"
        if path.is_file():
            run.log_artifact(path, "checkpoints")
    last = checkpoint_dir / "last.ckpt"
    if last.is_file():  # stopped anywhere: what its newest state covers may go
        run.checkpointed(read_micro_step(last))
    if bad_images:
        run.log_text("\n".join(bad_images) + "\n", "data/bad_images.txt")


def _log_end(run: MlflowRun, job: Job, result: FitResult, checksum: str) -> None:
    description = f"`{command_line()}`\n\n{_headline(result, job.trainer.monitor)}"
    run.set_tags({"weights_sha256": checksum, "mlflow.note.content": description})
    if result.best is not None:
        monitor = job.trainer.monitor
        epoch = int(result.best["epoch"])  # at the update that ended the best epoch, as its val metrics
        run.log_metrics(
            {f"best_{monitor}": result.best[monitor]}, step=epoch * job.updates_per_epoch,
            micro_step=epoch * job.steps_per_epoch,
        )  # fmt: skip
    if result.stopped is not None:
        run.set_tags(stop_tags(result.stopped))


def _log_model(cfg: DictConfig, run: MlflowRun, job: Job, result: FitResult, register: str | None) -> None:
    """The best weights (without an evaluation, the last) as the run's MLflow pyfunc model ``model``, a new
    version of the registered model ``register`` when one is named."""
    weights = result.checkpoints.get("best") or result.checkpoints.get("last")
    if weights is None:
        return
    path = Path(weights).parent.parent / "model"
    shutil.rmtree(path, ignore_errors=True)  # an earlier job's in the same folder (resumed)
    save_pyfunc_model(cfg, Path(weights), job.data.class_names, path)
    best, monitor = result.best, job.trainer.monitor
    epoch = int(best["epoch"]) if best else len(result.history)
    description = f"{monitor} {best[monitor]:.4f} at epoch {epoch}" if best else f"the weights after epoch {epoch}"
    run.log_model(path, epoch * job.updates_per_epoch, register, f"{description}, from run '{run.run_name}'")


def _headline(result: FitResult, monitor: str) -> str:
    """The result at the end of the run's description: the best and last ``monitor`` and an early stop."""
    parts = [
        f"**{name}** {monitor} {metrics[monitor]:.4f} (epoch {metrics['epoch']})"
        for name, metrics in (("best", result.best), ("last", result.last))
        if metrics and monitor in metrics
    ]
    if result.stopped:
        parts.append(f"stopped after epoch {result.stopped['epoch']}: {result.stopped['reason']}")
    return " · ".join(parts) or "no evaluation"


def _result_record(result: FitResult) -> dict:
    return {
        "history": result.history,
        "best": result.best,
        "checkpoints": {k: str(v) for k, v in result.checkpoints.items()},
        "stopped": result.stopped,
    }


def _print_summary(result: FitResult, run: MlflowRun, tracker: MlflowTracker, checksum: str, monitor: str) -> None:
    best = f"runs:/{run.run_id}/checkpoints/best.ckpt" if run.run_id else str(result.checkpoints.get("best"))
    rows = {
        "mlflow run": f"{run.run_name} ({run.run_id or 'not created: the server did not answer'}) "
        f"in experiment '{tracker.experiment_name}'",
        "best": format_metrics(result.best),
        "last": format_metrics(result.last),
    }
    if result.stopped:
        rows["stopped early"] = f"after epoch {result.stopped['epoch']}: {result.stopped['reason']}"
    rows.update(
        {
            "best checkpoint": f"{result.checkpoints.get('best')}  = {best}",
            "last checkpoint": str(result.checkpoints.get("last")),
            "weights sha256": checksum,
            "evaluate": f"python run.py task=eval ckpt={best}",
            "mlflow model": f"runs:/{run.run_id}/model  (mlflow.pyfunc.load_model; serve: mlflow models serve -m "
            f"runs:/{run.run_id}/model --env-manager local)"
            if run.run_id
            else "-",
            "mlflow ui": tracker.ui_command(),
            "run page": tracker.run_url(run.run_id) or "-",
            "all runs": tracker.runs_view_url(run.run_id, monitor) or "-",
        }
    )
    print_summary("training finished", rows)


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
