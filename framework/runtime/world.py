"""This process's place in a data-parallel job (``World``), and the collectives training and evaluation need.

Neutral ground: the engine, launch and tasks all use it; how a job joins its process group is
``framework.launch.distributed.init_world``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
import numpy as np


def is_msrun_process() -> bool:
    """True in a process msrun started (a worker or the scheduler)."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


@dataclass(frozen=True)
class World:
    """This process's place in the job: global ``rank`` of ``size`` processes; rank 0 is the main one."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """The process that logs to MLflow and writes checkpoints."""
        return self.rank == 0

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum of ``values`` over all ranks (float32; exact for counts below 2**24)."""
        if self.size == 1:
            return np.asarray(values, np.float32)
        return _all_reduce_sum()(ms.Tensor(np.asarray(values, np.float32))).asnumpy()

    def average(self, parameters: Sequence[ms.Parameter]) -> None:
        """Replace each parameter, in place, by its mean over all ranks (one all-reduce for all of them)."""
        if self.size == 1 or not parameters:
            return
        values = [p.asnumpy() for p in parameters]
        mean = self.all_reduce_sum(np.concatenate([v.astype(np.float32).ravel() for v in values])) / self.size
        offset = 0
        for param, value in zip(parameters, values, strict=True):
            part = mean[offset : offset + value.size].reshape(value.shape).astype(value.dtype)
            ops.assign(param, ms.Tensor(part))  # in place: set_data would detach it from compiled graphs
            offset += value.size

    def grad_reducer(self, parameters: tuple[ms.Parameter, ...]) -> nn.Cell | None:
        """Averages gradients over all ranks (data parallel), or None in a single process."""
        if self.size == 1:
            return None
        from mindspore.communication import GlobalComm

        return nn.DistributedGradReducer(parameters, mean=True, degree=self.size, group=GlobalComm.WORLD_COMM_GROUP)


SINGLE_PROCESS = World()


class _AllReduceSum(nn.Cell):
    def __init__(self) -> None:
        super().__init__()
        self.all_reduce = ops.AllReduce(ops.ReduceOp.SUM)

    def construct(self, values: ms.Tensor) -> ms.Tensor:
        return self.all_reduce(values)


@cache
def _all_reduce_sum() -> _AllReduceSum:
    return _AllReduceSum()
