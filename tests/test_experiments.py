"""The five seed recipes as `conf/experiment/` files: every value they share with their seed, read from the seed's
own README (docs/seeds/), and each recipe runs."""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from framework.tasks.train import train
from tests.conftest import all_runs, compose_config, mlflow_client

pytestmark = pytest.mark.slow  # end-to-end jobs: python -m pytest -m "not slow" skips them

SEEDS = Path(__file__).resolve().parents[1] / "docs" / "seeds"

# ---- reading a seed README: its parameter lines, the flags of its commands, its tables ----

FENCE = re.compile(r"^\s*```")
HEADING = re.compile(r"^#+\s+(.*?)\s*$")
LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
# in a code block: `"per_batch_size": 128,   # comment`, `'lr_init':0.04,`, `base_lr: 0.1   # comment`
PARAM = re.compile(r"""^\s*(["']?)([A-Za-z_][A-Za-z0-9_]*)\1\s*:\s*(.*?)\s*(?:#.*)?$""")
# in a code block: `python export.py --width 260 --height 260`, kept as `--width`, `--height`
FLAG = re.compile(r"(?<!\S)--([A-Za-z_][A-Za-z0-9_]*)(?:\s*=\s*|\s+)(?!-)(\S+)")
# a table cell of parameters: `epoch=360, batch_size=128`
PAIRS = re.compile(r"\w+=[^,=]+(?:,\s*\w+=[^,=]+)*")


class Found(NamedTuple):
    value: Any
    line: int
    where: str  # the heading above it; in a table also the cell's column


