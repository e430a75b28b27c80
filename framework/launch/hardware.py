"""Hardware (``hardware/`` configs): device target, execution mode, device count and nodes, seeding."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import mindspore as ms
import mindspore.dataset as ds
import numpy as np

from framework.config import ConfigError
from framework.launch.distributed import init_world
from framework.paths import unwritable
from framework.runtime.world import World, is_msrun_process
from framework.schema import NonNegative, Positive, Range

_MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}
# MindSpore's own switch for its compile cache: unsafe for run.py (framework/launch/compile_cache.py says why);
# hardware.compile_cache is the safe way to the same cache.
COMPILE_CACHE_UNSAFE = (
    "MS_COMPILER_CACHE_ENABLE=1 (environment): MindSpore's compile cache checks only the script, so a run of "
    "run.py with another model, size or task can execute graphs compiled for an earlier one (measured: wrong "
    "output shapes, no error). Fix: unset MS_COMPILER_CACHE_ENABLE; hardware.compile_cache (on by default) "
    "caches each program's graphs in a folder of its own"
)


@dataclass
class Hardware:
    """Where and how MindSpore runs.

    ``device_target`` CPU/GPU/Ascend, ``mode`` graph/pynative; ``device_num`` processes (devices) per node
    on ``num_nodes`` nodes. Above one process in all, training is data parallel: ``run.py`` relaunches itself
    through ``msrun`` (node ``node_rank`` of ``num_nodes``, rendezvous at ``master_addr:master_port``;
    ``master_port: null`` picks a free port on a single node). ``compile_cache``: the folder where training
    keeps its compiled graphs, one subfolder per program, so a repeated run skips most of the compile
    (``framework/launch/compile_cache.py``); null compiles every time.
    """

    device_target: Literal["CPU", "GPU", "Ascend"] = "CPU"
    mode: Literal["graph", "pynative"] = "graph"
    device_id: Annotated[int, NonNegative] = 0
    device_num: Annotated[int, Positive] = 1
    num_nodes: Annotated[int, Positive] = 1
    node_rank: Annotated[int, NonNegative] = 0
    master_addr: str = "127.0.0.1"
    master_port: Annotated[int, Range(1024, 65535)] | None = None
    cluster_timeout: Annotated[int, Positive] = 600
    compile_cache: str | None = None

    def __post_init__(self) -> None:
        """What the schema cannot say alone: settings that must agree with each other."""
        if not 0 <= self.node_rank < self.num_nodes:
            raise ValueError(f"hardware.node_rank={self.node_rank} must be in [0, num_nodes={self.num_nodes})")
        if self.num_nodes > 1 and self.master_port is None:
            raise ValueError(
                "hardware.master_port is required with several nodes: every node must name the same port "
                "(e.g. hardware.master_port=8118)"
            )

    def check_available(self) -> None:
        """Refuse, before anything runs, a device target this MindSpore build cannot use (a GPU on a CPU build),
        MindSpore's own compile cache switch, unsafe for run.py (``COMPILE_CACHE_UNSAFE``), and a compile cache
        folder that cannot be written."""
        if os.environ.get("MS_COMPILER_CACHE_ENABLE") == "1":
            raise ConfigError(COMPILE_CACHE_UNSAFE)
        blocked = self.compile_cache and unwritable(Path(self.compile_cache))
        if blocked:
            raise ConfigError(
                f"hardware.compile_cache={self.compile_cache}: {blocked} is not a folder this user can write. "
                "Fix: a writable folder, or hardware.compile_cache=null to compile every time"
            )
        if self.device_target == "CPU":
            return
        if not ms.hal.is_available(self.device_target):
            raise ConfigError(
                f"hardware.device_target={self.device_target}: this MindSpore build ({ms.__version__}) cannot use "
                f"{self.device_target} devices on this machine. Fix: hardware=cpu (or cpu2), or install MindSpore "
                f"for {self.device_target} where the devices are"
            )

    @property
    def world_size(self) -> int:
        """Processes in the whole job: devices per node × nodes."""
        return self.device_num * self.num_nodes

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def setup(self, seed: int) -> World:
        """Select the device and execution mode, join the job's process group when started by msrun, and seed
        MindSpore, its data pipeline, NumPy and Python (the same seed on every rank: identical initial weights)."""
        # msrun gives each local process its own device (DEVICE_ID = local rank)
        device_id = int(os.environ.get("DEVICE_ID", 0)) if is_msrun_process() else self.device_id
        try:
            ms.set_device(self.device_target, device_id)
        except (RuntimeError, ValueError) as err:
            # Once kernels ran in this process the device is fixed; the same target is fine.
            if "runtime has been initialized" in str(err) and ms.get_context("device_target") == self.device_target:
                pass
            else:
                raise ConfigError(
                    f"MindSpore cannot use device_target={self.device_target} here: {str(err).splitlines()[0]} "
                    "Pick a hardware config this machine has, e.g. hardware=cpu."
                ) from err
        ms.set_context(mode=_MODES[self.mode])
        world = init_world() if is_msrun_process() else World()
        ms.set_seed(seed)
        ds.config.set_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        return world
