"""Training engine (``engine/`` configs): train loop, evaluation, checkpoints."""

from framework.engine.checkpoint import load_checkpoint, save_checkpoint
from framework.engine.evaluate import evaluate
from framework.engine.observers import EarlyStopping, Observer, Stop
from framework.engine.trainer import FitResult, Trainer

__all__ = [
    "EarlyStopping",
    "FitResult",
    "Observer",
    "Stop",
    "Trainer",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
]
