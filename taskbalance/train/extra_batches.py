"""The trainer's side of the extra-batch protocol: seeded, resumable batch streams and the loss closure.

Methods that read batches beyond the step's own (Auto-λ, ARML, MoDo, SDMGrad, HydaLearn held-out; see
:mod:`taskbalance.balancers.extra_batches`) get them from a :class:`BatchStream` over the split their
``extra_batch_source`` names: the validation split, or the training split in an order independent of the
training order. The stream is endless (a new shuffled pass starts when one ends), seeded from the run's seed,
and its position is saved in the checkpoint, so a resumed run draws the same batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..balancers.base import Balancer
from ..balancers.extra_batches import LossClosure
from ..data.base import MultiTaskData, Split
from ..data.tasks import Task

__all__ = ["BatchStream", "extra_batch_stream", "loss_closure"]

Batch = tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]
# Offset of the extra-batch stream's seed from the run's seed, so that it never replays the training order.
_STREAM_SEED_OFFSET = 7_919


class BatchStream:
    """An endless stream of shuffled mini-batches of one split, seeded and resumable.

    Args:
        split: the split to draw from (must not be empty).
        batch_size: samples per batch (the last batch of a pass may be smaller).
        seed: seeds the stream's own generator (independent of the training order's).
    """

    def __init__(self, split: Split, batch_size: int, seed: int) -> None:
        if len(split) == 0:
            raise ValueError("the split to draw extra batches from is empty")
        self.split = split
        self.batch_size = batch_size
        self._generator = torch.Generator().manual_seed(seed)
        self._pass_start = self._generator.get_state()
        self._consumed = 0
        self._iterator: Iterator[Batch] | None = None

    def next(self) -> Batch:
        """The next ``(x, y, mask)`` batch (a new shuffled pass starts when one ends)."""
        if self._iterator is None:
            self._restart(skip=self._consumed)
        assert self._iterator is not None
        batch = next(self._iterator, None)
        if batch is None:  # pass exhausted: the next one starts from the generator's current state
            self._pass_start = self._generator.get_state()
            self._consumed = 0
            self._restart(skip=0)
            batch = next(self._iterator)
        self._consumed += 1
        return batch

    def _restart(self, skip: int) -> None:
        self._generator.set_state(self._pass_start)
        self._iterator = self.split.batches(self.batch_size, self._generator, shuffle=True)
        for _ in range(skip):
            next(self._iterator)

    def state_dict(self) -> dict[str, Any]:
        """The stream's position: the generator state at the start of the current pass and the batches
        drawn since (tensors and ints only: loadable with ``torch.load(weights_only=True)``)."""
        return {"pass_start": self._pass_start.clone(), "consumed": self._consumed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the next batch is the one an uninterrupted stream gives."""
        self._pass_start = state["pass_start"].clone()
        self._consumed = int(state["consumed"])
        self._iterator = None


def extra_batch_stream(
    balancer: Balancer, data: MultiTaskData, batch_size: int, seed: int
) -> BatchStream | None:
    """The stream ``balancer`` draws its extra batches from, or ``None`` when it draws none.

    Raises:
        ValueError: the source split is empty (e.g. a dataset without a validation split).
    """
    if not balancer.extra_batches:
        return None
    source = balancer.extra_batch_source
    split = data.val if source == "validation" else data.train
    if len(split) == 0:
        raise ValueError(
            f"{balancer.info.name} draws its extra batches from the {source} split, which is empty for "
            f"dataset {data.name!r}"
        )
    return BatchStream(split, batch_size, seed + _STREAM_SEED_OFFSET)


def loss_closure(
    model: nn.Module, stream: BatchStream, tasks: Sequence[Task], device: torch.device
) -> LossClosure:
    """The ``extra_losses`` closure: the model (as it is at call time) on the stream's next batch.

    Tasks with no labelled sample in that batch are left out of the returned mapping (as in a training step);
    a method that needs one of them raises an error naming it.
    """
    def extra_losses() -> dict[str, Tensor]:
        x, y, mask = stream.next()
        _, predictions = model(x.to(device))
        losses = {}
        for task in tasks:
            task_mask = mask[task.name]
            if not bool(task_mask.any()):  # host-side mask, no device read
                continue
            target = y[task.name].to(device)
            losses[task.name] = task.loss(predictions[task.name], target, task_mask.to(device))
        return losses

    return extra_losses
