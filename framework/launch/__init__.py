"""Hardware context and process launch (``hardware/`` configs): devices, msrun data parallel, ranks."""

from framework.launch.distributed import World
from framework.launch.hardware import Hardware

__all__ = ["Hardware", "World"]
