"""The MLflow ``pyfunc`` model a training run logs as ``model``: its best weights, composed config and class map
behind the dataset's eval transform, so that ``mlflow.pyfunc.load_model("runs:/<run_id>/model").predict(images)``
gives ``task=predict``'s probabilities and ``mlflow models serve --env-manager local`` serves it."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mindspore as ms
import mindspore.dataset.transforms as T
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec
from omegaconf import DictConfig, OmegaConf

from framework.config import build
from framework.data.transforms import eval_ops
from framework.engine.checkpoint import load_checkpoint
from framework.runtime.environment import environment

CONFIG, WEIGHTS, CLASSES = "config", "weights", "classes"  # the model's artifacts


def eval_transform_args(cfg: DictConfig) -> tuple:
    """``eval_ops``'s arguments from ``cfg.dataset``: eval size, crop fraction, interpolation, mean, std."""
    data = cfg.dataset
    size = int(data.get("eval_image_size") or data.image_size)
    return size, float(data.crop_pct), str(data.interpolation), list(data.mean), list(data.std)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over classes, in float64 (what task=predict reports)."""
    logits = logits.astype(np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """RGB images (uint8, N × H × W × 3, as read from files; any size) → class probabilities, one column per
    class name."""

    def load_context(self, context: Any) -> None:
        cfg = OmegaConf.load(context.artifacts[CONFIG])
        self.classes = json.loads(Path(context.artifacts[CLASSES]).read_text())["classes"]
        self.network = build(cfg, "model", num_classes=len(self.classes))
        load_checkpoint(context.artifacts[WEIGHTS], self.network)
        self.network.set_train(False)
        self.transform = T.Compose(eval_ops(*eval_transform_args(cfg)))


def _predict(self, context, model_input, params=None):  # no hints: see below
    images = model_input["images"] if isinstance(model_input, dict) else model_input
    batch = np.stack([self.transform(np.asarray(image, dtype=np.uint8)) for image in images])
    logits = self.network(ms.Tensor(batch.astype(np.float32))).asnumpy()
    return pd.DataFrame(probabilities(logits), columns=self.classes)


# Attached after the class is made: MLflow reads a PythonModel's predict type hints as its input schema when the
# class is made (and warns on every import when there are none), but this model's schema is the uint8 tensor
# signature save_pyfunc_model gives, which hints cannot say.
ImageClassifier.predict = _predict


def save_pyfunc_model(cfg: DictConfig, weights: Path, class_names: list[str], path: Path) -> Path:
    """Write the run's model into the folder ``path`` (MLflow's model format), ready to be logged."""
    files = path.parent / f"{path.name}_files"
    files.mkdir(parents=True, exist_ok=True)
    (files / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (files / "classes.json").write_text(json.dumps({"classes": class_names}, indent=1))
    size = eval_transform_args(cfg)[0]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3), "images")]),
        outputs=Schema([ColSpec("double", name) for name in class_names]),
    )
    with _quiet():
        _save(path, files, weights, signature, size)
    return path


@contextmanager
def _quiet() -> Iterator[None]:
    """Without MLflow's progress bars and notes: saving checks the model by loading it, which copies its files."""
    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with environment({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
            yield
    finally:
        logger.setLevel(level)


def _save(path: Path, files: Path, weights: Path, signature: ModelSignature, size: int) -> None:
    mlflow.pyfunc.save_model(
        str(path),
        python_model=str(Path(__file__).with_name("pyfunc_code.py")),  # code, not a pickle
        artifacts={CONFIG: str(files / "config.yaml"), WEIGHTS: str(weights), CLASSES: str(files / "classes.json")},
        signature=signature,
        input_example={"images": np.full((1, size, size, 3), 128, np.uint8)},
        # this environment's (serve with --env-manager local); MLflow would otherwise load the model in a
        # subprocess to infer them
        pip_requirements=[f"mindspore=={ms.__version__}", f"mlflow=={mlflow.__version__}", "numpy<2", "pandas"],
    )
