"""Stop signals: Ctrl-C (SIGINT) and SIGTERM both end a job through ``Interrupted``, which names the signal.

MindSpore's runtime replaces the SIGINT handler while it runs a graph; its handler answers Ctrl-C by sending
the process SIGTERM, which would otherwise kill it on the spot (no cleanup, MLflow run left RUNNING), and
which looks like a SIGTERM from outside. So within ``stop_signals_interrupt`` SIGTERM raises too, and a small
sentinel process in the same process group hears the Ctrl-C the terminal sends to the whole group: a SIGTERM
that arrives with it is reported as what the user did, SIGINT (exit status 130; a real SIGTERM: 143).

Inside ``deferred_stop`` (the single-process training loop) the first signal is only recorded: the loop
finishes its step, saves its state and then stops (``stop_requested``). A second signal stops at once.
"""

from __future__ import annotations

import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# The sentinel writes one byte per SIGINT its process group receives, until this process closes its stdin.
_SENTINEL = (
    "import os, signal, sys\n"
    "signal.signal(signal.SIGINT, lambda signum, frame: os.write(1, b'I'))\n"
    "sys.stdin.buffer.read()\n"
)
_NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}
STOP_SIGNALS = tuple(_NAMES)


class Interrupted(KeyboardInterrupt):
    """The job was stopped by a signal; ``exit_status`` is the shell's convention (128 + signal number).
    ``finished``: the signal came as the work ended, which was done (its MLflow run FINISHED)."""

    def __init__(self, message: str, signum: int = signal.SIGINT, finished: bool = False) -> None:
        super().__init__(message)
        self.signum, self.finished = signum, finished


def interrupt_behind(err: BaseException) -> KeyboardInterrupt | None:
    """The interrupt an error stands for, if any: a stop signal raises ``Interrupted`` wherever Python happens to
    be, and a library cleaning up on the way out can replace it with its own error (OmegaConf turns one raised
    mid-merge into ``ConfigKeyError``: a Ctrl-C while a trial built its optimizer failed the trial, and the sweep
    went on). The interrupt stays in the error's chain of causes."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


@contextmanager
def interrupts_unwrapped() -> Iterator[None]:
    """Within the block an error hiding an interrupt (``interrupt_behind``) is raised as that interrupt."""
    try:
        yield
    except Exception as err:
        interrupt = interrupt_behind(err)
        if interrupt is None:
            raise
        raise interrupt from None


def exit_status(err: KeyboardInterrupt) -> int:
    """130 after SIGINT (and Python's own Ctrl-C), 143 after SIGTERM."""
    return 128 + int(getattr(err, "signum", signal.SIGINT))


class _StopState:
    deferring = False
    requested: int | None = None  # the signal that asked to stop
    unheeded: int | None = None  # a signal that came as the deferring block ended: no step was left to stop after
    sentinel: subprocess.Popen | None = None


_state = _StopState()


def signal_name(signum: int) -> str:
    return _NAMES.get(signal.Signals(signum), signal.Signals(signum).name)


def _received(signum: int) -> int:
    """The signal the user sent: a SIGTERM that came with a Ctrl-C to the process group was MindSpore's."""
    sentinel = _state.sentinel
    if sentinel is None or sentinel.stdout is None:
        return signum
    # the Ctrl-C reached both processes at once; a SIGINT seen here directly is read off too, so that it
    # is not taken for the cause of a later SIGTERM
    ready, _, _ = select.select([sentinel.stdout], [], [], 0.2 if signum == signal.SIGTERM else 0.05)
    if ready and sentinel.stdout.read1(64):
        return signal.SIGINT
    return signum


def raise_interrupt(signum: int, frame: object) -> None:
    """Signal handler: end the job through ``Interrupted`` (or, while deferring, ask the loop to stop)."""
    signum = _received(signum)
    if _state.deferring and _state.requested is None:
        _state.requested = signum
        print(
            f"{signal_name(signum)}: stopping after this step with a checkpoint (send it again to stop at once)",
            file=sys.stderr,
        )
        return
    raise Interrupted(f"stopped by {signal_name(signum)}", signum)


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM (and so Ctrl-C under MindSpore) raises ``Interrupted``."""
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    started = _state.sentinel is None
    if started:
        _state.sentinel = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _SENTINEL], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if started and _state.sentinel is not None:
            sentinel, _state.sentinel = _state.sentinel, None
            sentinel.stdin.close()  # it reads to the end of its input, then exits
            sentinel.wait(timeout=10)
            sentinel.stdout.close()


@contextmanager
def deferred_stop() -> Iterator[None]:
    """Within the block a first SIGTERM/SIGINT sets ``stop_requested()`` instead of interrupting."""
    previous = signal.signal(signal.SIGTERM, raise_interrupt), signal.signal(signal.SIGINT, raise_interrupt)
    _state.deferring, _state.requested, _state.unheeded = True, None, None
    try:
        yield
        _state.unheeded = _state.requested
    finally:
        _state.deferring, _state.requested = False, None
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def raise_unheeded_stop() -> None:
    """After a ``deferred_stop`` block that ended its work: a stop signal it received on the way still stops the
    job (a sweep must not start its next trial after a Ctrl-C), as ``Interrupted`` with ``finished``."""
    signum, _state.unheeded = _state.unheeded, None
    if signum is not None:
        raise Interrupted(f"{signal_name(signum)} came as training ended, which it did", signum, finished=True)


def stop_requested() -> int | None:
    """The signal (``signal.SIGTERM``, ...) that asked the deferring loop to stop, or None."""
    return _state.requested


@contextmanager
def held_signals() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM wait: a short step that must not be cut in half (asking a study for a
    trial and recording who asked) finishes, then the signal reaches the handlers there were before."""
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda s, f: received.append(s)) for signum in _NAMES}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])
