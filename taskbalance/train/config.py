"""The training protocol: one frozen dataclass, hashed into the results store so protocols never mix."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["TrainConfig", "protocol_hash"]

Selection = Literal["relative", "loss"]
_OPTIMIZERS = ("adam", "adamw", "sgd")
_SCHEDULERS = ("none", "cosine", "plateau")
# Options added after stores existed: left out of to_dict() while at their defaults, so that the protocol
# hash of every study that does not use them stays what it was.
_OMITTED_AT_DEFAULT = ("plateau_factor", "plateau_patience", "min_lr", "selection_reference", "balancer_lr")
_SELECTIONS = ("relative", "loss")


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained and selected.

    Attributes:
        epochs: number of passes over the training split.
        batch_size: training mini-batch size.
        lr: learning rate of the model (and of the balancer's own parameters, unless ``balancer_lr``).
        balancer_lr: learning rate of the balancer's own parameters (UW's log-variances, FAMO's logits,
            GradNorm's weights) in a parameter group of their own; ``None`` (default): ``lr``. The published
            QM9 and NYUv2 code of Nash-MTL and FAMO uses 0.025 (its ``--method-params-lr``). Schedulers
            scale both groups alike.
        weight_decay: decoupled for ``adamw``, L2 for ``adam``/``sgd``.
        optimizer: ``"adam"`` (default), ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        scheduler: ``"cosine"`` (cosine annealing to 0 over ``epochs``, stepped once per epoch; default),
            ``"plateau"`` (``ReduceLROnPlateau`` on the validation selection score, after each epoch: the
            learning rates of every parameter group are multiplied by ``plateau_factor`` when the score has
            not improved for ``plateau_patience`` epochs, down to ``min_lr``; the published QM9 protocol of
            Nash-MTL and FAMO uses 0.7, 5 and 1e-5 on validation Δm) or ``"none"``.
        eval_batch_size: batch size for validation/test passes.
        selection: how the epoch whose weights are kept is chosen, **on the validation split only**:
            ``"relative"`` (default, our choice) — the mean over target tasks of the signed relative change of
            each validation metric against the first epoch's validation metric (lower is better; scale-free,
            respects each metric's direction); ``"loss"`` — the sum of target-task validation losses.
            Auxiliary tasks (``role="auxiliary"``) never take part in selection.
        selection_reference: with ``selection="relative"``, fixed reference values per task (in the metric's
            units) instead of the first epoch's: the score is then the validation Δm against those values,
            e.g. single-task baselines' errors (as the published QM9 protocol selects on validation Δm).
            Tasks missing from it are left out of the score.
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
    plateau_factor: float = 0.7
    plateau_patience: int = 5
    min_lr: float = 1e-5
    selection_reference: dict[str, float] | None = field(default=None, compare=True)
    balancer_lr: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch_size and eval_batch_size must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.balancer_lr is not None and not self.balancer_lr > 0:
            raise ValueError(f"balancer_lr must be > 0 (or None for lr), got {self.balancer_lr}")
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
        if not 0 < self.plateau_factor < 1 or self.plateau_patience < 0 or self.min_lr < 0:
            raise ValueError(
                "plateau_factor must be in (0, 1), plateau_patience >= 0 and min_lr >= 0, got "
                f"{self.plateau_factor}, {self.plateau_patience}, {self.min_lr}"
            )
        if self.selection_reference is not None:
            reference = self.selection_reference
            bad = {k: v for k, v in reference.items() if not (isinstance(v, (int, float)) and v)}
            if bad or not self.selection_reference:
                raise ValueError(
                    f"selection_reference needs a non-zero number per task, got {self.selection_reference}"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-able); options added later are left out while at their defaults."""
        values = asdict(self)
        for name in _OMITTED_AT_DEFAULT:
            if values[name] == self.__dataclass_fields__[name].default:
                del values[name]
        return values

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
