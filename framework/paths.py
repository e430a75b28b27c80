"""Project paths for ``paths/`` configs: ``${project_root:}`` resolves to the checkout holding ``run.py``.

Outputs (run dirs, the local MLflow store) live under the project, whatever the working directory.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]

if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
