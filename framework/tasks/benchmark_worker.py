"""The MindSpore side of ``task=benchmark``, run as a script in a fresh process (``python benchmark_worker.py
SPEC.json``): a file, not ``python -c``, because MindSpore's compile cache reads its entry script."""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.remove(str(Path(__file__).resolve().parent))  # this folder's modules are framework.tasks.*, not top-level
    from framework.tasks.benchmark import mindspore_worker

    mindspore_worker()
