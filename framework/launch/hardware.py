"""Hardware (``hardware/`` configs): device target, execution mode, device count and nodes, seeding."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import mindspore as ms
import mindspore.dataset as ds
import numpy as np

from framework.config import ConfigError
from framework.launch.distributed import init_world
from framework.runtime.world import World, is_msrun_process

_MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}
_TARGETS = ("CPU", "GPU", "Ascend")


@dataclass
class Hardware:
    """Where and how MindSpore runs.

    ``device_target`` CPU/GPU/Ascend, ``mode`` graph/pynative; ``device_num`` processes (devices) per node
    on ``num_nodes`` nodes. Above one process in all, training is data parallel: ``run.py`` relaunches itself
    through ``msrun`` (node ``node_rank`` of ``num_nodes``, rendezvous at ``master_addr:master_port``;
    ``master_port: null`` picks a free port on a single node).
    """

    device_target: str = "CPU"
    mode: str = "graph"
    device_id: int = 0
    device_num: int = 1
    num_nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    cluster_timeout: int = 600

    def __post_init__(self) -> None:
        if self.device_target not in _TARGETS:
            raise ValueError(f"hardware.device_target must be one of {_TARGETS}, got '{self.device_target}'")
        if self.mode not in _MODES:
            raise ValueError(f"hardware.mode must be one of {sorted(_MODES)}, got '{self.mode}'")
        for key in ("device_num", "num_nodes", "cluster_timeout"):
            if getattr(self, key) < 1:
                raise ValueError(f"hardware.{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.node_rank < self.num_nodes:
            raise ValueError(f"hardware.node_rank={self.node_rank} must be in [0, num_nodes={self.num_nodes})")
        if self.num_nodes > 1 and self.master_port is None:
            raise ValueError(
                "hardware.master_port is required with several nodes: every node must name the same port "
                "(e.g. hardware.master_port=8118)"
            )
        if self.master_port is not None and not 1024 <= self.master_port <= 65535:
            raise ValueError(f"hardware.master_port={self.master_port} must be in 1024..65535")

    def check_available(self) -> None:
        """Refuse, before anything runs, a device target this MindSpore build cannot use (a GPU on a CPU build)."""
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
