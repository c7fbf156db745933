"""Training: a plain loop with validation-based model selection, checkpoint/resume and cost measurement."""

from .checkpoint import CheckpointError, CheckpointMismatchError, load_checkpoint, save_checkpoint, set_aside
from .config import TrainConfig, protocol_hash
from .loop import FitResult, evaluate, fit, seed_everything, selection_score

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "FitResult",
    "TrainConfig",
    "evaluate",
    "fit",
    "load_checkpoint",
    "protocol_hash",
    "save_checkpoint",
    "seed_everything",
    "selection_score",
    "set_aside",
]
