"""SLURM: where a multi-node job's rendezvous is (``${slurm_master_addr:...}`` in ``hardware/`` configs).

Under SLURM (e.g. Hydra's submitit launcher, ``hydra/launcher=slurm``), each node runs one ``run.py``
task that starts msrun for its own devices; ``hardware.node_rank`` comes from ``SLURM_NODEID`` and
``hardware.master_addr`` is the first host of the job's node list.
"""

from __future__ import annotations

import os
import re


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu1`` → ``gpu07``."""
    first = re.match(r"[^,\[]*(\[[^\]]*\])?[^,]*", nodelist.strip()).group(0)
    ranges = re.search(r"\[([^\]]*)\]", first)
    if ranges is None:
        return first
    start = ranges.group(1).split(",")[0].split("-")[0]
    return first[: ranges.start()] + start + first[ranges.end() :]


def slurm_master_addr(default: str = "127.0.0.1") -> str:
    """The first node of a multi-node SLURM job, else ``default``."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodelist and int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1"))) > 1:
        return first_host(nodelist)
    return default


def slurm_gres(device_target: str, device_num: int) -> str | None:
    """The generic resource a node needs for ``device_num`` devices: ``gpu:N`` / ``npu:N``; none on CPU."""
    kind = {"GPU": "gpu", "Ascend": "npu"}.get(device_target)
    return f"{kind}:{device_num}" if kind else None