def literal(text: str) -> Any:
    """A Python literal (`0.`, `True`, `[ 0.9, 0.999 ]`, `'224,224'`), else the bare text (`rand-m9-mstd0.5-inc1`)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text.strip("'\"")


@cache
def read_seed(path: Path) -> dict[str, list[Found]]:
    """Every value a seed README gives each name, with its line: parameter lines and command flags in code
    blocks, and table rows (`| 优化器 | Momentum |` under the name `优化器`, `epoch=360` cells under `epoch`)."""
    found: dict[str, list[Found]] = {}
    heading, in_code, columns = "", False, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        pairs: list[tuple[str, str, str]] = []  # name, value, where
        if FENCE.match(line):
            in_code = not in_code
        elif in_code:
            param = PARAM.match(line)
            if param and param.group(3).rstrip(","):
                pairs.append((param.group(2), param.group(3).rstrip(","), heading))
            pairs += [(f"--{name}", value, heading) for name, value in FLAG.findall(line)]
        elif HEADING.match(line):
            heading, columns = LINK.sub(r"\1", HEADING.match(line).group(1)), []
        elif line.lstrip().startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not columns:
                columns = cells  # the header row
            elif not set("".join(cells)) <= set("-: "):  # not the |---| row
                for column, cell in zip(columns[1:], cells[1:], strict=False):
                    where = f"{heading} / {column}"
                    if PAIRS.fullmatch(cell):
                        pairs += [(*pair.split("="), where) for pair in cell.split(",")]
                    elif cell:
                        pairs.append((cells[0], cell, where))
        else:
            columns = []
        for name, value, where in pairs:
            found.setdefault(name.strip(), []).append(Found(literal(value.strip()), number, where))
    return found


# ---- each recipe's values, as the seed names them ----


class From(NamedTuple):
    """Where the seed gives one of our values: its name(s) there, and how its value(s) become ours."""

    names: str | tuple[str, ...]
    convert: Callable[..., Any] | Mapping[Any, Any] | None = None  # None: the same value
    where: str | None = None  # a name the seed gives different values: the heading (/ column) that is ours


def schedule(name: str) -> str:
    """scheduler._target_ from lr_scheduler / lr_decay_mode ("liner" is EfficientNet-B2's spelling of linear)."""
    return "framework.optim.schedules." + SCHEDULES.get(name, name)


def loss_scale(dynamic: bool, scale: float = 1) -> str:
    """engine.loss_scale from is_dynamic_loss_scale and loss_scale: a fixed scale of 1 scales nothing."""
    return "dynamic" if dynamic else "none" if scale == 1 else "static"


def fixed_loss_scale(scale: float) -> str:
    """A seed with a loss_scale and no is_dynamic_loss_scale trains with that scale fixed."""
    return loss_scale(False, scale)


def smoothing(on: bool, factor: float) -> float:
    return factor if on else 0.0


def eval_every(while_training: bool, epochs: int) -> int:
    """eval_while_train False: evaluated once, after the last epoch."""
    return 1 if while_training else epochs


def checkpoint_every(save: bool, epochs: int) -> int:
    return epochs if save else 0


def square(*sides: int | str) -> int:
    """Our one square size from the seed's height and width (`'224,224'`, or `--height 260 --width 260`)."""
    sizes = {int(s) for v in sides for s in str(v).split(",")}
    assert len(sizes) == 1, f"not square: {sides}"
    return sizes.pop()


SCHEDULES = {"cosine_lr": "cosine", "cosine_annealing": "cosine_annealing", "liner": "linear"}
OPTIMIZERS = {"SGDAGC": "sgd_agc", "Momentum": "momentum", "rmsprop": "rmsprop_tf", "adamw": "adamw"}
# NFNet-F0 and Conformer-Ti: the same timm-style data names
AUGMENT = {
    "dataset.augment.auto_augment": "auto_augment", "dataset.augment.re_prob": "re_prob",
    "dataset.augment.re_mode": "re_mode", "dataset.augment.re_count": "re_count",
    "dataset.mixup.mixup_alpha": "mix_up", "dataset.mixup.cutmix_alpha": "cutmix", "dataset.mixup.prob": "mixup_prob",
    "dataset.mixup.switch_prob": "switch_prob", "dataset.mixup.mode": "mixup_mode",
    "dataset.mixup.label_smoothing": "label_smoothing", "dataset.interpolation": "interpolation",
}  # fmt: skip

# Our key ← the seed's name, per recipe; the seed file is docs/seeds/<recipe without _imagenet>.md.
SEED_KEYS: dict[str, dict[str, str | From]] = {
    "nfnet_f0_imagenet": {
        # depths [1, 2, 6, 3] is what model.name nfnet_f0 builds; crop_pct: KNOWN_DIFFERENCES
        "model.name": From("arch", {"dm_nfnet_f0": "nfnet_f0"}), "model.drop_rate": "drop_rate",
        "model.drop_path_rate": "drop_path_rate", "dataset.image_size": "input_size",
        "dataset.eval_image_size": "test_input_size", "dataset.batch_size": "batch_size",
        "dataset.num_parallel_workers": "num_parallel_workers", "dataset.num_classes": "num_classes", **AUGMENT,
        "optimizer.name": From("optimizer", OPTIMIZERS), "optimizer.momentum": "momentum",
        "optimizer.nesterov": "use_nesterov", "optimizer.weight_decay": "weight_decay",
        "optimizer.agc_clipping": "clipping", "optimizer.agc_eps": "eps",
        "scheduler._target_": From("lr_scheduler", schedule), "scheduler.lr": "base_lr", "scheduler.min_lr": "min_lr",
        "scheduler.warmup_epochs": "warmup_length", "scheduler.warmup_lr": "warmup_lr",
        "loss.label_smoothing": "label_smoothing", "engine.epochs": "epochs", "engine.amp_level": "amp_level",
        "engine.loss_scale": From(("is_dynamic_loss_scale", "loss_scale"), loss_scale),
        "engine.loss_scale_value": "loss_scale", "engine.accumulation_steps": "accumulation_step",
        "engine.eval_every_n_epochs": From(("eval_while_train", "epochs"), eval_every),
    },
    "resnext50_imagenet": {
        # lr_epochs / lr_gamma belong to the seed's other schedule (scheduler=multistep), not this recipe
        "model.name": From("backbone", {"resnext50": "resnext50_32x4d"}),
        "dataset.image_size": From("image_height", square), "dataset.batch_size": "per_batch_size",
        "dataset.num_classes": "num_classes", "optimizer.name": From("优化器", OPTIMIZERS),
        "optimizer.momentum": "momentum", "optimizer.weight_decay": "weight_decay",
        "scheduler._target_": From("lr_scheduler", schedule), "scheduler.lr": "lr", "scheduler.t_max": "T_max",
        "scheduler.eta_min": "eta_min", "scheduler.warmup_epochs": "warmup_epochs",
        "loss.label_smoothing": From(("label_smooth", "label_smooth_factor"), smoothing), "engine.epochs": "max_epoch",
        "engine.loss_scale": From(("is_dynamic_loss_scale", "loss_scale"), loss_scale),
        "engine.loss_scale_value": "loss_scale", "engine.checkpoint_every_n_steps": "ckpt_interval",
    },
    "efficientnet_b2_imagenet": {
        # ours, not in the seed: optimizer.rmsprop_decay 0.9 (the README names no decay; MindSpore RMSProp's default)
        "model.name": From(("模型名称", "模型版本"), lambda name, version: f"{name}_{version}".lower()),
        "dataset.image_size": From(("--height", "--width"), square),  # its export command: 260 x 260
        "dataset.batch_size": "batch_size", "dataset.num_classes": "class_num",
        "optimizer.name": From("opt", OPTIMIZERS), "optimizer.momentum": "momentum",
        "optimizer.weight_decay": "weight_decay", "optimizer.eps": "opt_eps",
        "scheduler._target_": From("lr_decay_mode", schedule), "scheduler.lr_init": "lr_init",
        "scheduler.lr_max": "lr_max", "scheduler.lr_end": "lr_end", "scheduler.warmup_epochs": "warmup_epochs",
        "loss.label_smoothing": From(("use_label_smooth", "label_smooth_factor"), smoothing),
        "engine.epochs": "epoch_size", "engine.loss_scale": From("loss_scale", fixed_loss_scale),
        "engine.loss_scale_value": "loss_scale", "engine.keep_checkpoint_max": "keep_checkpoint_max",
        "engine.checkpoint_every_n_epochs": From(("save_checkpoint", "save_checkpoint_epochs"), checkpoint_every),
    },
    "nasnet_a_mobile_imagenet": {
        # ours, not in the seed: model.name (its parameters name no network; its script is nasnet_a_mobile.py),
        # dataset.image_size 224 (NASNet-A-Mobile's input), scheduler._target_ exponential and scheduler.staircase
        # (it names no schedule, only lr_decay_rate and num_epoch_per_decay), engine.checkpoint_every_n_epochs 1;
        # optimizer.name: KNOWN_DIFFERENCES
        "model.aux_factor": "aux_factor", "dataset.batch_size": "batch_size",
        "dataset.num_parallel_workers": "work_nums", "dataset.num_classes": "num_classes",
        "optimizer.rmsprop_decay": "rmsprop_decay", "optimizer.momentum": "momentum", "optimizer.eps": "opt_eps",
        "optimizer.weight_decay": "weight_decay", "scheduler.lr": "lr_init", "scheduler.decay_rate": "lr_decay_rate",
        "scheduler.decay_epochs": "num_epoch_per_decay", "loss.label_smoothing": "label_smooth_factor",
        "engine.epochs": "epoch_size", "engine.keep_checkpoint_max": "keep_checkpoint_max",
        "engine.loss_scale": From("loss_scale", fixed_loss_scale), "seed": "random_seed",
    },
    "conformer_ti_imagenet": {
        # seed values we have no key for: momentum 0.9 (AdamW has betas) and nonlinearity GELU (inside the model)
        "model.name": From("arch", {"ConformerTi": "conformer_ti"}), "dataset.image_size": "image_size",
        "dataset.batch_size": "batch_size", "dataset.num_parallel_workers": "num_parallel_workers",
        "dataset.num_classes": "num_classes", **AUGMENT, "optimizer.name": From("optimizer", OPTIMIZERS),
        "optimizer.betas": "beta", "optimizer.weight_decay": "weight_decay",
        "scheduler._target_": From("lr_scheduler", schedule), "scheduler.lr": "base_lr",
        "scheduler.warmup_lr": "warmup_lr", "scheduler.min_lr": "min_lr", "scheduler.warmup_epochs": "warmup_length",
        "loss.label_smoothing": "label_smoothing", "engine.epochs": "epochs", "engine.amp_level": "amp_level",
        "engine.loss_scale": From("is_dynamic_loss_scale", loss_scale),
        "engine.clip_grad_norm": "clip_global_norm_value",
    },
}  # fmt: skip

# Where a recipe knowingly departs from its seed: our value and the seed's, both checked, so that a change to
# either side is looked at again.
KNOWN_DIFFERENCES = {
    # "crop_pct: 30" is no fraction (timm's dm_nfnet_f0 and DeepMind use 0.9)
    ("nfnet_f0_imagenet", "dataset.crop_pct"): (0.9, "crop_pct", 30),
    # the table's "Momentum" contradicts the seed's own rmsprop_decay and opt_eps (it is copied from ResNeXt-50's
    # README, loss 1.8965 included); the recipe follows the parameters
    ("nasnet_a_mobile_imagenet", "optimizer.name"): ("rmsprop_tf", "优化器", "Momentum"),
}


def seed_file(experiment: str) -> Path:
    return SEEDS / f"{experiment.removesuffix('_imagenet')}.md"


def seed_value(experiment: str, key: str, source: str | From, path: Path | None = None) -> tuple[Any, str]:
    """The value the recipe's seed file (or ``path``) gives our ``key``, and where: ``lr (docs/seeds/x.md:115)``."""
    source = From(source) if isinstance(source, str) else source
    names = (source.names,) if isinstance(source.names, str) else source.names
    path, values, cited = path or seed_file(experiment), [], []
    for name in names:
        found = [f for f in read_seed(path).get(name, []) if source.where is None or source.where in f.where]
        distinct = {repr(f.value) for f in found}
        gives = f"{[(f.value, f.line, f.where) for f in found]}; pick one with From(where=...)" if found else "nothing"
        assert len(distinct) == 1, f"{experiment}: {key} ← {name!r}: docs/seeds/{path.name} gives {gives}"
        values.append(found[0].value)
        cited.append(f"{name} (docs/seeds/{path.name}:{found[0].line})")
    value, convert = values[0], source.convert
    if isinstance(convert, Mapping):
        value = convert.get(value, value)  # a name the mapping does not know stays the seed's, and fails
    elif convert is not None:
        value = convert(*values)
    return value, " and ".join(cited)


def same(value: Any, expected: Any) -> bool:
    return value == pytest.approx(expected) if isinstance(expected, float) else value == expected


SAMPLE_SEED = """## [脚本参数](#目录)

```python
"per_batch_size": 128,   # 批次
'lr_init':0.04,
warmup_lr: 0.000001      # 热身
beta: [ 0.9, 0.999 ]
auto_augment: rand-m9-mstd0.5-inc1
```

```bash
python export.py --width 260
```

## 性能

| 参数 | Ascend | GPU |
| --- | --- | --- |
| 优化器 | Momentum | Momentum |
| 训练参数 | epoch=360, batch_size=128 | epoch=360, batch_size=64 |
"""


def test_seed_reader_reads_parameter_lines_commands_and_tables(tmp_path):
    path = tmp_path / "seed.md"
    path.write_text(SAMPLE_SEED, encoding="utf-8")
    found = {name: [f.value for f in values] for name, values in read_seed(path).items()}
    assert found == {
        "per_batch_size": [128], "lr_init": [0.04], "warmup_lr": [1e-6], "beta": [[0.9, 0.999]],
        "auto_augment": ["rand-m9-mstd0.5-inc1"], "--width": [260], "优化器": ["Momentum", "Momentum"],
        "epoch": [360, 360], "batch_size": [128, 64],
    }  # fmt: skip
    assert read_seed(path)["per_batch_size"][0] == Found(128, 4, "脚本参数")
    with pytest.raises(AssertionError, match="pick one"):  # two values for one name: the mapping must choose
        seed_value("test", "dataset.batch_size", "batch_size", path)
    assert seed_value("test", "dataset.batch_size", From("batch_size", where="GPU"), path)[0] == 64


@pytest.mark.parametrize("experiment", sorted(SEED_KEYS))
def test_experiment_carries_the_seed_values(tmp_path, experiment):
    cfg = compose_config([f"experiment={experiment}", "dataset.path=/data/imagenet"], tmp_path)
    wrong = []  # every disagreement at once
    for key, source in SEED_KEYS[experiment].items():
        expected, cited = seed_value(experiment, key, source)
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        if not same(value, expected):
            wrong.append(f"{experiment}: {key} is {value!r}, the seed's {cited} makes it {expected!r}")
    known = {key: difference for (recipe, key), difference in KNOWN_DIFFERENCES.items() if recipe == experiment}
    for key, (ours, name, theirs) in known.items():
        value, (seed, cited) = OmegaConf.select(cfg, key), seed_value(experiment, key, name)
        if (value, seed) != (ours, theirs):
            wrong.append(
                f"{experiment}: {key} is {value!r} and the seed's {cited} is {seed!r}, no longer the known "
                f"difference {ours!r} / {theirs!r}: look at KNOWN_DIFFERENCES again"
            )
    assert not wrong, "\n".join(wrong)


# The whole recipe on digits: its model, optimizer, schedule, precision, loss scaling, augmentation and mixup,
# only smaller (16 px, 1 epoch of 2 steps of 8 images, 90 val images; epochs and resume: test_step.py). Run
# eagerly: compiling a full-size model's train and eval graphs takes 1-3 min here, and graph mode is covered
# elsewhere (each model's inference graph in test_export, graph training in test_step and test_optimizers).
ON_DIGITS = ["dataset=digits", "dataset.image_size=16", "dataset.eval_image_size=null", "dataset.batch_size=8",
             "dataset.val_fraction=0.05", "dataset.eval_batch_size=90", "engine.epochs=1",
             "engine.limit_train_batches=2", "hardware.mode=pynative"]  # fmt: skip
VAL_IMAGES, STEPS = 90, 2
# what the run on digits sets itself; every other key of SEED_KEYS keeps the seed's value
NOT_THE_SEEDS = {o.split("=")[0] for o in ON_DIGITS} | {"dataset.num_classes"}


@pytest.mark.parametrize("experiment", sorted(SEED_KEYS))
def test_experiment_recipe_runs_on_digits(tmp_path, experiment):
    cfg = compose_config([f"experiment={experiment}", *ON_DIGITS], tmp_path)
    result = train(cfg)
    assert [h["epoch"] for h in result.history] == [1]
    client = mlflow_client(tmp_path)
    (run,) = all_runs(client)
    assert run.info.status == "FINISHED"
    history = {
        name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
        for name in ("train_loss", "lr", "loss_scale", "val_loss", "val_top1", "val_top5")
    }
    for name in ("train_loss", "lr"):  # every step's, finite
        assert [s for s, _ in history[name]] == list(range(1, STEPS + 1)), name
        assert all(math.isfinite(v) for _, v in history[name]), (name, history[name])
    val = {}
    for name in ("val_loss", "val_top1", "val_top5"):  # evaluated once, after epoch 1 (update 2), as the result says
        ((step, val[name]),) = history[name]
        assert step == STEPS and math.isfinite(val[name]) and val[name] == pytest.approx(result.last[name]), name
    # accuracies over the whole val split: whole images out of 90, top-5 at least top-1
    assert 0.0 <= val["val_top1"] <= val["val_top5"] <= 1.0, val
    for name in ("val_top1", "val_top5"):
        assert val[name] * VAL_IMAGES == pytest.approx(round(val[name] * VAL_IMAGES)), (name, val[name])
    # the recipe's loss scaling was on (a dynamic scale may have halved on an fp16 overflow)
    scales, kind, start = [v for _, v in history["loss_scale"]], cfg.engine.loss_scale, cfg.engine.loss_scale_value
    if kind == "none":
        assert scales == []
    else:
        assert len(scales) == STEPS, (kind, scales)
        assert all(0 < s <= start if kind == "dynamic" else s == start for s in scales), (kind, start, scales)
    # the run's params carry the seed's values wherever the digits run does not set its own
    params = run.data.params
    assert params["choice.experiment"] == experiment
    for key, source in SEED_KEYS[experiment].items():
        if key not in NOT_THE_SEEDS and not key.endswith("._target_"):  # class paths: the config, checked above
            expected, cited = seed_value(experiment, key, source)
            assert same(literal(params[key]), expected), (
                f"{experiment}: the run's param {key} is {params[key]!r}, the seed's {cited} makes it {expected!r}"
            )


@pytest.mark.parametrize("experiment", sorted(SEED_KEYS))
def test_recipe_lr_holds_on_eight_devices_and_scales_elsewhere(tmp_path, experiment):
    """The seeds trained on 8 devices: the recipe's lr is used as is there, and scaled linearly on others."""
    cfg = compose_config([f"experiment={experiment}", "dataset.path=/data/imagenet", "hardware=ascend8"], tmp_path)
    scaling, devices = instantiate(cfg.lr_scaling), instantiate(cfg.hardware).world_size
    assert devices == 8 and scaling.factor(cfg.dataset.batch_size * devices) == 1.0
    assert scaling.factor(cfg.dataset.batch_size) == pytest.approx(1 / 8)
