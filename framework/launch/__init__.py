"""Hardware context and process launch (``hardware/`` configs)."""

from framework.launch.hardware import Hardware

__all__ = ["Hardware"]
