"""In-memory multi-task datasets: tensors split into train / validation / test.

Every built-in dataset fits in memory on a laptop, so a split is a set of tensors and batching is slicing
(no loader processes). Labels may be missing per task and sample: ``mask[task]`` is false there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .tasks import Task

__all__ = ["Split", "MultiTaskData", "present_losses"]


@dataclass
class Split:
    """One split: inputs ``x`` (N, ...), targets ``y[task]`` (N, ...), label masks ``mask[task]`` (N,)."""

    x: Tensor
    y: dict[str, Tensor]
    mask: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        for name, target in self.y.items():
            if target.shape[0] != n:
                raise ValueError(f"target {name!r} has {target.shape[0]} rows, inputs have {n}")
            if name not in self.mask:
                self.mask[name] = torch.ones(n, dtype=torch.bool)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batches(self, batch_size: int, generator: torch.Generator | None = None,
                shuffle: bool = False) -> Iterator[tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]]:
        """Yield ``(x, y, mask)`` mini-batches; shuffled with ``generator`` when ``shuffle``."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            y = {k: v[idx] for k, v in self.y.items()}
            yield self.x[idx], y, {k: v[idx] for k, v in self.mask.items()}


@dataclass
class MultiTaskData:
    """A multi-task dataset ready to train on.

    Attributes:
        name: dataset name (``"qm9"``, ``"multi_fashion"``, …).
        tasks: the task specifications, in a fixed order.
        train, val, test: the splits. Model selection uses ``val`` only; ``test`` is read once per run.
        protocol: a dict describing how the data was built (sizes, seed, options); hashed into the results
            store so runs under different protocols never mix.
    """

    name: str
    tasks: tuple[Task, ...]
    train: Split
    val: Split
    test: Split
    protocol: dict[str, object] = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def present_losses(
    tasks: Sequence[Task],
    predictions: Mapping[str, Tensor],
    targets: Mapping[str, Tensor],
    masks: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Per-task mean losses of one batch, keyed by task name, leaving out tasks with no label in the batch.

    A balancer treats a task absent from the mapping as missing for that step (it skips it and says so in
    its record), which is what a partially labelled batch means; a loss of 0 would instead read as a
    perfectly solved task. Deciding which tasks are present needs one host read per call (all tasks'
    "any label?" flags are gathered into one small tensor first); without ``masks`` there is none.
    """
    if masks is None:
        return {t.name: t.loss(predictions[t.name], targets[t.name]) for t in tasks}
    present = torch.stack([masks[t.name].any() for t in tasks]).tolist()  # one host sync per batch
    return {
        t.name: t.loss(predictions[t.name], targets[t.name], masks[t.name])
        for t, keep in zip(tasks, present, strict=True)
        if keep
    }
