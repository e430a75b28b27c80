"""Tasks (``task/`` configs): each is a function of the composed config, named by ``task._target_``."""

from __future__ import annotations

import sys
from typing import Any

from hydra.utils import get_method
from omegaconf import DictConfig

from framework.config import ConfigError
from framework.data.folder import bad_image_message


def run(cfg: DictConfig) -> Any:
    """Run the task the config selects (``task=train`` by default).

    A bad run spec exits with status 2, an unreadable image (``dataset.on_bad_image=error``) with 1,
    an interrupt (Ctrl-C, SIGTERM) with 130, each with one line.
    """
    try:
        return get_method(cfg.task._target_)(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as err:
        message = bad_image_message(err)
        if message is None:
            raise
        print(f"data error: {message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:
        print(f"interrupted ({err or 'Ctrl-C'}); the MLflow run is marked KILLED", file=sys.stderr)
        sys.exit(130)
