"""Project paths for ``paths/`` configs: ``${project_root:}`` resolves to the checkout holding ``run.py``.

Outputs (run dirs, the local MLflow store) live under the project, whatever the working directory.
``${rank_dir:}`` names a data-parallel process's own directory under its job's ``ranks/``.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def rank_dir_name() -> str:
    """``rank_<RANK_ID>`` in an msrun worker, ``scheduler`` in msrun's rendezvous process, else ``main``."""
    role = os.environ.get("MS_ROLE")
    if role == "MS_SCHED":
        return "scheduler"
    return f"rank_{os.environ.get('RANK_ID', '0')}" if role == "MS_WORKER" else "main"


if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
    OmegaConf.register_new_resolver("rank_dir", rank_dir_name)
