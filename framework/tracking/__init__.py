"""Experiment tracking (``tracking/`` configs): MLflow runs, and sweeps as parent runs with one child per trial."""

from framework.tracking.mlflow_run import MlflowRun, MlflowTracker
from framework.tracking.sweep import SweepRun

__all__ = ["MlflowRun", "MlflowTracker", "SweepRun"]
