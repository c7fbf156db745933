"""PyTorch Lightning: a mixin that trains a ``LightningModule`` with a balancer (manual optimisation).

Usage::

    import lightning as L
    import taskbalance
    from taskbalance.integrations.lightning import TaskBalancingMixin

    class MultiTaskModel(TaskBalancingMixin, L.LightningModule):
        def __init__(self):
            super().__init__()                      # switches to manual optimisation
            self.trunk, self.heads = ..., ...
            self.balancer = taskbalance.make("mgda", tasks=["seg", "depth"])

        def task_losses(self, batch):               # -> {task: loss} or ({task: loss}, features)
            x, y = batch
            z = self.trunk(x)
            return {t: loss_fn[t](self.heads[t](z), y[t]) for t in self.heads}, z

        def shared_parameters(self):                # needed by gradient-level methods (parameter mode)
            return self.trunk.parameters()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters())  # includes the balancer's parameters (UW, ...)

What the mixin's ``training_step`` does, per batch: ``zero_grad`` → ``task_losses`` →
``balancer.backward`` (passing the trainer's GradScaler under ``precision="16-mixed"``) →
``optimizer.step()`` (Lightning's precision plugin unscales, skips on overflow, updates the scale) → for
FAMO, ``after_step`` on the same batch → logs ``weight/<task>`` and ``loss/<task>``. ``end_epoch()`` is
called at each training epoch end; the balancer is a sub-module, so its state is in Lightning's checkpoints
and a resumed fit continues it.

Choices and limits (our choices):

* Learning-rate schedulers are not stepped for you (manual optimisation): step them in
  ``on_train_epoch_end`` (call ``super().on_train_epoch_end()`` too) or override :meth:`after_optimizer_step`.
* Multi-device (DDP strategies): Lightning's DDP wrapper does no gradient synchronisation under manual
  optimisation unless ``manual_backward`` is called, which we do not. On ``fit`` start with ``world_size > 1``
  the mixin attaches a :class:`~taskbalance.distributed.DistributedReducer` (global-batch weights, Jacobian
  and head gradients for gradient methods) and, for loss-level methods, averages the gradients itself after
  the balancer's backward (:func:`~taskbalance.distributed.all_reduce_gradients`). This path follows
  ``tests/integrations/test_ddp.py`` but is not itself run under a multi-process Lightning trainer in our
  tests.
* Gradient accumulation (``accumulate_grad_batches``) does not apply to manual optimisation: every batch is
  one balancer step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..balancers.base import Balancer
from ..record import StepRecord

__all__ = ["TaskBalancingMixin"]

TaskLossOutput = Mapping[str, Tensor] | tuple[Mapping[str, Tensor], Tensor | Sequence[Tensor] | None]


def _split(output: TaskLossOutput) -> tuple[Mapping[str, Tensor], Tensor | Sequence[Tensor] | None]:
    if isinstance(output, Mapping):
        return output, None
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], Mapping):
        return output[0], output[1]
    raise TypeError(
        "task_losses() must return {task: loss} or ({task: loss}, features), "
        f"got {type(output).__name__}"
    )


class TaskBalancingMixin:
    """Mixin for ``LightningModule`` s: a ``training_step`` that balances per-task losses.

    Put it *before* ``LightningModule`` in the bases. Subclasses set ``self.balancer`` and implement
    :meth:`task_losses`; gradient-level methods also need :meth:`shared_parameters` (or ``features``
    returned by :meth:`task_losses` with ``gradients="features"``).
    """

    balancer: Balancer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    # ------------------------------------------------------------------ to implement
    def task_losses(self, batch: Any) -> TaskLossOutput:
        """Per-task scalar losses of ``batch`` (with gradient), optionally with the shared features."""
        raise NotImplementedError("implement task_losses(batch) -> {task: loss} or ({task: loss}, features)")

    def shared_parameters(self) -> Iterable[Tensor] | None:
        """The shared (trunk) parameters, for gradient-level methods; ``None`` by default."""
        return None

    def after_optimizer_step(self, record: StepRecord) -> None:
        """Hook called after every optimiser step (e.g. to step a per-step LR scheduler)."""

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self) -> None:
        trainer = self.trainer  # type: ignore[attr-defined]
        if trainer.world_size > 1 and self._balancer().reducer is None:
            from ..distributed import DistributedReducer

            self._balancer().set_reducer(DistributedReducer())
        super().on_fit_start()  # type: ignore[misc]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        balancer = self._balancer()
        if getattr(self, "automatic_optimization", False):
            raise RuntimeError(
                "TaskBalancingMixin needs manual optimisation: do not set automatic_optimization = True "
                "(the balancer does the backward pass)"
            )
        optimizers = self.optimizers()  # type: ignore[attr-defined]
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for optimizer in optimizers:
            optimizer.zero_grad()
        losses, features = _split(self.task_losses(batch))
        trainer = self.trainer  # type: ignore[attr-defined]
        record = balancer.backward(
            losses, shared=self.shared_parameters(), features=features, scaler=trainer.scaler
        )
        if balancer.reducer is not None and balancer.info.family == "loss":
            from ..distributed import all_reduce_gradients

            all_reduce_gradients(self.parameters())  # type: ignore[attr-defined]
        for optimizer in optimizers:
            optimizer.step()
        if balancer.needs_post_step_losses:
            with torch.no_grad():
                balancer.after_step(_split(self.task_losses(batch))[0])
        self.after_optimizer_step(record)
        self._log_record(record)
        return record.losses.sum()

    def on_train_epoch_end(self) -> None:
        self._balancer().end_epoch()
        super().on_train_epoch_end()  # type: ignore[misc]

    # ------------------------------------------------------------------ helpers
    def _balancer(self) -> Balancer:
        balancer = getattr(self, "balancer", None)
        if not isinstance(balancer, Balancer):
            raise AttributeError("set self.balancer = taskbalance.make(...) in the module's __init__")
        return balancer

    def _log_record(self, record: StepRecord) -> None:
        values = {}
        for i, task in enumerate(record.tasks):
            values[f"weight/{task}"] = record.weights[i]
            values[f"loss/{task}"] = record.losses[i]
        self.log_dict(values, on_step=True, on_epoch=False)  # type: ignore[attr-defined]
