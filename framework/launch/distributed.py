"""Data-parallel processes started by ``msrun``: joining the job's process group.

msrun runs ``run.py`` once per device (``MS_ROLE=MS_WORKER``, ``RANK_ID``, ``DEVICE_ID``) and once more as
the rendezvous scheduler (``MS_ROLE=MS_SCHED``), whose ``init()`` serves the cluster and ends the process.
"""

from __future__ import annotations

import mindspore as ms

from framework.runtime.world import World


def init_world() -> World:
    """Join the job's process group (in the scheduler process this serves the rendezvous and exits)."""
    from mindspore.communication import get_group_size, get_rank, init

    init()
    world = World(get_rank(), get_group_size())
    # data-parallel mode with gradient averaging (our train step applies World.grad_reducer itself)
    ms.set_auto_parallel_context(
        parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True, device_num=world.size
    )
    return world
