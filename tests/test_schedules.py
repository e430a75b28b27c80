"""Recipe lr schedules against closed forms and the model zoo's per-step loops; configs; the lr plot."""

from __future__ import annotations

import inspect
import io
import math
import tracemalloc
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import get_object, instantiate
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from framework.optim.schedules import cosine, cosine_annealing, exponential, linear, multistep, plot_schedule

SCHEDULER_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "conf" / "scheduler").glob("*.yaml"))


def approx(value: float) -> object:
    return pytest.approx(value, rel=1e-6)


# --- cosine_annealing (ResNeXt50) -------------------------------------------------------------


def test_cosine_annealing_closed_form():
    lr, eta_min, t_max = 0.05, 0.01, 8
    sched = cosine_annealing(lr=lr, epochs=10, steps_per_epoch=4, t_max=t_max, eta_min=eta_min, warmup_epochs=1)
    assert sched[0] == approx(lr / 4)  # warmup counts i + 1: the first step is already one increment up
    assert sched[3] == approx(lr)  # the last warmup step reaches the peak
    assert sched[4] == approx(eta_min + (lr - eta_min) * (1 + math.cos(math.pi / t_max)) / 2)  # epoch 1, not 0
    assert sched[16:20].tolist() == [approx((lr + eta_min) / 2)] * 4  # epoch t_max / 2, constant within it
    assert sched[32] == approx(eta_min)  # epoch t_max
    assert sched[39] == sched[28] > eta_min  # past t_max it rises again, mirroring epoch 7


def test_cosine_annealing_without_warmup_starts_at_lr():
    sched = cosine_annealing(lr=0.05, epochs=3, steps_per_epoch=5, t_max=150)
    assert sched[:5].tolist() == [approx(0.05)] * 5


# --- linear (EfficientNet-B2) ----------------------------------------------------------------


def test_linear_closed_form():
    lr_init, lr_max, lr_end = 0.0001, 0.13, 0.00001
    sched = linear(lr_init=lr_init, lr_max=lr_max, lr_end=lr_end, epochs=5, steps_per_epoch=4, warmup_epochs=2)
    warmup, total = 8, 20
    assert sched[0] == approx(lr_init)
    assert sched[4] == approx(lr_init + (lr_max - lr_init) * 4 / warmup)
    assert sched[7] == approx(lr_init + (lr_max - lr_init) * 7 / warmup)
    assert sched[7] < lr_max
    assert sched[warmup] == np.float32(lr_max)  # exactly the peak at the end of warmup
    assert sched[14] == approx(lr_max - (lr_max - lr_end) * 6 / (total - warmup))
    assert sched[-1] == approx(lr_end + (lr_max - lr_end) / (total - warmup))  # the reference stops one step short
    np.testing.assert_allclose(np.diff(sched[warmup:]), -(lr_max - lr_end) / (total - warmup), rtol=1e-4)


def test_linear_without_warmup_starts_at_lr_max():
    sched = linear(lr_init=0.0001, lr_max=0.13, lr_end=0.0, epochs=2, steps_per_epoch=5)
    assert sched[0] == np.float32(0.13) and sched[-1] == approx(0.013)


# --- exponential (NASNet-A-Mobile) -----------------------------------------------------------


def test_exponential_staircase_floors_fractional_decay_steps():
    # 2.4 epochs x 3 steps = 7.2 steps per decay: periods start at ceil(k * 7.2) = 8, 15, 22, 29
    sched = exponential(lr=0.04, epochs=10, steps_per_epoch=3, decay_rate=0.97, decay_epochs=2.4)
    boundaries = [0, 8, 15, 22, 29, 30]
    for k, (start, stop) in enumerate(pairwise(boundaries)):
        assert sched[start:stop].tolist() == [approx(0.04 * 0.97**k)] * (stop - start)
    for start in boundaries[1:-1]:
        assert sched[start] / sched[start - 1] == approx(0.97)


