"""The five seed recipes as `conf/experiment/` files: every value of the seed tables, and each recipe runs."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from framework.tasks.train import train
from tests.conftest import all_runs, compose_config, mlflow_client

SEED_VALUES = {
    "nfnet_f0_imagenet": {
        "model.name": "nfnet_f0", "model.drop_rate": 0.2, "model.drop_path_rate": 0.25,
        "dataset.image_size": 192, "dataset.eval_image_size": 256, "dataset.interpolation": "bicubic",
        "dataset.batch_size": 128, "dataset.num_parallel_workers": 16, "dataset.num_classes": 1000,
        "dataset.augment.auto_augment": "rand-m5-n4-mstd0.5-inc1", "dataset.augment.re_prob": 0.0,
        "dataset.augment.re_mode": "pixel", "dataset.augment.re_count": 1,
        "dataset.mixup.mixup_alpha": 0.8, "dataset.mixup.cutmix_alpha": 1.0, "dataset.mixup.prob": 1.0,
        "dataset.mixup.switch_prob": 0.5, "dataset.mixup.mode": "batch", "dataset.mixup.label_smoothing": 0.1,
        "optimizer.name": "sgd_agc", "optimizer.momentum": 0.9, "optimizer.nesterov": True,
        "optimizer.weight_decay": 2e-5, "optimizer.agc_clipping": 0.01, "optimizer.agc_eps": 0.001,
        "scheduler._target_": "framework.optim.schedules.cosine", "scheduler.lr": 0.1, "scheduler.min_lr": 6e-7,
        "scheduler.warmup_epochs": 5, "scheduler.warmup_lr": 7e-7, "loss.label_smoothing": 0.1,
        "engine.epochs": 360, "engine.amp_level": "O2", "engine.loss_scale": "dynamic",
        "engine.loss_scale_value": 1024, "engine.accumulation_steps": 1,
    },
    "resnext50_imagenet": {
        "model.name": "resnext50_32x4d", "dataset.image_size": 224, "dataset.batch_size": 128,
        "optimizer.name": "momentum", "optimizer.momentum": 0.9, "optimizer.weight_decay": 1e-4,
        "scheduler._target_": "framework.optim.schedules.cosine_annealing", "scheduler.lr": 0.05,
        "scheduler.t_max": 150, "scheduler.eta_min": 0.0, "scheduler.warmup_epochs": 1,
        "loss.label_smoothing": 0.1, "engine.epochs": 150, "engine.loss_scale": "static",
        "engine.loss_scale_value": 1024, "engine.checkpoint_every_n_steps": 2000,
    },
    "efficientnet_b2_imagenet": {
        "model.name": "efficientnet_b2", "dataset.image_size": 260, "dataset.batch_size": 256,
        "optimizer.name": "rmsprop_tf", "optimizer.momentum": 0.9, "optimizer.weight_decay": 1e-5,
        "optimizer.eps": 0.001, "optimizer.rmsprop_decay": 0.9,
        "scheduler._target_": "framework.optim.schedules.linear", "scheduler.lr_init": 1e-4,
        "scheduler.lr_max": 0.13, "scheduler.lr_end": 1e-5, "scheduler.warmup_epochs": 2,
        "loss.label_smoothing": 0.1, "engine.epochs": 350, "engine.loss_scale": "static",
        "engine.loss_scale_value": 1024, "engine.checkpoint_every_n_epochs": 1, "engine.keep_checkpoint_max": 5,
    },
    "nasnet_a_mobile_imagenet": {
        "model.name": "nasnet_a_mobile", "model.aux_factor": 0.4, "dataset.image_size": 224,
        "dataset.batch_size": 32, "dataset.num_parallel_workers": 8, "optimizer.name": "rmsprop_tf",
        "optimizer.rmsprop_decay": 0.9, "optimizer.momentum": 0.9, "optimizer.eps": 1.0,
        "optimizer.weight_decay": 4e-5, "scheduler._target_": "framework.optim.schedules.exponential",
        "scheduler.lr": 0.04, "scheduler.decay_rate": 0.97, "scheduler.decay_epochs": 2.4,
        "scheduler.staircase": True, "loss.label_smoothing": 0.1, "engine.epochs": 500,
        "engine.keep_checkpoint_max": 100, "engine.loss_scale": "none", "seed": 1,
    },
    "conformer_ti_imagenet": {
        "model.name": "conformer_ti", "dataset.image_size": 224, "dataset.interpolation": "bicubic",
        "dataset.batch_size": 128, "dataset.num_parallel_workers": 32,
        "dataset.augment.auto_augment": "rand-m9-mstd0.5-inc1", "dataset.augment.re_prob": 0.25,
        "dataset.augment.re_mode": "pixel", "dataset.augment.re_count": 1, "dataset.mixup.mixup_alpha": 0.8,
        "dataset.mixup.cutmix_alpha": 1.0, "dataset.mixup.prob": 1.0, "dataset.mixup.switch_prob": 0.5,
        "dataset.mixup.mode": "batch", "optimizer.name": "adamw", "optimizer.betas": [0.9, 0.999],
        "optimizer.weight_decay": 0.05, "scheduler._target_": "framework.optim.schedules.cosine",
        "scheduler.lr": 0.001, "scheduler.warmup_lr": 1e-6, "scheduler.min_lr": 1e-5,
        "scheduler.warmup_epochs": 5, "loss.label_smoothing": 0.1, "engine.epochs": 300,
        "engine.amp_level": "O1", "engine.loss_scale": "dynamic", "engine.clip_grad_norm": 5.0,
    },
}  # fmt: skip


@pytest.mark.parametrize("experiment", sorted(SEED_VALUES))
def test_experiment_carries_the_seed_values(tmp_path, experiment):
    cfg = compose_config([f"experiment={experiment}", "dataset.path=/data/imagenet"], tmp_path)
    for key, expected in SEED_VALUES[experiment].items():
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        assert value == pytest.approx(expected) if isinstance(expected, float) else value == expected, key


# The whole recipe on digits: its model, optimizer, schedule, precision, loss scaling, augmentation and mixup,
# only smaller (16 px, 1 epoch of 2 steps of 8 images, 90 val images; epochs and resume: test_step.py). Run
# eagerly: compiling a full-size model's train and eval graphs takes 1-3 min here, and graph mode is covered
# elsewhere (each model's inference graph in test_export, graph training in test_step and test_optimizers).
ON_DIGITS = ["dataset=digits", "dataset.image_size=16", "dataset.eval_image_size=null", "dataset.batch_size=8",
             "dataset.val_fraction=0.05", "dataset.eval_batch_size=90", "engine.epochs=1",
             "engine.limit_train_batches=2", "hardware.mode=pynative"]  # fmt: skip


@pytest.mark.parametrize("experiment", sorted(SEED_VALUES))
def test_experiment_recipe_runs_on_digits(tmp_path, experiment):
    cfg = compose_config([f"experiment={experiment}", *ON_DIGITS], tmp_path)
    result = train(cfg)
    assert [h["epoch"] for h in result.history] == [1] and 0.0 <= result.last["val_top1"] <= 1.0
    (run,) = all_runs(mlflow_client(tmp_path))
    assert run.info.status == "FINISHED" and run.data.params["engine.amp_level"] == cfg.engine.amp_level


@pytest.mark.parametrize("experiment", sorted(SEED_VALUES))
def test_recipe_lr_holds_on_eight_devices_and_scales_elsewhere(tmp_path, experiment):
    """The seeds trained on 8 devices: the recipe's lr is used as is there, and scaled linearly on others."""
    cfg = compose_config([f"experiment={experiment}", "dataset.path=/data/imagenet", "hardware=ascend8"], tmp_path)
    scaling, devices = instantiate(cfg.lr_scaling), instantiate(cfg.hardware).world_size
    assert devices == 8 and scaling.factor(cfg.dataset.batch_size * devices) == 1.0
    assert scaling.factor(cfg.dataset.batch_size) == pytest.approx(1 / 8)
