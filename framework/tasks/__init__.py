"""Tasks (``task/`` configs): each is a function of the composed config, named by ``task._target_``."""

from __future__ import annotations

import sys
from typing import Any

from hydra.utils import get_method
from omegaconf import DictConfig

from framework.config import ConfigError


def run(cfg: DictConfig) -> Any:
    """Run the task the config selects (``task=train`` by default); a bad run spec exits with status 2."""
    try:
        return get_method(cfg.task._target_)(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
