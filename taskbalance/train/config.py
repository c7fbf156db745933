"""The training protocol: one frozen dataclass, hashed into the results store so protocols never mix."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["TrainConfig", "protocol_hash"]

Selection = Literal["relative", "loss"]
_OPTIMIZERS = ("adam", "adamw", "sgd")
_SCHEDULERS = ("none", "cosine")
_SELECTIONS = ("relative", "loss")


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained and selected.

    Attributes:
        epochs: number of passes over the training split.
        batch_size: training mini-batch size.
        lr: learning rate of the model (and of the balancer's own parameters, if any).
        weight_decay: decoupled for ``adamw``, L2 for ``adam``/``sgd``.
        optimizer: ``"adam"`` (default), ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        scheduler: ``"cosine"`` (cosine annealing to 0 over ``epochs``, stepped once per epoch; default) or
            ``"none"``.
        eval_batch_size: batch size for validation/test passes.
        selection: how the epoch whose weights are kept is chosen, **on the validation split only**:
            ``"relative"`` (default, our choice) — the mean over target tasks of the signed relative change of
            each validation metric against the first epoch's validation metric (lower is better; scale-free,
            respects each metric's direction); ``"loss"`` — the sum of target-task validation losses.
            Auxiliary tasks (``role="auxiliary"``) never take part in selection.
        checkpoint_every: with a checkpoint path, save every this many epochs (and always after the last).
    """

    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    scheduler: str = "cosine"
    eval_batch_size: int = 2048
    selection: Selection = "relative"
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch_size and eval_batch_size must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if self.scheduler not in _SCHEDULERS:
            raise ValueError(f"scheduler must be one of {_SCHEDULERS}, got {self.scheduler!r}")
        if self.selection not in _SELECTIONS:
            raise ValueError(f"selection must be one of {_SELECTIONS}, got {self.selection!r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-able)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError`` naming them."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"unknown training option(s) {unknown}; valid: {sorted(known)}")
        return cls(**values)


def protocol_hash(*parts: Any) -> str:
    """A short stable hash (16 hex digits) of JSON-able parts: canonical JSON, sorted keys, SHA-256."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