def test_exponential_smooth_decays_by_a_constant_factor_per_step():
    sched = exponential(lr=0.04, epochs=10, steps_per_epoch=3, decay_rate=0.97, decay_epochs=2.4, staircase=False)
    assert sched[0] == approx(0.04)
    assert sched[18] == approx(0.04 * 0.97**2.5)  # halfway through the third period
    np.testing.assert_allclose(sched[1:] / sched[:-1], 0.97 ** (1 / 7.2), rtol=1e-6)


def test_exponential_min_lr_and_warmup():
    sched = exponential(
        lr=0.04, epochs=6, steps_per_epoch=3, decay_rate=0.5, decay_epochs=1, min_lr=0.01, warmup_epochs=1
    )
    assert sched[:3].tolist() == [0.0, approx(0.04 / 3), approx(0.08 / 3)]  # ramp from warmup_lr = 0
    assert sched[3:6].tolist() == [approx(0.02)] * 3  # the decay counts from step 0, warmup overwrote epoch 0
    assert sched[6:].tolist() == [approx(0.01)] * 12  # 0.04 * 0.5**2 = min_lr, then held there


# --- the model zoo's loops, transcribed per step ---------------------------------------------


def zoo_cosine_annealing(lr, steps_per_epoch, warmup_epochs, max_epoch, t_max, eta_min):
    warmup = int(warmup_epochs * steps_per_epoch)
    return [
        lr * (i + 1) / warmup
        if i < warmup
        else eta_min + (lr - eta_min) * (1 + math.cos(math.pi * (i // steps_per_epoch) / t_max)) / 2
        for i in range(max_epoch * steps_per_epoch)
    ]


def zoo_liner(lr_init, lr_end, lr_max, warmup_epochs, total_epochs, steps_per_epoch):
    total, warmup = steps_per_epoch * total_epochs, steps_per_epoch * warmup_epochs
    return [
        lr_init + (lr_max - lr_init) * i / warmup
        if i < warmup
        else lr_max - (lr_max - lr_end) * (i - warmup) / (total - warmup)
        for i in range(total)
    ]


def zoo_exponential(lr_init, lr_decay_rate, num_epoch_per_decay, total_epochs, steps_per_epoch):
    decay_steps = steps_per_epoch * num_epoch_per_decay
    return [lr_init * lr_decay_rate ** math.floor(i / decay_steps) for i in range(steps_per_epoch * total_epochs)]


def test_schedules_match_the_model_zoo_loops():
    np.testing.assert_allclose(
        cosine_annealing(lr=0.05, epochs=12, steps_per_epoch=7, t_max=10, warmup_epochs=1),
        zoo_cosine_annealing(0.05, 7, 1, 12, 10, 0.0),
        rtol=1e-6,
        atol=1e-9,
    )
    np.testing.assert_allclose(
        linear(lr_init=0.0001, lr_max=0.13, lr_end=0.00001, epochs=9, steps_per_epoch=7, warmup_epochs=2),
        zoo_liner(0.0001, 0.00001, 0.13, 2, 9, 7),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        exponential(lr=0.04, epochs=20, steps_per_epoch=7, decay_rate=0.97, decay_epochs=2.4),
        zoo_exponential(0.04, 0.97, 2.4, 20, 7),
        rtol=1e-6,
    )


# --- shape, dtype, validation ----------------------------------------------------------------

RECIPES = {
    "cosine_annealing": (cosine_annealing, {"lr": 0.05, "t_max": 150, "warmup_epochs": 1}),
    "linear": (linear, {"lr_init": 0.0001, "lr_max": 0.13, "lr_end": 0.00001, "warmup_epochs": 2}),
    "exponential": (exponential, {"lr": 0.04, "decay_rate": 0.97, "decay_epochs": 2.4}),
}


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize(("epochs", "steps_per_epoch"), [(1, 1), (3, 5), (4, 7)])
def test_one_float32_per_step(name, epochs, steps_per_epoch):
    fn, kwargs = RECIPES[name]
    schedule = fn(epochs=epochs, steps_per_epoch=steps_per_epoch, **kwargs)
    sched = np.asarray(schedule)
    assert len(schedule) == epochs * steps_per_epoch
    assert sched.shape == (epochs * steps_per_epoch,) and sched.dtype == np.float32
    assert np.isfinite(sched).all() and (sched >= 0).all()


@pytest.mark.parametrize(
    ("name", "override", "key"),
    [
        ("cosine_annealing", {"epochs": 0}, "epochs"),
        ("cosine_annealing", {"steps_per_epoch": -1}, "steps_per_epoch"),
        ("cosine_annealing", {"lr": 0.0}, "lr"),
        ("cosine_annealing", {"t_max": 0}, "t_max"),
        ("cosine_annealing", {"eta_min": -0.01}, "eta_min"),
        ("cosine_annealing", {"eta_min": 0.1}, "eta_min"),
        ("cosine_annealing", {"warmup_epochs": -1}, "warmup_epochs"),
        ("cosine_annealing", {"warmup_lr": -0.1}, "warmup_lr"),
        ("linear", {"epochs": -2}, "epochs"),
        ("linear", {"lr_max": 0.0, "lr_init": 0.0, "lr_end": 0.0}, "lr_max"),
        ("linear", {"lr_init": -0.001}, "lr_init"),
        ("linear", {"lr_init": 0.2}, "lr_init"),
        ("linear", {"lr_end": -0.001}, "lr_end"),
        ("linear", {"lr_end": 0.2}, "lr_end"),
        ("linear", {"warmup_epochs": -0.5}, "warmup_epochs"),
        ("exponential", {"steps_per_epoch": 0}, "steps_per_epoch"),
        ("exponential", {"lr": -0.04}, "lr"),
        ("exponential", {"decay_rate": 0.0}, "decay_rate"),
        ("exponential", {"decay_rate": 1.5}, "decay_rate"),
        ("exponential", {"decay_epochs": 0}, "decay_epochs"),
        ("exponential", {"min_lr": -1e-5}, "min_lr"),
        ("exponential", {"min_lr": 0.05}, "min_lr"),
        ("exponential", {"warmup_lr": -0.1}, "warmup_lr"),
    ],
)
def test_bad_values_name_the_key(name, override, key):
    fn, kwargs = RECIPES[name]
    with pytest.raises(ValueError, match=rf"^scheduler\.{key} must be "):
        fn(**{"epochs": 3, "steps_per_epoch": 5, **kwargs, **override})


# --- configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SCHEDULER_CONFIGS, ids=lambda p: p.stem)
def test_scheduler_config_instantiates(path):
    cfg = OmegaConf.load(path)
    params = set(inspect.signature(get_object(cfg._target_)).parameters) - {"epochs", "steps_per_epoch"}
    assert set(cfg) - {"_target_"} <= params  # the config checker rejects any other key
    sched = np.asarray(instantiate(cfg, epochs=3, steps_per_epoch=5))
    assert sched.shape == (15,) and sched.dtype == np.float32 and (sched >= 0).all()


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_configs_exist_and_target_their_function(name):
    cfg = OmegaConf.load(SCHEDULER_CONFIGS[0].parent / f"{name}.yaml")
    assert cfg._target_ == f"framework.optim.schedules.{name}"


# --- plot ------------------------------------------------------------------------------------


def test_plot_schedule_draws_the_schedule_against_epochs():
    sched = cosine_annealing(lr=0.05, epochs=4, steps_per_epoch=5, t_max=8, eta_min=0.01, warmup_epochs=1)
    fig = plot_schedule(sched, steps_per_epoch=5, title="cosine_annealing")
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    (ax,) = fig.axes
    (line,) = ax.get_lines()
    np.testing.assert_array_equal(line.get_ydata(), sched)
    np.testing.assert_allclose(line.get_xdata(), np.arange(20) / 5)
    assert ax.get_yscale() == "linear"  # 0.01 .. 0.05 spans less than two decades
    assert ax.get_title() == "cosine_annealing" and ax.get_xlabel() == "epoch" and ax.get_ylabel()
    fig.savefig(io.BytesIO(), format="png")  # renders without pyplot


def test_plot_schedule_uses_log_scale_over_two_decades():
    sched = exponential(lr=0.1, epochs=10, steps_per_epoch=2, decay_rate=0.5, decay_epochs=1)
    assert np.max(sched) / np.min(sched) > 100
    assert plot_schedule(sched, steps_per_epoch=2, title="exponential").axes[0].get_yscale() == "log"


@pytest.mark.parametrize(("rule", "expected"), [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_lr_scaling_rules(make_config, rule, expected):
    scaling = instantiate(make_config(f"lr_scaling={rule}", "lr_scaling.reference_batch_size=64").lr_scaling)
    assert scaling.factor(256) == pytest.approx(expected)


def test_lr_scaling_refuses_unknown_rule_and_bad_reference():
    from framework.optim.schedules import LrScaling

    with pytest.raises(ValueError, match="lr_scaling.rule must be one of 'none', 'linear', 'sqrt', got 'cubic'"):
        LrScaling("cubic")
    with pytest.raises(ValueError, match="reference_batch_size must be > 0"):
        LrScaling("linear", 0)


# --- computed per update, never stored ------------------------------------------------------

EVERY_SCHEDULE = [
    (cosine, {"lr": 0.05, "min_lr": 1e-5, "warmup_epochs": 1.3, "warmup_lr": 1e-6}),
    (multistep, {"lr": 0.05, "milestones": [2, 5, 7], "gamma": 0.1, "warmup_epochs": 1}),
    (cosine_annealing, {"lr": 0.05, "t_max": 8, "eta_min": 0.001, "warmup_epochs": 1}),
    (linear, {"lr_init": 1e-4, "lr_max": 0.13, "lr_end": 1e-5, "warmup_epochs": 2}),
    (exponential, {"lr": 0.04, "decay_rate": 0.97, "decay_epochs": 2.4, "warmup_epochs": 0.5}),
]


@pytest.mark.parametrize(("fn", "kwargs"), EVERY_SCHEDULE, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("factor", [1.0, 2.0, 1.4142135623730951, 0.37])
def test_one_update_at_a_time_gives_exactly_the_whole_run(fn, kwargs, factor):
    """The trainer asks for one update's lr at a time; it is bit for bit the value of the whole-run array (as
    precomputed before), lr scaling included."""
    schedule = fn(epochs=9, steps_per_epoch=37, **kwargs).scaled(factor)
    whole = np.asarray(schedule)
    assert whole.dtype == np.float32
    np.testing.assert_array_equal(np.array([schedule[i] for i in range(len(schedule))]), whole)
    np.testing.assert_array_equal(
        whole, (np.asarray(fn(epochs=9, steps_per_epoch=37, **kwargs)) * factor).astype(np.float32)
    )


def test_a_run_of_a_hundred_million_epochs_costs_no_memory():
    tracemalloc.start()
    schedule = cosine(lr=0.05, epochs=10**8, steps_per_epoch=45, warmup_epochs=1)
    last, first_after_warmup = schedule[-1], schedule[45]
    fig = plot_schedule(schedule, steps_per_epoch=45, title="cosine")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (
        len(schedule) == 4_500_000_000
        and last == pytest.approx(0.0, abs=1e-9)
        and first_after_warmup == np.float32(0.05)
    )
    assert len(fig.axes[0].get_lines()[0].get_xdata()) == 4000  # the plot samples the run
    assert peak < 20 * 2**20  # bytes: a precomputed float32 schedule would take 18 GB
