"""Schedules, checkpoints and run status on real MindSpore and MLflow objects."""

from __future__ import annotations

import math
import os
import signal
import time

import mindspore as ms
import mindspore.nn as nn
import numpy as np
import pytest
from mlflow.entities import RunStatus
from omegaconf import OmegaConf

from framework.engine import load_checkpoint, save_checkpoint
from framework.engine.checkpoint import MICRO_STEP, latest_training_state, read_checkpoint
from framework.engine.losses import HeadsLoss
from framework.optim.schedules import cosine, multistep
from framework.runtime.signals import (
    Interrupted,
    deferred_stop,
    exit_status,
    interrupts_unwrapped,
    raise_interrupt,
    raise_unheeded_stop,
    stop_requested,
)
from framework.tracking import MlflowTracker
from framework.tracking.spool import Spool
from tests.conftest import all_runs, mlflow_client


def test_cosine_closed_form():
    lr = cosine(lr=0.4, epochs=10, steps_per_epoch=10, min_lr=0.01, warmup_epochs=2, warmup_lr=0.0)
    assert lr[0] == 0.0 and lr[10] == pytest.approx(0.2)  # linear warmup over 20 steps
    assert lr[20] == pytest.approx(0.4)  # peak right after warmup
    for step in (35, 60, 99):
        expected = 0.01 + 0.5 * (0.4 - 0.01) * (1 + math.cos(math.pi * (step - 20) / 80))
        assert lr[step] == pytest.approx(expected, rel=1e-6)


def test_multistep_closed_form():
    lr = multistep(lr=0.1, epochs=6, steps_per_epoch=3, milestones=[2, 4], gamma=0.5)
    assert np.asarray(lr).tolist() == pytest.approx([0.1] * 6 + [0.05] * 6 + [0.025] * 6)


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    source = nn.Dense(4, 3)
    path = save_checkpoint(source, tmp_path / "a.ckpt", {"model": "dense4x3", "epoch": 7})
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]  # no temporary file left behind
    target = nn.Dense(4, 3)
    assert load_checkpoint(path, target) == {"model": "dense4x3", "epoch": 7}
    np.testing.assert_array_equal(target.weight.asnumpy(), source.weight.asnumpy())
    mismatch = r"does not fit the configured model: bias: .*weight: checkpoint \(3, 4\) vs model \(5, 4\)"
    with pytest.raises(ValueError, match=mismatch):
        load_checkpoint(path, nn.Dense(4, 5))


def test_checkpoints_and_spools_written_before_the_micro_step_name_still_load(tmp_path):
    """Earlier files call the micro-step "global_step" (checkpoints) and "at" (spool records)."""
    rng_state = ms.get_rng_state().asnumpy().tolist()
    save_checkpoint(nn.Dense(4, 3), tmp_path / "last.ckpt", {"global_step": 6, "rng_state": rng_state})
    save_checkpoint(nn.Dense(4, 3), tmp_path / "step_00000004.ckpt", {MICRO_STEP: 4, "rng_state": rng_state})
    path, (_, meta), problems = latest_training_state(tmp_path)
    assert path == tmp_path / "last.ckpt" and meta[MICRO_STEP] == 6 and "global_step" not in meta and not problems
    spool = Spool()  # in memory: the same records
    for micro_step in (3, 5):
        spool.append({"kind": "metrics", "at": micro_step, "items": [["train_loss", 1.0, 0, micro_step]]})
    spool.append({"kind": "metrics", "micro_step": 7, "items": [["train_loss", 1.0, 0, 7]]})
    assert spool.discard_metrics_after(4) == 2 and [r["items"][0][3] for r in spool.pending()] == [3]


def test_truncated_checkpoint_is_reported(tmp_path):
    path = save_checkpoint(nn.Dense(64, 64), tmp_path / "b.ckpt", {})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(path, nn.Dense(64, 64))


def test_checkpoint_with_damaged_weights_is_reported(tmp_path):
    """Bytes flipped inside a tensor still parse; the checksum written with the weights catches them."""
    network = nn.Dense(64, 64)
    path = save_checkpoint(network, tmp_path / "c.ckpt", {"epoch": 3})
    data = bytearray(path.read_bytes())
    offset = bytes(data).find(network.weight.asnumpy().tobytes()[:16])
    assert offset > 0
    data[offset + 5] ^= 0x40
    path.write_bytes(bytes(data))
    assert read_checkpoint(path, meta_only=True)[1] == {"epoch": 3}  # the metadata alone is still readable
    with pytest.raises(ValueError, match=r"c\.ckpt is corrupt: its weights do not match the SHA-256"):
        load_checkpoint(path, nn.Dense(64, 64))


