"""Hugging Face ``transformers``: :class:`BalancedTrainer`, a ``Trainer`` that balances per-task losses.

Usage::

    from taskbalance.integrations.huggingface import BalancedTrainer

    class MultiTaskModel(nn.Module):                 # or any PreTrainedModel
        def forward(self, x, y_seg, y_depth):
            z = self.trunk(x)
            return {"task_losses": {"seg": ..., "depth": ...}, "features": z}

    trainer = BalancedTrainer(
        model=model, args=TrainingArguments(...), train_dataset=...,
        balancer=taskbalance.make("pcgrad", tasks=["seg", "depth"]),
        shared_parameters=lambda m: m.trunk.parameters(),   # gradient-level methods (parameter mode)
    )
    trainer.train()

**The contract.** :meth:`BalancedTrainer.compute_loss` returns the *per-task* losses ``{task: loss}`` (by
default the model output's ``"task_losses"`` entry; override it to compute them yourself). The training step
hands them to ``balancer.backward`` in place of ``accelerator.backward(loss)`` (with the accelerator's
GradScaler under ``fp16=True``); the Trainer then clips (unscaling first), steps and schedules as usual.
Evaluation reports ``eval_loss`` = the plain sum of the task losses (our choice: a method-independent number).

Also handled: the balancer's own parameters (UW, …) are added to the optimiser that ``create_optimizer``
builds (and their gradients zeroed each step: the Trainer zeroes only the model's); ``end_epoch()`` runs at
each epoch end; FAMO's post-step losses are recomputed on the same batch after the optimiser step; per-task
weights and losses are logged as ``weight/<task>``, ``loss/<task>``; the balancer's state is saved next to
the optimiser state in every checkpoint (``balancer.pt``), restored by ``train(resume_from_checkpoint=...)``.

Limits (our choices): ``gradient_accumulation_steps`` must be 1 (every batch is one balancer step; raise the
per-device batch instead). Multi-process (``accelerate launch``/``torchrun``): a
:class:`~taskbalance.distributed.DistributedReducer` is attached, and for gradient-level methods the forward
and balancer backward of a DDP-wrapped model (also one process under ``torchrun``) run under
``model.no_sync()`` (see ``docs/scaling.md``); that path follows
``tests/integrations/test_ddp.py`` but is not run under a multi-process Trainer in our tests.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from ..balancers.base import Balancer
from ..record import StepRecord

__all__ = ["BalancedTrainer"]

BALANCER_STATE = "balancer.pt"


class _BalancerCallback(TrainerCallback):
    """Epoch ends and post-step losses, which happen outside ``training_step``."""

    def __init__(self, trainer: BalancedTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._after_optimizer_step()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.balancer.end_epoch()


class BalancedTrainer(Trainer):
    """A ``transformers.Trainer`` whose training step balances per-task losses with ``balancer``.

    Args:
        *args, **kwargs: as for ``Trainer``.
        balancer: the balancer (``taskbalance.make(...)``).
        shared_parameters: ``model -> iterable of shared parameters``, for gradient-level methods in parameter
            mode (called on the unwrapped model every step).
        features_key: key of the model output holding the shared features (``gradients="features"``).
        losses_key: key of the model output holding ``{task: loss}``.
    """

    def __init__(
        self,
        *args: Any,
        balancer: Balancer,
        shared_parameters: Callable[[nn.Module], Iterable[Tensor]] | None = None,
        features_key: str = "features",
        losses_key: str = "task_losses",
        **kwargs: Any,
    ) -> None:
        if not isinstance(balancer, Balancer):
            raise TypeError(f"balancer must be a taskbalance Balancer, got {type(balancer).__name__}")
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                "BalancedTrainer needs gradient_accumulation_steps=1: each batch is one balancer step "
                "(use a larger per_device_train_batch_size instead)"
            )
        self.balancer = balancer
        self.shared_parameters = shared_parameters
        self.features_key = features_key
        self.losses_key = losses_key
        self.last_record: StepRecord | None = None
        self._last_inputs: dict[str, Any] | None = None
        if self.accelerator.num_processes > 1 and balancer.reducer is None:
            from ..distributed import DistributedReducer

            balancer.set_reducer(DistributedReducer())
        self.add_callback(_BalancerCallback(self))

    # ------------------------------------------------------------------ losses
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The per-task losses ``{task: loss}`` (and the model outputs if ``return_outputs``)."""
        outputs = model(**inputs)
        if not isinstance(outputs, Mapping) or self.losses_key not in outputs:
            raise ValueError(
                f"the model must return a mapping with {self.losses_key!r}: {{task: loss}}, or override "
                "BalancedTrainer.compute_loss to return the per-task losses"
            )
        losses = outputs[self.losses_key]
        return (losses, outputs) if return_outputs else losses

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        balancer = self.balancer
        for parameter in balancer.parameters():  # the Trainer zeroes the model's gradients, not these
            parameter.grad = None
        gradient_level = balancer.info.family == "gradient"
        # DDP-wrapped (also with one process, e.g. under `torchrun --nproc-per-node 1`): a gradient method's
        # partial backward would leave DDP's reducer waiting, so the step runs outside DDP's sync.
        # (`accelerator.no_sync` is a no-op with one process even though the model is wrapped.)
        sync_off: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if gradient_level and isinstance(model, nn.parallel.DistributedDataParallel):
            sync_off = model.no_sync()
        with sync_off:
            with self.compute_loss_context_manager():
                losses, outputs = self.compute_loss(model, inputs, return_outputs=True)
            features = outputs.get(self.features_key) if isinstance(outputs, Mapping) else None
            shared = None
            if self.shared_parameters is not None:
                shared = self.shared_parameters(self.accelerator.unwrap_model(model))
            scaler = self.accelerator.scaler
            record = balancer.backward(losses, shared=shared, features=features, scaler=scaler)
        if balancer.needs_post_step_losses:
            self._last_inputs = inputs
        self.last_record = record
        return record.losses.sum().detach()

    def _after_optimizer_step(self) -> None:
        if self.balancer.needs_post_step_losses and self._last_inputs is not None:
            with torch.no_grad(), self.compute_loss_context_manager():
                losses = self.compute_loss(self.model, self._last_inputs)  # type: ignore[arg-type]
            self.balancer.after_step(losses)
            self._last_inputs = None

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Evaluation: the loss is the plain sum of the task losses; logits and labels pass through."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            losses, outputs = self.compute_loss(model, inputs, return_outputs=True)
        total = torch.stack([loss.detach() for loss in losses.values()]).sum()
        if prediction_loss_only:
            return total, None, None
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
        return total, logits, inputs.get("labels")

    # ------------------------------------------------------------------ optimiser, logging, checkpoints
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        own = list(self.balancer.parameters())
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in own if id(p) not in known]
        if missing:
            optimizer.add_param_group({"params": missing, "weight_decay": 0.0})
        return optimizer

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.last_record is not None and "loss" in logs:  # training logs only; one host read per log
            logs = {**logs, **self.last_record.to_dict()}
        super().log(logs, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(self.balancer.state_dict(), os.path.join(output_dir, BALANCER_STATE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, BALANCER_STATE)
        if os.path.exists(path):
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.balancer.load_state_dict(state)
