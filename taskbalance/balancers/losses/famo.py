"""FAMO — fast adaptive multitask optimisation (Liu, Liang, Li, Stone & Liu, NeurIPS 2023)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from ..base import LossBalancer
from ..inputs import NonFinitePolicy, TaskLosses
from ..registry import register

__all__ = ["FAMO"]

LogitOptimizer = Literal["adam", "sgd"]


@register(
    "famo",
    family="loss",
    paper="Liu, Liang, Li, Stone & Liu, 'FAMO: Fast Adaptive Multitask Optimization', NeurIPS 2023 "
    "(arXiv:2306.03792)",
    description="Decrease all log-losses at an equal rate with logits learned from the loss change per step.",
)
class FAMO(LossBalancer):
    """FAMO (paper Algorithm 1/2, ``docs/method-notes.md`` §7.2; LibMTL ``FAMO``).

    With logits ``ξ`` (start at 0), ``z = softmax(ξ)`` and ``ℓ_k = max(L_k − L_k^min, 0) + ε``, ``ε = 1e-8``::

        L_tot = c · Σ_k z_k log ℓ_k,        c = sg( (Σ_k z_k / ℓ_k)^{-1} )

    so the model gradient is ``Σ_k w_k ∇L_k`` with ``w_k = c z_k / ℓ_k``: a convex combination of the task
    gradients (the weights sum to 1). **After** ``optimizer.step()``, re-evaluate the losses on the **same
    batch** under ``torch.no_grad()`` and call ``balancer.after_step(losses)``: with
    ``δ_k = log ℓ_k(before) − log ℓ_k(after)`` the logits take one step of the internal optimiser on the
    gradient ``J_softmax(ξ)ᵀ δ`` with weight decay ``gamma``.

    The logits are **not** an ``nn.Parameter``: FAMO updates them itself (do not add them to your optimiser).
    The internal optimiser is ``"adam"`` (default; official code and LibMTL: Adam, lr ``w_lr``, L2 weight
    decay ``gamma``) or ``"sgd"`` (the paper's Algorithm 1: ``ξ ← ξ − w_lr (g + γ ξ)``). Its moments and step
    counts are buffers, so they round-trip through ``state_dict()`` and move with ``.to()``; the Adam update
    is written out on-device (same formula as ``torch.optim.Adam``, no host reads).

    ``loss_change="next_batch"`` (**our extension**, not in the paper) saves the extra forward pass: the loss
    change is measured between this step's losses and the *next* step's (a new batch), so the logit update
    lags one step and carries the batch-to-batch noise of the losses; ``needs_post_step_losses`` is then
    false and ``after_step`` is a no-op. The default ``"same_batch"`` is the paper's rule.

    Defaults: ``w_lr=0.025``, ``gamma=1e-3`` (paper, LibMTL), ``min_losses=0`` (LibMTL). Adam's
    ``betas=(0.9, 0.999)`` and ``eps=1e-8`` are PyTorch's defaults, as in the official code.

    Our choices: ``L − L^min`` is clamped at 0 before adding ``ε`` (never a log of a negative number); a task
    absent from the forward step or from the re-evaluated losses is left out of that logit update: its logit,
    moments and step count stay unchanged and the softmax Jacobian is taken over the tasks present in both
    (per-task Adam step counts make this exact; with every task always present it is plain Adam).

    Args:
        tasks: task names.
        w_lr: learning rate of the logits.
        gamma: weight decay of the logits.
        min_losses: lower bounds ``L^min``: one float for all tasks or ``{task: bound}``.
        logit_optimizer: ``"adam"`` or ``"sgd"``.
        betas, adam_eps: Adam's coefficients.
        loss_change: ``"same_batch"`` (paper: needs ``after_step``) or ``"next_batch"`` (no extra forward).
        on_nonfinite: see :class:`~taskbalance.Balancer`.
    """

    takes_log_of_losses = True
    extra_state_fields = ("awaiting_post_step",)
    eps = 1e-8
    min_losses: Tensor
    logits: Tensor
    adam_first_moment: Tensor
    adam_second_moment: Tensor
    adam_steps: Tensor
    pre_step_log_losses: Tensor
    pre_step_present: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        w_lr: float = 0.025,
        gamma: float = 1e-3,
        min_losses: float | Mapping[str, float] = 0.0,
        logit_optimizer: LogitOptimizer = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        loss_change: Literal["same_batch", "next_batch"] = "same_batch",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, on_nonfinite=on_nonfinite)
        if not (math.isfinite(w_lr) and w_lr >= 0):
            raise ValueError(f"w_lr must be a finite number >= 0, got {w_lr}")
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
        if logit_optimizer not in ("adam", "sgd"):
            raise ValueError(f"logit_optimizer must be 'adam' or 'sgd', got {logit_optimizer!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not (math.isfinite(adam_eps) and adam_eps > 0):
            raise ValueError(f"adam_eps must be a finite number > 0, got {adam_eps}")
        if isinstance(min_losses, Mapping):
            unknown = [t for t in min_losses if t not in self.tasks]
            if unknown:
                raise ValueError(f"min_losses names unknown task(s) {unknown}; tasks are {list(self.tasks)}")
            bounds = [float(min_losses.get(t, 0.0)) for t in self.tasks]
        else:
            bounds = [float(min_losses)] * self.num_tasks
        if not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"min_losses must be finite, got {bounds}")
        if loss_change not in ("same_batch", "next_batch"):
            raise ValueError(f"loss_change must be 'same_batch' or 'next_batch', got {loss_change!r}")
        self.loss_change = loss_change
        self.w_lr = w_lr
        self.gamma = gamma
        self.logit_optimizer: LogitOptimizer = logit_optimizer
        self.betas = (float(betas[0]), float(betas[1]))
        self.adam_eps = adam_eps
        self.awaiting_post_step = False
        k = self.num_tasks
        self.register_buffer("min_losses", torch.tensor(bounds))
        self.register_buffer("logits", torch.zeros(k))
        self.register_buffer("adam_first_moment", torch.zeros(k))
        self.register_buffer("adam_second_moment", torch.zeros(k))
        self.register_buffer("adam_steps", torch.zeros(k))
        self.register_buffer("pre_step_log_losses", torch.zeros(k))
        self.register_buffer("pre_step_present", torch.zeros(k, dtype=torch.bool))

    @property
    def needs_post_step_losses(self) -> bool:  # type: ignore[override]
        """True for the paper's rule (re-evaluate the same batch after the step), false for ``next_batch``."""
        return self.loss_change == "same_batch"

    def task_weights(self) -> Tensor:
        """``z = softmax(ξ)`` over all tasks."""
        return torch.softmax(self.logits, dim=0)

    def _shifted(self, losses: Tensor, present: Tensor) -> Tensor:
        gap = (losses - self.min_losses.to(losses.dtype)).clamp_min(0) + self.eps
        return torch.where(present, gap, torch.ones_like(gap))

    def objective(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        if self.loss_change == "next_batch" and self.awaiting_post_step:
            self._update_logits(losses.detach(), present)
        shifted = self._shifted(losses, present)
        z = torch.where(present, self.task_weights().to(losses.dtype), torch.zeros_like(losses))
        scaled = z / shifted.detach()
        c = 1.0 / scaled.sum()
        logs = torch.log(shifted)
        total = c * (z * logs).sum()
        log_before = logs.detach().to(self.pre_step_log_losses.dtype)
        self.pre_step_log_losses.copy_(torch.where(present, log_before, self.pre_step_log_losses))
        self.pre_step_present.copy_(present)
        self.awaiting_post_step = True
        return total, c * scaled

    def _on_post_step_losses(self, batch: TaskLosses) -> None:
        if not self.awaiting_post_step:
            raise RuntimeError("famo.after_step(losses) must follow balancer.backward(...) on the same batch")
        self._update_logits(batch.values.detach(), batch.present)

    def _update_logits(self, values: Tensor, present: Tensor) -> None:
        """One logit step from the loss change between the stored pre-step losses and ``values``."""
        both = self.pre_step_present & present
        log_after = torch.log(self._shifted(values, present)).to(self.logits.dtype)
        delta = torch.where(both, self.pre_step_log_losses - log_after, torch.zeros_like(log_after))
        z = torch.softmax(torch.where(both, self.logits, -math.inf), dim=0)
        gradient = z * (delta - (z * delta).sum()) + self.gamma * self.logits  # J_softmaxᵀ δ + γ ξ
        if self.logit_optimizer == "sgd":
            new_logits = self.logits - self.w_lr * gradient
        else:
            beta1, beta2 = self.betas
            steps = self.adam_steps + 1
            first = torch.lerp(self.adam_first_moment, gradient, 1 - beta1)
            second = self.adam_second_moment * beta2 + (1 - beta2) * gradient * gradient
            correction1 = 1 - torch.pow(beta1, steps)
            correction2 = torch.sqrt(1 - torch.pow(beta2, steps))
            denominator = torch.sqrt(second) / correction2 + self.adam_eps
            new_logits = self.logits - (self.w_lr / correction1) * first / denominator
            self.adam_first_moment.copy_(torch.where(both, first, self.adam_first_moment))
            self.adam_second_moment.copy_(torch.where(both, second, self.adam_second_moment))
            self.adam_steps.copy_(torch.where(both, steps, self.adam_steps))
        self.logits.copy_(torch.where(both, new_logits, self.logits))
        self.pre_step_present.zero_()
        self.awaiting_post_step = False

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, w_lr={self.w_lr}, gamma={self.gamma}, "
            f"logit_optimizer={self.logit_optimizer!r}"
        )
