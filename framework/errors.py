"""Errors a user can fix: each carries its kind, printed before its one-line message, and its exit status.

The dispatcher (``framework.tasks.run``) catches ``UserError`` alone; every layer raises its own subclass
(``ConfigError`` in config, ``BadImageError`` in data, ``TrainingDiverged`` in engine, ...).
"""

from __future__ import annotations

import re


class UserError(Exception):
    """A failure the message explains, with the fix; ``kind`` heads the line, ``exit_status`` ends the process."""

    kind = "error"
    exit_status = 1


def user_error(err: BaseException) -> tuple[str, str, int] | None:
    """(kind, message, exit status) of a ``UserError``, also of one that MindSpore's data workers re-raised as a
    long ``RuntimeError`` report naming its class; None for anything else."""
    if isinstance(err, UserError):
        return err.kind, str(err), err.exit_status
    for cls in _subclasses(UserError):
        # the report quotes the worker's traceback; its last line names the class and holds the message
        found = [m for m in re.findall(rf"\.{cls.__name__}: (.+)", str(err)) if not m.startswith("Traceback")]
        if found:
            return cls.kind, found[-1], cls.exit_status
    return None


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]
