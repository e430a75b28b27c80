"""Pieces every task shares: config tree, environment setup, run tags, checkpoint lookup, summaries."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import distributions
from pathlib import Path
from typing import Any

import mindspore as ms
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.text import Text
from rich.tree import Tree

from framework.config import ConfigError, build, check_config, flatten, group_choices, overrides
from framework.engine.checkpoint import is_training_state, latest_training_state, load_checkpoint, read_checkpoint
from framework.engine.trainer import TrainingState
from framework.launch import Hardware
from framework.models.pretrained import PretrainedError, read_weights
from framework.models.registry import image_size_problems, start_from, weights_variant
from framework.tracking import MlflowRun, MlflowTracker
from framework.tracking.naming import command_line, source_tags

# Markup off: what is printed holds data (paths, run names, list overrides such as measure=[a,b]) that rich would
# take for markup and drop; styles are given as style=, never written into the text.
console = Console(markup=False)


def prepare(cfg: DictConfig) -> Hardware:
    """Check the run spec, print it as a tree, and build the hardware (``setup`` then selects device and seeds).

    Everything that can be checked without running is checked here, before any MLflow run exists: the config,
    the device this MindSpore build can use, and a local MLflow store that can be written."""
    check_config(cfg)  # as framework.tasks.execute did: again for a task called directly (tests, notebooks)
    hardware = build(cfg, "hardware")
    hardware.check_available()
    build(cfg, "tracking").check_writable()
    print_config(cfg)  # once nothing is refused: a refusal is its one line alone
    return hardware


def build_model(cfg: DictConfig, num_classes: int, pretrained: bool = False, settings: dict | None = None) -> Any:
    """``cfg.model`` with a head for the dataset's ``num_classes``; ``model.num_classes: null`` takes that count.
    ``pretrained``: start from ``model.pretrained`` when set (training; the other tasks load their checkpoint,
    built with the ``settings`` it records, see ``registry.weights_variant``).

    An image size the model cannot run on is refused; one it runs on poorly gets a warning."""
    configured = cfg.model.get("num_classes")
    if configured is not None and configured != num_classes:
        raise ConfigError(
            f"model.num_classes={configured} but the dataset has {num_classes} classes. "
            "Set model.num_classes to match (or null to follow the dataset)"
        )
    sizes = {
        "dataset.image_size": cfg.dataset.image_size,
        "dataset.eval_image_size": cfg.dataset.get("eval_image_size"),
    }
    for key, size in sizes.items():
        if size is None:
            continue
        error, warning = image_size_problems(str(cfg.model.name), int(size))
        if error:
            raise ConfigError(f"{key}={size}: {cfg.model.name} {error}. Fix: {key}=<such a size>")
        if warning:
            console.print(
                f"warning: {key}={size}: {cfg.model.name} {warning}", style="yellow", highlight=False, soft_wrap=True
            )
    source = cfg.model.get("pretrained") if pretrained else None
    if not source:
        return build(cfg, "model", num_classes=num_classes, pretrained=None, **(settings or {}))
    try:  # as create_model(pretrained=...) does, each refusal as one line naming model.pretrained
        weights = read_weights(pretrained_file(cfg, str(source)))
        variant = weights_variant(str(cfg.model.name), weights)
        head = cfg.model.get("pretrained_head", "auto")
        network = start_from(
            weights, head, variant, lambda: build(cfg, "model", num_classes=num_classes, pretrained=None, **variant)
        )
    except PretrainedError as err:
        raise ConfigError(f"model.pretrained={source}: {err}") from err
    console.print(f"model.pretrained: {network.pretrained_report.line()}", highlight=False, soft_wrap=True)
    return network


def pretrained_file(cfg: DictConfig, source: str) -> Path:
    """The local weights file ``model.pretrained`` names (a ``runs:/`` or ``models:/`` URI is fetched)."""
    download_dir = Path(cfg.paths.run_dir) / "pretrained"
    return resolve_checkpoint(source, build(cfg, "tracking"), download_dir, key="model.pretrained")[0]


def checkpoint_meta(cfg: DictConfig, checkpoint: Path, key: str = "ckpt") -> dict[str, Any]:
    """The metadata of a checkpoint the command was given (``key``), refused with one line when the file is no
    checkpoint of ours or was written by another model than ``cfg.model``."""
    try:
        _, meta = read_checkpoint(checkpoint, meta_only=True)
    except ValueError as err:
        raise ConfigError(f"{key}={cfg.get(key)}: {err}. Pass a .ckpt written by this project") from err
    refuse_other_model(cfg, meta, f"{key}={cfg.get(key)}")
    return meta


def refuse_other_model(cfg: DictConfig, meta: dict[str, Any], given: str) -> None:
    """A checkpoint written by another model than ``cfg.model`` (``given``: the argument that named it) gets one
    ConfigError line naming both and the fix."""
    written_by = meta.get("model")
    if written_by and written_by != cfg.model.name:
        classes = f" ({meta['num_classes']} classes)" if meta.get("num_classes") else ""
        raise ConfigError(
            f"{given}: the checkpoint was written by model {written_by}{classes}; this command builds "
            f"{cfg.model.name}. Select its model (the model config whose model.name is {written_by})"
        )


def load_weights(cfg: DictConfig, checkpoint: Path, network: Any, key: str = "ckpt") -> dict[str, Any]:
    """``load_checkpoint`` with a refusal (a corrupt file, tensors that do not fit) as one ConfigError line."""
    try:
        return load_checkpoint(checkpoint, network)
    except ValueError as err:
        raise ConfigError(f"{key}={cfg.get(key)}: {err}") from err


def load_trained_network(cfg: DictConfig, checkpoint: Path) -> tuple[Any, dict[str, Any]]:
    """``cfg.model`` holding ``checkpoint``'s weights, in inference mode, and the checkpoint's metadata.

    The head has the checkpoint's class count (else ``model.num_classes``, else the dataset's).
    """
    meta = checkpoint_meta(cfg, checkpoint)
    num_classes = meta.get("num_classes") or cfg.model.get("num_classes") or cfg.dataset.num_classes
    network = build_model(cfg, int(num_classes), settings=meta.get("model_settings"))
    load_weights(cfg, checkpoint, network)
    network.set_train(False)
    return network, meta


def print_config(cfg: DictConfig) -> None:
    """Print the resolved config, one branch per top-level group."""
    tree = Tree(Text("config", style="bold"))
    for key, value in cfg.items():
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        tree.add(Text(str(key), style="bold cyan")).add(Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
    console.print(tree)


def run_tags(cfg: DictConfig, task: str) -> dict[str, str]:
    """MLflow tags: task, model, dataset, hardware, command-line overrides and MindSpore version; MLflow's own
    tags for what the run page shows (``source_tags``: the command line as the run's description)."""
    choices = group_choices()
    tags = {
        "task": task,
        "model": str(cfg.model.name),
        "dataset": choices.get("dataset", str(cfg.dataset._target_)),
        "hardware": choices.get("hardware", str(cfg.hardware.device_target)),
        "mindspore_version": ms.__version__,
        **source_tags(command_line()),
    }
    swept = [o for o in overrides() if not o.startswith(("hydra.", "paths.", "tracking.local_store"))]
    if swept:
        tags["overrides"] = " ".join(swept)[:5000]
    return tags


def derived_run_tags(tracker: MlflowTracker, tags: dict[str, str], source_run_id: str | None) -> dict[str, str]:
    """``tags`` of a run made from a training run's checkpoint (eval, export), filed under that run: its nested
    child in its experiment (the training run lists it; the experiment's charts keep to training runs), with
    the source's id and a link to it in the description. A source this store does not hold is only named."""
    if not source_run_id:
        return tags
    tags = {**tags, "source_run_id": source_run_id}
    client = tracker.client()
    try:
        source = client.get_run(source_run_id).info
    except MlflowException:
        return tags
    tracker.experiment_name = client.get_experiment(source.experiment_id).name
    link = f"[{source.run_name}](#/experiments/{source.experiment_id}/runs/{source_run_id})"
    description = f"{tags['mlflow.note.content']}\n\nfrom the checkpoint of training run {link}"
    return {**tags, "mlflow.parentRunId": source_run_id, "mlflow.note.content": description}


# Config keys that are no hyper-parameter: where a run's files, records and compiled graphs go and what a task
# reads (the composed config artifact and the run's tags keep them)
_NOT_PARAMS = {"run_dir", "ckpt", "resume", "allowed_targets", "hardware.compile_cache"}
_NOT_PARAM_GROUPS = ("paths", "tracking", "task")


def run_params(cfg: DictConfig, resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's hyper-parameters as MLflow params: the chosen option of each config group (``choice.model``)
    and every set value a user could change, with ``resolved`` values in place of the config's (a folder
    dataset's real class count). Left out, so that runs compare cleanly: class paths (``_target_``), unset
    values, paths inside the run's folder, and where outputs and records go."""
    run_dir = str(cfg.paths.run_dir)
    params: dict[str, Any] = {
        f"choice.{group}": choice for group, choice in group_choices().items() if group not in _NOT_PARAM_GROUPS
    }
    for key, value in {**flatten(cfg), **(resolved or {})}.items():
        if (
            value is None
            or key in _NOT_PARAMS
            or key.split(".")[0] in _NOT_PARAM_GROUPS
            or key.endswith("._target_")
            or str(value).startswith(run_dir)
        ):
            continue
        params[key] = value
    return params


def log_run_spec(run: MlflowRun, cfg: DictConfig, resolved: dict[str, Any] | None = None) -> None:
    """Log the hyper-parameters as params (``run_params``), the composed config and overrides, and the
    installed packages."""
    run.log_params(run_params(cfg, resolved))
    run.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
    run.log_text(OmegaConf.to_yaml(OmegaConf.create(overrides())), "config/overrides.yaml")
    packages = sorted({f"{d.metadata['Name']}=={d.version}" for d in distributions() if d.metadata["Name"]})
    run.log_text("\n".join(packages) + "\n", "environment/requirements-frozen.txt")
    run.set_tags({"seed": str(cfg.seed)})


def resolve_checkpoint(
    ckpt: str | None, tracker: MlflowTracker, download_dir: Path, key: str = "ckpt"
) -> tuple[Path, str | None]:
    """Local path of ``ckpt``: a file, ``runs:/<run_id>/<artifact path>`` fetched into ``download_dir``, or the
    weights in a model a training run logged (``models:/<name>/<version>``, ``models:/<model id>``).

    Returns the path and the run id named by a ``runs:/`` URI (None otherwise: the checkpoint's metadata has it).
    """
    if not ckpt:
        raise ConfigError("this task needs a checkpoint: ckpt=<file.ckpt> or ckpt=runs:/<run_id>/checkpoints/best.ckpt")
    if str(ckpt).startswith("models:/"):
        return _model_weights(str(ckpt), tracker, download_dir, key), None
    if str(ckpt).startswith("runs:/"):
        parts = str(ckpt)[len("runs:/") :].split("/", 1)
        if len(parts) < 2 or not parts[1]:
            raise ConfigError(f"{key}={ckpt}: expected runs:/<run_id>/<artifact path> (e.g. .../checkpoints/best.ckpt)")
        try:
            download_dir.mkdir(parents=True, exist_ok=True)
            local = download_artifacts(artifact_uri=str(ckpt), tracking_uri=tracker.uri, dst_path=str(download_dir))
        except (MlflowException, OSError) as err:
            raise ConfigError(f"{key}={ckpt}: cannot fetch it from {tracker.uri}: {str(err).splitlines()[0]}") from err
        return Path(local), parts[0]
    path = Path(ckpt).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(
            f"{key}={ckpt}: no such checkpoint file ({path}). Pass an existing .ckpt or runs:/<id>/<path>"
        )
    return path, None


def _model_weights(uri: str, tracker: MlflowTracker, download_dir: Path, key: str) -> Path:
    """The checkpoint inside an MLflow model a training run of this project logged, fetched into ``download_dir``."""
    try:
        download_dir.mkdir(parents=True, exist_ok=True)
        location = tracker.model_location(uri)
        local = Path(download_artifacts(artifact_uri=location, tracking_uri=tracker.uri, dst_path=str(download_dir)))
    except (MlflowException, OSError) as err:
        raise ConfigError(f"{key}={uri}: cannot fetch it from {tracker.uri}: {str(err).splitlines()[0]}") from err
    weights = sorted(local.glob("artifacts/*.ckpt"))
    if not weights:
        raise ConfigError(
            f"{key}={uri}: this MLflow model holds no checkpoint of this project (artifacts/*.ckpt). Pass a model a "
            "training run logged (models:/<name>/<version>) or a checkpoint (runs:/<run_id>/checkpoints/best.ckpt)"
        )
    return weights[0]


@dataclass
class Resume:
    """The training state a job continues from: its file, the MLflow run to continue, its checked tensors."""

    path: Path
    run_id: str | None
    state: TrainingState


def resolve_resume(resume: str | None, tracker: MlflowTracker, run_dir: Path, download_dir: Path) -> Resume | None:
    """The training-state checkpoint ``resume`` names, read and checked; None without one.

    - ``auto``: the newest intact checkpoint in ``run_dir/checkpoints`` (a damaged newer one is passed over
      with a warning); none there yet means a fresh start, so a requeued job can always say ``resume=auto``;
    - ``runs:/<run_id>``: the same search in that run's folder when it is on this machine, else its
      ``checkpoints/last.ckpt`` artifact;
    - ``runs:/<run_id>/<artifact path>`` or a ``.ckpt`` file: that checkpoint.
    """
    if not resume:
        return None
    resume = str(resume)
    run_id, content = None, None
    if resume == "auto":
        path, content = _latest_local_state(run_dir / "checkpoints", resume)
        if path is None and any((run_dir / "checkpoints").glob("[!.]*.ckpt")):
            raise ConfigError(
                f"resume=auto: no intact training checkpoint in {run_dir / 'checkpoints'} (see above). "
                "Move the folder away to start over, or resume from another file (resume=<path>.ckpt)"
            )
        if path is None:
            print(f"resume=auto: no checkpoint in {run_dir / 'checkpoints'} yet; training starts from the beginning")
            return None
    elif resume.startswith("runs:/") and "/" not in resume[len("runs:/") :].strip("/"):
        run_id = resume[len("runs:/") :].strip("/")
        local = _local_run_dir(tracker, run_id)
        path, content = _latest_local_state(local / "checkpoints", resume) if local else (None, None)
        if path is None:
            path, _ = resolve_checkpoint(f"{resume.rstrip('/')}/checkpoints/last.ckpt", tracker, download_dir, "resume")
    else:
        path, run_id = resolve_checkpoint(resume, tracker, download_dir, key="resume")
    if content is None:
        try:  # every tensor against its checksum, before anything is built
            content = read_checkpoint(path)
        except ValueError as err:
            raise ConfigError(f"resume={resume}: {err}") from err
    params, meta = content
    if not is_training_state(meta):
        raise ConfigError(f"resume={resume}: {path.name} holds weights only; resume from a last.ckpt or periodic one")
    return Resume(path, run_id or meta.get("mlflow_run_id"), TrainingState(params, meta))


def _latest_local_state(directory: Path, resume: str) -> tuple[Path | None, tuple[dict, dict] | None]:
    """``latest_training_state`` of ``directory``, warning about each damaged file passed over."""
    path, content, problems = latest_training_state(directory)
    for problem in problems:
        console.print(f"resume={resume}: passed over {problem}", style="yellow", highlight=False)
    return path, content


def _local_run_dir(tracker: MlflowTracker, run_id: str) -> Path | None:
    """The run's folder (tag ``run_dir``) if it exists on this machine."""
    try:
        folder = tracker.client().get_run(run_id).data.tags.get("run_dir")
    except MlflowException:
        return None
    return Path(folder) if folder and Path(folder).is_dir() else None


def print_summary(title: str, rows: dict[str, Any]) -> None:
    console.rule(Text(title, style="bold"))
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        console.print(f"{key:<{width}}  {value}", highlight=False, soft_wrap=True)


def format_metrics(metrics: dict[str, float] | None) -> str:
    if not metrics:
        return "-"
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
