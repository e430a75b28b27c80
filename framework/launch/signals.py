"""Stop signals: Ctrl-C and SIGTERM both end a job through ``KeyboardInterrupt``.

MindSpore's runtime replaces the SIGINT handler when it runs a graph; its handler answers Ctrl-C by
sending the process SIGTERM, which would otherwise kill it on the spot (no cleanup, MLflow run left
RUNNING). Turning SIGTERM into ``KeyboardInterrupt`` gives both signals the same orderly path.

Inside ``deferred_stop`` (the single-process training loop) the first signal is only recorded: the loop
finishes its step, saves its state and then stops (``stop_requested``). A second signal stops at once.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class _StopState:
    deferring = False
    requested: str | None = None  # name of the signal that asked to stop


_state = _StopState()


def raise_interrupt(signum: int, frame: object) -> None:
    """Signal handler: end the job through ``KeyboardInterrupt`` (or, while deferring, ask the loop to stop)."""
    name = signal.Signals(signum).name
    if _state.deferring and _state.requested is None:
        _state.requested = name
        print(f"{name}: stopping after this step with a checkpoint (send it again to stop at once)", file=sys.stderr)
        return
    raise KeyboardInterrupt(f"stopped by {name}")


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM (and so Ctrl-C under MindSpore) raises ``KeyboardInterrupt``."""
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def deferred_stop() -> Iterator[None]:
    """Within the block a first SIGTERM/SIGINT sets ``stop_requested()`` instead of interrupting."""
    previous = signal.signal(signal.SIGTERM, raise_interrupt), signal.signal(signal.SIGINT, raise_interrupt)
    _state.deferring, _state.requested = True, None
    try:
        yield
    finally:
        _state.deferring, _state.requested = False, None
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def stop_requested() -> str | None:
    """The signal (``'SIGTERM'``) that asked the deferring loop to stop, or None."""
    return _state.requested
