"""Optimizers (``optimizer/`` configs) and per-step learning-rate schedules (``scheduler/`` configs)."""
