"""Stop signals: Ctrl-C and SIGTERM both end a job through ``KeyboardInterrupt``.

MindSpore's runtime replaces the SIGINT handler when it runs a graph; its handler answers Ctrl-C by
sending the process SIGTERM, which would otherwise kill it on the spot (no cleanup, MLflow run left
RUNNING). Turning SIGTERM into ``KeyboardInterrupt`` gives both signals the same orderly path.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


def raise_interrupt(signum: int, frame: object) -> None:
    """Signal handler: end the job through ``KeyboardInterrupt``."""
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM (and so Ctrl-C under MindSpore) raises ``KeyboardInterrupt``."""
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
