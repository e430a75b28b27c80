"""Experiment tracking (``tracking/`` configs)."""

from framework.tracking.mlflow_run import MlflowRun, MlflowTracker

__all__ = ["MlflowRun", "MlflowTracker"]
