"""Fine-tuning as a user runs it: ``model.pretrained=`` from this project's own runs (a training state, a
``runs:/`` URI) with what it did recorded in MLflow; ``task=convert`` turning timm and mindcv weights into a
checkpoint that loads to the same logits on a machine without torch; refusals as one line, exit status 2."""

from __future__ import annotations

import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

from framework.config import ConfigError
from framework.engine.checkpoint import read_checkpoint
from framework.models import create_model
from framework.paths import PROJECT_ROOT
from framework.tasks.convert import convert
from framework.tasks.train import train
from tests.conftest import FAST, all_runs, compose_config, mlflow_client
from tests.test_pretrained import IMAGE, assert_same_logits, our_logits, save_safetensors, timm_logits, timm_model

pytestmark = pytest.mark.slow  # end-to-end jobs: python -m pytest -m "not slow" skips them

ONE_EPOCH = [*FAST, "engine.epochs=1", "engine.limit_train_batches=4"]


def test_training_starts_from_a_run_of_this_project(tmp_path):
    train(compose_config(ONE_EPOCH, tmp_path))
    (source,) = all_runs(mlflow_client(tmp_path))
    last = f"runs:/{source.info.run_id}/checkpoints/last.ckpt"  # a training state: its optimizer is left aside
    train(compose_config([*ONE_EPOCH, f"model.pretrained={last}"], tmp_path))
    train(compose_config([*ONE_EPOCH, f"model.pretrained={last}", "model.pretrained_head=reset"], tmp_path))
    started = [r for r in all_runs(mlflow_client(tmp_path)) if "pretrained" in r.data.tags]
    loads = sorted((r.data.tags["pretrained_load"] for r in started), reverse=True)
    assert {r.data.tags["pretrained"] for r in started} == {last}
    assert loads[0].startswith("loaded 87 tensors from checkpoint last.ckpt; head loaded; ignored: ")
    assert "training-state tensors (optimizer, EMA)" in loads[0]
    assert loads[1].startswith("loaded 85 tensors from checkpoint last.ckpt; head re-initialised: 10 → 10 classes")
    artifact = mlflow_client(tmp_path).download_artifacts(started[0].info.run_id, "model/pretrained.txt", str(tmp_path))
    assert open(artifact).read().strip() == started[0].data.tags["pretrained_load"]


def test_convert_timm_weights_then_start_from_them_without_torch(tmp_path, monkeypatch):
    model = timm_model("efficientnet_b0")
    weights = save_safetensors(model, tmp_path / "efficientnet_b0.ra_in1k.safetensors")
    path = convert(compose_config(["task=convert", "model=efficientnet_b2", "model.name=efficientnet_b0",
                                   f"model.pretrained={weights}"], tmp_path))  # fmt: skip
    _, meta = read_checkpoint(path, meta_only=True)
    assert meta["num_classes"] == 1000 and meta["converted_from"] == str(weights)
    (run,) = all_runs(mlflow_client(tmp_path))
    assert run.data.tags["task"] == "convert" and run.data.tags["pretrained_load"].startswith("loaded 311 tensors")
    assert mlflow_client(tmp_path).get_experiment(run.info.experiment_id).name == "classification-conversions"
    monkeypatch.setitem(sys.modules, "torch", None)  # where the checkpoint is used, torch need not be
    ms.set_context(mode=ms.PYNATIVE_MODE)
    network = create_model("efficientnet_b0", pretrained=f"{path}")
    monkeypatch.undo()
    assert_same_logits(our_logits(network), timm_logits(model), "converted timm efficientnet_b0")


