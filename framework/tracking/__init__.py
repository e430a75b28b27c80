"""Experiment tracking (``tracking/`` configs): MLflow runs, and sweeps as parent runs with one child per trial."""

# MindSpore's protobuf modules (checkpoints, MindIR) need protobuf's pure-Python backend, which MindSpore selects
# only when it is imported before anything loads protobuf; MLflow loads protobuf. So MindSpore comes first.
import mindspore  # noqa: F401, I001

from framework.tracking.mlflow_run import MlflowRun, MlflowTracker
from framework.tracking.sweep import SweepRun

__all__ = ["MlflowRun", "MlflowTracker", "SweepRun"]