def error_hiding_an_interrupt() -> Exception:
    """What a library's clean-up makes of an interrupt: its own error, the interrupt in its context."""
    try:
        try:
            raise Interrupted("stopped by Ctrl-C (SIGINT)")
        finally:
            raise ValueError("'NoneType' object has no attribute '_invalidate_flags_cache'")
    except ValueError as err:
        return err


@pytest.mark.parametrize(
    ("error", "status"),
    [(RuntimeError(), "FAILED"), (KeyboardInterrupt(), "KILLED"), (error_hiding_an_interrupt(), "KILLED")],
)
def test_run_status_on_exception_and_interrupt(tmp_path, error, status):
    tracker = MlflowTracker(experiment_name="status", local_store=str(tmp_path / "mlflow"))
    with pytest.raises(type(error)), tracker.start_run({"task": "train"}) as run:
        run.log_metrics({"train_loss": 1.0}, step=1)
        raise error
    (record,) = all_runs(mlflow_client(tmp_path))
    assert record.info.status == status
    assert record.data.metrics["train_loss"] == 1.0  # buffered metrics are flushed before the run ends
    assert RunStatus.from_string(record.info.status) != RunStatus.RUNNING


class TwoHeads(nn.Cell):
    """Two linear heads; like NASNet/Conformer it returns both while training, one at eval."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Dense(4, 3)
        self.aux = nn.Dense(4, 3)
        self.head_loss_weights = (1.0, 0.4)

    def construct(self, x):
        if self.training:
            return self.main(x), self.aux(x)
        return self.main(x)


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
def test_heads_loss_weights_each_head(mode):
    ms.set_context(mode=mode)
    network, ce = TwoHeads(), nn.CrossEntropyLoss()
    network.set_train(True)
    x = ms.Tensor(np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32))
    y = ms.Tensor(np.array([0, 1, 2, 0, 1], np.int32))
    expected = float(ce(network.main(x), y).asnumpy()) + 0.4 * float(ce(network.aux(x), y).asnumpy())
    assert float(HeadsLoss(network, ce)(x, y).asnumpy()) == pytest.approx(expected, rel=1e-6)
    single = nn.Dense(4, 3)
    assert float(HeadsLoss(single, ce)(x, y).asnumpy()) == pytest.approx(float(ce(single(x), y).asnumpy()))


def test_a_ctrl_c_inside_library_code_stays_an_interrupt():
    """OmegaConf turns an interrupt raised mid-merge into its ConfigKeyError about half the time (a Ctrl-C as a
    sweep trial built its optimizer failed the trial, and the sweep went on). Within ``interrupts_unwrapped``
    each of 30 stop signals landing at random points of such merges comes out as the interrupt.

    The signal is a kernel timer's SIGALRM given the stop handler (a thread's SIGINT waits for the GIL, and
    under load came after the merges). CPython drops one landing in a garbage collector's callback (e.g.
    SQLAlchemy's after the MLflow tests): such a merge loop runs on to its 2 s limit and is left out."""
    config = OmegaConf.create({"lr": 0.1})
    depth = {f"stages.{i}.conv.weight": (i, 300) for i in range(300)}  # like an optimizer's parameter depths
    previous = signal.signal(signal.SIGALRM, raise_interrupt)
    outcomes = []
    try:
        for delay in np.random.default_rng(0).uniform(0.001, 0.02, 30):
            try:
                with interrupts_unwrapped():
                    signal.setitimer(signal.ITIMER_REAL, delay)
                    limit = time.monotonic() + 2
                    while time.monotonic() < limit:
                        OmegaConf.merge(config, {"depth": depth})
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except BaseException as err:  # noqa: BLE001 - the outcome is what the test looks at
                outcomes.append(type(err).__name__)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert len(outcomes) >= 20 and set(outcomes) == {"Interrupted"}, outcomes


def test_a_stop_signal_as_deferred_work_ends_still_stops_the_job():
    """Ctrl-C during the last step of a sweep trial is not lost: the trial completes, then the job stops (the
    sweep does not start its next trial), saying the work had finished."""
    with deferred_stop():
        os.kill(os.getpid(), signal.SIGINT)  # recorded, as the loop would stop after its step
        assert stop_requested() == signal.SIGINT
    with pytest.raises(Interrupted, match="came as training ended") as stopped:
        raise_unheeded_stop()
    assert stopped.value.finished and exit_status(stopped.value) == 130
    raise_unheeded_stop()  # said once
    with deferred_stop():
        pass
    raise_unheeded_stop()  # no signal, nothing to say
