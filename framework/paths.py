"""Project paths for ``paths/`` configs: ``${project_root:}`` resolves to the checkout holding ``run.py``.

Outputs (run dirs, the local MLflow store) live under the project, whatever the working directory.
``${rank_dir:}`` names a data-parallel process's own directory under its job's ``ranks/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def rank_dir_name() -> str:
    """``rank_<RANK_ID>`` in an msrun worker, ``scheduler`` in msrun's rendezvous process, else ``main``."""
    role = os.environ.get("MS_ROLE")
    if role == "MS_SCHED":
        return "scheduler"
    return f"rank_{os.environ.get('RANK_ID', '0')}" if role == "MS_WORKER" else "main"


def project_root() -> str:
    return str(PROJECT_ROOT)


def unwritable(folder: Path) -> Path | None:
    """The folder that stops ``folder`` from being created or written (the nearest existing one), or None."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return None if existing.is_dir() and os.access(existing, os.W_OK) else existing


class WritableOutputs(Callback):
    """Before Hydra creates a job's folder: an outputs folder that cannot be written stops the command with one
    line and exit status 2, instead of Hydra's error when it tries (``conf/hydra/default.yaml``)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(Path(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(Path(config.hydra.sweep.dir))

    @staticmethod
    def _check(folder: Path) -> None:
        blocked = unwritable(folder.absolute())
        if blocked is not None:
            print(
                f"config error: the job's folder {folder} cannot be made: {blocked} is read-only for this user. "
                "Fix: paths.output_dir=<a writable folder> (or hydra.run.dir=... for this job)",
                file=sys.stderr,
            )
            sys.exit(2)
