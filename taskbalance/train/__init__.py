"""Training: a plain loop with validation-based model selection, checkpoint/resume and cost measurement."""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, protocol_hash
from .loop import FitResult, evaluate, fit, seed_everything, selection_score

__all__ = [
    "FitResult",
    "TrainConfig",
    "evaluate",
    "fit",
    "load_checkpoint",
    "protocol_hash",
    "save_checkpoint",
    "seed_everything",
    "selection_score",
]
