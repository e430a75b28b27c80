"""Hardware context (``hardware/`` configs): device target, execution mode and seeding."""

from __future__ import annotations

import random
from dataclasses import dataclass

import mindspore as ms
import mindspore.dataset as ds
import numpy as np

_MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}
_TARGETS = ("CPU", "GPU", "Ascend")


@dataclass
class Hardware:
    """Where and how MindSpore runs: ``device_target`` CPU/GPU/Ascend, ``mode`` graph/pynative."""

    device_target: str = "CPU"
    mode: str = "graph"
    device_id: int = 0

    def __post_init__(self) -> None:
        if self.device_target not in _TARGETS:
            raise ValueError(f"hardware.device_target must be one of {_TARGETS}, got '{self.device_target}'")
        if self.mode not in _MODES:
            raise ValueError(f"hardware.mode must be one of {sorted(_MODES)}, got '{self.mode}'")

    def setup(self, seed: int) -> None:
        """Select the device and execution mode, and seed MindSpore, its data pipeline, NumPy and Python."""
        try:
            ms.set_device(self.device_target, self.device_id)
        except (RuntimeError, ValueError) as err:
            # Once kernels ran in this process the device is fixed; the same target is fine.
            if "runtime has been initialized" in str(err) and ms.get_context("device_target") == self.device_target:
                pass
            else:
                raise RuntimeError(
                    f"MindSpore cannot use device_target={self.device_target} here: {str(err).splitlines()[0]} "
                    "Pick a hardware config this machine has, e.g. hardware=cpu."
                ) from err
        ms.set_context(mode=_MODES[self.mode])
        ms.set_seed(seed)
        ds.config.set_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