def test_a_converted_mindcv_resnext_keeps_the_pooling_it_was_trained_with(tmp_path):
    models = pytest.importorskip("mindcv.models")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_seed(0)
    model = models.create_model("resnext50_32x4d", num_classes=1000)
    ms.save_checkpoint(model, str(tmp_path / "resnext50_32x4d-mindcv.ckpt"))
    config = ["task=convert", "model=resnext50", f"model.pretrained={tmp_path / 'resnext50_32x4d-mindcv.ckpt'}"]
    path = convert(compose_config(config, tmp_path))
    assert read_checkpoint(path, meta_only=True)[1]["model_settings"] == {"stem_pool": "same"}
    network = create_model("resnext50_32x4d", pretrained=path)  # built as mindcv's again, from the record
    assert network.pretrained_report.variant == {"stem_pool": "same"}
    model.set_train(False)
    assert_same_logits(our_logits(network), model(ms.Tensor(IMAGE)).asnumpy(), "converted mindcv resnext50_32x4d")


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("/nonexistent/w.safetensors", "model.pretrained=/nonexistent/w.safetensors: no such checkpoint file"),
        ("{tmp}/notes.txt", "notes.txt: unknown weights format '.txt'; give .safetensors, .pth/.pt/.bin or .ckpt"),
        ("{tmp}/b0.safetensors", "timm/torch weights b0.safetensors has no tensor for conv1.weight"),
    ],
)
def test_weights_that_cannot_start_the_model_are_one_line_and_exit_2(tmp_path, given, message):
    (tmp_path / "notes.txt").write_text("not weights")
    save_safetensors(timm_model("efficientnet_b0"), tmp_path / "b0.safetensors")
    command = [sys.executable, "run.py", *ONE_EPOCH, f"model.pretrained={given.format(tmp=tmp_path)}"]
    done = subprocess.run([*command, f"paths.output_dir={tmp_path}"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: ") and message in lines[0], lines
    assert not (tmp_path / "mlflow").exists() or not all_runs(mlflow_client(tmp_path))  # nothing ran


def test_convert_needs_weights(tmp_path):
    with pytest.raises(ConfigError, match="task=convert needs the weights to convert: model.pretrained="):
        convert(compose_config(["task=convert"], tmp_path))


def test_a_frozen_backbone_and_its_batchnorm_stay_as_loaded_until_unfrozen(tmp_path):
    """Head-only training for epoch 1 (optimizer.freeze every non-head tensor, engine.freeze_bn_stats), the
    whole network from epoch 2 (optimizer.unfreeze_epoch=1): epoch 1's checkpoint holds the loaded backbone and
    BatchNorm statistics exactly, epoch 2's a trained backbone with the statistics still as loaded."""
    train(compose_config(ONE_EPOCH, tmp_path / "source"))
    source = next((tmp_path / "source").rglob("best.ckpt"))
    overrides = [*ONE_EPOCH, "engine.epochs=2", f"model.pretrained={source}", "optimizer.freeze=['^(?!head[.])']",
                 "optimizer.unfreeze_epoch=1", "engine.freeze_bn_stats=true", "engine.checkpoint_every_n_epochs=1",
                 "engine.keep_checkpoint_max=2"]  # fmt: skip
    train(compose_config(overrides, tmp_path / "tuned"))
    loaded = read_checkpoint(source)[0]
    after_1 = read_checkpoint(next((tmp_path / "tuned").rglob("epoch_0001.ckpt")))[0]
    after_2 = read_checkpoint(next((tmp_path / "tuned").rglob("epoch_0002.ckpt")))[0]

    def same(state, name: str) -> bool:
        return np.array_equal(state[name].asnumpy(), loaded[name].asnumpy())

    backbone = [n for n in loaded if not n.startswith("head.")]
    statistics = [n for n in backbone if n.endswith(("moving_mean", "moving_variance"))]
    weights = [n for n in backbone if n not in statistics]
    assert statistics and all(same(after_1, n) for n in backbone)
    assert not same(after_1, "head.fc.weight")
    assert all(same(after_2, n) for n in statistics) and not any(same(after_2, n) for n in weights)


def test_fine_tuning_settings_hold_across_a_resume_with_ema_and_amp(tmp_path):
    """Frozen through epoch 1 with layer decay, a head lr multiplier, EMA and AMP; the job ends after epoch 1 and
    is resumed for epoch 2 (the groups' lr is set again from the epoch): epoch 1 left the backbone as loaded,
    epoch 2 trained it, all in one MLflow run."""
    train(compose_config(ONE_EPOCH, tmp_path / "source"))
    source = next((tmp_path / "source").rglob("best.ckpt"))
    tuned = [*ONE_EPOCH, f"model.pretrained={source}", "optimizer.freeze=['^(?!head[.])']",
             "optimizer.unfreeze_epoch=1", "optimizer.layer_decay=0.7", "optimizer.head_lr_scale=5",
             "engine.ema_decay=0.9", "engine.amp_level=O1", "engine.checkpoint_every_n_epochs=1",
             "engine.keep_checkpoint_max=2"]  # fmt: skip
    train(compose_config(tuned, tmp_path / "tuned"))
    train(compose_config([*tuned, "engine.epochs=2", "resume=auto"], tmp_path / "tuned"))
    loaded = read_checkpoint(source)[0]
    weights = [n for n in loaded if not n.startswith("head.") and not n.endswith(("moving_mean", "moving_variance"))]
    epochs = [read_checkpoint(next((tmp_path / "tuned").rglob(f"epoch_000{e}.ckpt")))[0] for e in (1, 2)]
    unchanged = [[np.array_equal(state[n].asnumpy(), loaded[n].asnumpy()) for n in weights] for state in epochs]
    assert all(unchanged[0]) and not any(unchanged[1])
    (run,) = all_runs(mlflow_client(tmp_path / "tuned"))
    assert run.data.metrics["epoch"] == 2 and run.data.tags["pretrained_load"].startswith("loaded 87 tensors")
