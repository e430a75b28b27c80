"""``task=predict``: top-k classes of image files, from a checkpoint or an exported MINDIR / ONNX model.

``ckpt`` names the model: a training checkpoint (``.ckpt``, class names from its metadata) or a file
``task=export`` wrote (``.mindir`` / ``.onnx``, class names from the ``classes.json`` written beside it or
logged with it); a ``runs:/<run_id>/<path>`` URI works for each. ``input`` is an image file or a folder
(searched recursively). Images get the dataset's eval transform (resize, center crop, normalize). An
unreadable file is reported and skipped. Results are printed and written as ``predictions.csv`` and
``predictions.json`` into the run dir.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mindspore.dataset.transforms as T
import numpy as np
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig
from PIL import Image
from rich.progress import Progress

from framework.config import ConfigError, build
from framework.data.folder import IMAGE_EXTENSIONS
from framework.data.transforms import eval_ops
from framework.engine.export import load_exported
from framework.tasks.common import console, load_trained_network, prepare, print_summary, resolve_checkpoint
from framework.tasks.pyfunc_model import eval_transform_args, probabilities

FORMATS = {".ckpt": "ckpt", ".mindir": "mindir", ".onnx": "onnx"}


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Predict ``cfg.predict.top_k`` classes for every image under ``cfg.input``; returns one record per image."""
    prepare(cfg).setup(cfg.seed)
    opts = cfg.predict
    if opts.top_k < 1 or opts.batch_size < 1:
        raise ConfigError(f"predict.top_k and predict.batch_size must be >= 1, got {opts.top_k}, {opts.batch_size}")
    files = _image_files(cfg.input)
    tracker = build(cfg, "tracking")
    run_dir = Path(cfg.paths.run_dir)
    model_path, run_id = resolve_checkpoint(cfg.ckpt, tracker, run_dir / "model")
    kind = FORMATS.get(model_path.suffix.lower())
    if kind is None or (cfg.format and str(cfg.format).lower() != kind):
        raise ConfigError(
            f"ckpt={cfg.ckpt} is a '{model_path.suffix}' file but format={cfg.format}: give a .ckpt, .mindir or "
            ".onnx file (format=ckpt|mindir|onnx, or null to go by the suffix)"
        )
    run_logits, class_names, fixed_batch, engine = _load_model(cfg, kind, model_path, run_id, tracker)
    transform = T.Compose(eval_ops(*eval_transform_args(cfg)))
    batch_size = fixed_batch or int(opts.batch_size)

    records, skipped = [], []
    with Progress(console=console, disable=len(files) == 1) as progress:
        task = progress.add_task("predict", total=len(files))
        for start in range(0, len(files), batch_size):
            images, paths = [], []
            for path in files[start : start + batch_size]:
                try:
                    with Image.open(path) as image:
                        images.append(transform(np.asarray(image.convert("RGB"))))
                    paths.append(path)
                except (OSError, ValueError, Image.DecompressionBombError) as err:
                    console.print(f"skipped unreadable image {path}: {err}", style="yellow")
                    skipped.append({"file": str(path), "error": str(err)})
                progress.advance(task)
            if images:
                records += _top_k(
                    run_logits, np.stack(images).astype(np.float32), paths, class_names, opts.top_k, fixed_batch
                )
    run_dir.mkdir(parents=True, exist_ok=True)
    _write(records, skipped, run_dir, int(opts.top_k))
    for record in records[: int(opts.show)]:
        top = "  ".join(f"{c['class']} {c['probability']:.3f}" for c in record["top_k"])
        console.print(f"{record['file']}: {top}", highlight=False)
    print_summary(
        "prediction finished",
        {
            "model": f"{cfg.ckpt} ({kind})",
            "engine": engine,
            "images": f"{len(records)} predicted, {len(skipped)} unreadable (skipped)",
            "results": f"{run_dir / 'predictions.csv'}, {run_dir / 'predictions.json'}",
        },
    )
    return records


