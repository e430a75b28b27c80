"""Hardware context and process launch (``hardware/`` configs): devices, msrun data parallel, ranks."""

from framework.launch.hardware import Hardware

__all__ = ["Hardware"]
