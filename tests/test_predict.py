"""task=predict: top-k classes of image files from a checkpoint and from its MINDIR and ONNX exports."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from framework.config import ConfigError
from framework.tasks.export import export
from framework.tasks.predict import predict
from tests.conftest import TEST_MODEL, compose_config
from tests.test_export import checkpoint_for

pytestmark = pytest.mark.slow  # end-to-end jobs: python -m pytest -m "not slow" skips them

SIZE = [TEST_MODEL, "dataset.image_size=32"]


def image_folder(root: Path) -> Path:
    """Four digits as JPEG files (two in a subfolder) and one file that is not an image."""
    digits = load_digits()
    (root / "sub").mkdir(parents=True)
    for i in range(4):
        image = Image.fromarray((digits.images[i] / 16 * 255).astype(np.uint8)).resize((24, 24))
        image.convert("RGB").save(root / ("sub" if i >= 2 else "") / f"digit_{i}.jpg", quality=95)
    (root / "broken.jpg").write_bytes(b"not a JPEG")
    return root


def test_predictions_agree_across_checkpoint_mindir_and_onnx(tmp_path):
    ckpt = checkpoint_for("resnext_test", tmp_path)
    images = image_folder(tmp_path / "images")
    exported = {
        fmt: export(
            compose_config(
                ["task=export", *SIZE, "export.batch_size=2", f"ckpt={ckpt}", f"export.format={fmt}"], tmp_path / fmt
            )
        )["path"]  # fmt: skip
        for fmt in ("MINDIR", "ONNX")
    }
    results = {}
    runs = {  # the checkpoint as it is (the reference), through ONNX Runtime (what auto picks on a CPU), the files
        "ckpt": (ckpt, ["inference.engine=mindspore"]),
        "ckpt_onnxruntime": (ckpt, ["inference.engine=auto"]),
        **{fmt: (path, []) for fmt, path in exported.items()},
    }
    for name, (model, engine) in runs.items():
        cfg = compose_config(["task=predict", *SIZE, f"ckpt={model}", f"input={images}", "predict.top_k=3",
                              "predict.batch_size=3", *engine], tmp_path / f"predict_{name}")  # fmt: skip
        results[name] = predict(cfg)
        run_dir = tmp_path / f"predict_{name}" / "run"
        saved = json.loads((run_dir / "predictions.json").read_text())
        assert [Path(s["file"]).name for s in saved["skipped"]] == ["broken.jpg"]
        rows = list(csv.DictReader((run_dir / "predictions.csv").open()))
        columns = {"file", *(f"{field}_{i}" for i in (1, 2, 3) for field in ("class", "probability"))}
        assert len(rows) == 4 and set(rows[0]) == columns
    reference = results["ckpt"]
    assert [Path(r["file"]).name for r in reference] == ["digit_0.jpg", "digit_1.jpg", "digit_2.jpg", "digit_3.jpg"]
    for record in reference:
        assert len(record["top_k"]) == 3 and record["top_k"][0]["class"].startswith("digit ")
        probabilities = [c["probability"] for c in record["top_k"]]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-9
    # a MINDIR that takes only its export batch (as Conformer's): predict pads every batch to it
    spec = exported["MINDIR"].parent / "export.json"
    spec.write_text(json.dumps({**json.loads(spec.read_text()), "any_batch": False}))
    cfg = compose_config(["task=predict", *SIZE, f"ckpt={exported['MINDIR']}", f"input={images}", "predict.top_k=3",
                          "predict.batch_size=3"], tmp_path / "predict_fixed")  # fmt: skip
    results["fixed batch MINDIR"] = predict(cfg)
    for name in ("ckpt_onnxruntime", "MINDIR", "ONNX", "fixed batch MINDIR"):  # files: classes.json beside them
        for got, want in zip(results[name], reference, strict=True):
            assert [c["class"] for c in got["top_k"]] == [c["class"] for c in want["top_k"]]
            assert np.allclose([c["probability"] for c in got["top_k"]], [c["probability"] for c in want["top_k"]],
                               atol=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["input=/nonexistent/photos"], "input=/nonexistent/photos: no such file or folder"),
        (["format=onnx"], "is a '.ckpt' file but format=onnx"),
        (["predict.top_k=0"], "predict.top_k and predict.batch_size must be >= 1"),
    ],
)
def test_bad_predict_requests_are_refused(tmp_path, overrides, message):
    ckpt = checkpoint_for("resnext_test", tmp_path)
    images = image_folder(tmp_path / "images")
    cfg = compose_config(["task=predict", *SIZE, f"ckpt={ckpt}", f"input={images}", *overrides], tmp_path)
    with pytest.raises(ConfigError, match=message):
        predict(cfg)