def _image_files(source: str | None) -> list[Path]:
    if not source:
        raise ConfigError("task=predict needs input=<image file or folder of images>")
    path = Path(str(source)).expanduser().resolve()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"input={source}: no such file or folder ({path})")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ConfigError(f"input={source}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
    return files


def _load_model(
    cfg: DictConfig, kind: str, path: Path, run_id: str | None, tracker: Any
) -> tuple[Callable[[np.ndarray], np.ndarray], list[str] | None, int | None, str]:
    """(images → logits, class names or None, the model's fixed batch size or None, the engine running it)."""
    if kind == "ckpt":
        network, meta = load_trained_network(cfg, path)
        forward, engine = build(cfg, "inference").forward(
            network, eval_transform_args(cfg)[0], cfg.hardware.device_target, Path(cfg.paths.run_dir) / "inference"
        )
        return forward, meta.get("class_names"), None, engine
    classes = _beside_or_logged(path, "classes.json", run_id, "data/classes.json", tracker)
    names = json.loads(classes.read_text())["classes"] if classes is not None else None
    engine = {"onnx": "onnxruntime (the exported file)", "mindir": "mindspore (the exported file)"}[kind]
    return load_exported(path), names, _fixed_batch(cfg, kind, path, run_id, tracker), engine


def _beside_or_logged(path: Path, name: str, run_id: str | None, artifact: str, tracker: Any) -> Path | None:
    """A file ``task=export`` wrote beside the model file, or logged with its export run."""
    local = path.parent / name
    if local.is_file() or run_id is None:
        return local if local.is_file() else None
    try:
        return Path(
            download_artifacts(f"runs:/{run_id}/{artifact}", tracking_uri=tracker.uri, dst_path=str(path.parent))
        )
    except (MlflowException, OSError):
        return None


def _fixed_batch(cfg: DictConfig, kind: str, path: Path, run_id: str | None, tracker: Any) -> int | None:
    """The batch size an exported model takes, when it takes only one (batches are then padded to it).

    ONNX files declare it; for MINDIR the export's ``export.json`` says it (a file without one is fed batches
    of ``predict.batch_size``, padded)."""
    if kind == "onnx":
        import onnxruntime

        batch = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].shape[0]
        return batch if isinstance(batch, int) else None
    spec = _beside_or_logged(path, "export.json", run_id, "export/export.json", tracker)
    if spec is None:
        return int(cfg.predict.batch_size)
    export = json.loads(spec.read_text())
    return None if export.get("any_batch") else int(export["input_shape"][0])


def _top_k(
    run_logits: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    paths: list[Path],
    class_names: list[str] | None,
    k: int,
    fixed_batch: int | None,
) -> list[dict[str, Any]]:
    """Softmax top-k for one batch (padded with zeros to a model's fixed batch, padding dropped)."""
    count = len(images)
    if fixed_batch and count < fixed_batch:
        images = np.concatenate([images, np.zeros((fixed_batch - count, *images.shape[1:]), images.dtype)])
    probs = probabilities(run_logits(images)[:count])
    records = []
    for path, row in zip(paths, probs, strict=True):
        best = np.argsort(-row, kind="stable")[:k]
        top = [{"class": class_names[i] if class_names else str(i), "index": int(i), "probability": float(row[i])}
               for i in best]  # fmt: skip
        records.append({"file": str(path), "top_k": top})
    return records


def _write(records: list[dict[str, Any]], skipped: list[dict[str, str]], run_dir: Path, k: int) -> None:
    (run_dir / "predictions.json").write_text(json.dumps({"predictions": records, "skipped": skipped}, indent=1))
    with (run_dir / "predictions.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["file"] + [f"{field}_{i}" for i in range(1, k + 1) for field in ("class", "probability")])
        for record in records:
            writer.writerow(
                [record["file"]] + [v for c in record["top_k"] for v in (c["class"], f"{c['probability']:.6f}")]
            )
