"""``task=convert``: foreign weights (timm/torch ``.safetensors``/``.pth``, a mindcv ``.ckpt``) → a checkpoint of
this project, logged to MLflow, so a machine without torch starts from it (``model.pretrained=<it>``):

    python run.py task=convert model=resnext50 model.pretrained=resnext50_32x4d.a1_in1k.safetensors

The model keeps the file's classifier (its class count is the file's); the checkpoint records the settings the
weights were trained with (mindcv's ResNeXt pools with "same" padding), which every later load applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from framework.config import ConfigError, build, group_choices
from framework.engine.checkpoint import save_checkpoint, weights_sha256
from framework.models.pretrained import PretrainedError, WeightsFile, read_weights
from framework.models.registry import start_from, weights_variant
from framework.runtime.signals import stop_signals_interrupt
from framework.tasks.common import pretrained_file, print_summary, run_tags
from framework.tracking.naming import run_name


def convert(cfg: DictConfig) -> Path:
    """Write ``model.pretrained`` as ``<run dir>/<model>_<file>.ckpt`` and log it; returns its path."""
    source = cfg.model.get("pretrained")
    if not source:
        raise ConfigError("task=convert needs the weights to convert: model.pretrained=<.safetensors | .pth | .ckpt>")
    try:
        weights = read_weights(pretrained_file(cfg, str(source)))
        variant = weights_variant(str(cfg.model.name), weights)
        network, classes = _network(cfg, weights, variant)
    except PretrainedError as err:
        raise ConfigError(f"model.pretrained={source}: {err}") from err
    report = network.pretrained_report
    path = Path(cfg.paths.run_dir) / f"{cfg.model.name}_{weights.path.stem}.ckpt"
    meta = {"model": str(cfg.model.name), "num_classes": classes, "model_settings": variant,
            "converted_from": str(source), "pretrained_load": report.line()}  # fmt: skip
    save_checkpoint(network, path, meta)
    tracker = build(cfg, "tracking")
    tracker.experiment_name = f"{tracker.experiment_name}-conversions"  # no training run: kept off its charts
    tags = {**run_tags(cfg, "convert"), "pretrained": str(source), "pretrained_load": report.line()}
    with stop_signals_interrupt(), tracker.start_run(tags, run_name=run_name(cfg, "convert")) as run:
        run.log_artifact(path, "checkpoints")
        run.set_tags({"weights_sha256": weights_sha256(network)})
    uri = f"runs:/{run.run_id}/checkpoints/{path.name}"
    print_summary(
        "conversion finished",
        {
            "loaded": report.line(),
            "checkpoint": f"{path}  = {uri}",
            "start from it": f"python run.py model={group_choices().get('model', '<model>')} model.pretrained={uri}",
            "mlflow run": f"{run.run_name} ({run.run_id}) in experiment '{tracker.experiment_name}'",
            "run page": tracker.run_url(run.run_id) or "-",
        },
    )
    return path


def _network(cfg: DictConfig, weights: WeightsFile, variant: dict[str, Any]) -> tuple[Any, int]:
    """The model with the file's weights, its classifier included, and its class count (the file's)."""

    def model(classes: int) -> Any:
        return build(cfg, "model", num_classes=classes, pretrained=None, **variant)

    network = start_from(weights, "auto", variant, lambda: model(1000))
    head = network.pretrained_report.head
    if head is None or head[0] == 0:  # the file's classifier has 1,000 classes (or the file has none)
        return network, 1000
    return start_from(weights, "keep", variant, lambda: model(head[0])), head[0]
