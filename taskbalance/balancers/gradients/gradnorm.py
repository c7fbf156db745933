"""GradNorm — gradient normalisation (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register

__all__ = ["GradNorm"]


@register(
    "gradnorm",
    family="gradient",
    feature_level="yes",
    paper="Chen et al., 'GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask "
    "Networks', ICML 2018 (arXiv:1711.02257)",
    description="Learn task weights so that weighted gradient norms follow each task's relative training "
    "rate.",
)
class GradNorm(GradientBalancer):
    """GradNorm (Chen et al., 2018, Eq. 1–2; LibMTL ``GradNorm``).

    Weights ``w = K · softmax(q)`` from learnable logits ``q`` (an ``nn.Parameter``, initialised at 1).
    From the second epoch on, every step:

    * ``G_k = ‖w_k g_k‖`` (gradient w.r.t. the shared parameters, or the shared features with
      ``gradients="features"``), ``Ḡ = mean_k G_k``;
    * inverse training rate ``L̃_k = L_k(t) / L̄_k(0)``, ``r_k = L̃_k / mean_j L̃_j``;
    * the GradNorm loss ``Σ_k |G_k − sg(Ḡ r_k^α)|`` is differentiated w.r.t. ``q`` and its gradient
      **added to** ``q.grad`` — step it with your optimiser: ``torch.optim.Adam([*model.parameters(),
      *balancer.parameters()])`` (LibMTL uses the model optimiser; the paper a separate learning rate —
      use a parameter group);
    * the update is ``Σ_k sg(w_k) g_k``; task-specific parameters get ``w_k ∇L_k`` (``scale_heads = True``:
      the paper back-propagates the weighted loss ``Σ_k w_k L_k``; LibMTL leaves heads unweighted).

    During the first epoch (``epoch_count == 0``) the weights are 1 and ``q`` gets no gradient (LibMTL).

    Defaults and choices:

    * ``alpha=1.5`` (LibMTL); ``K · softmax`` keeps ``Σ w = K`` implicitly (the paper renormalises after each
      step);
    * ``L̄_k(0)`` is the mean training loss of epoch 0, which the balancer accumulates from the losses it sees
      and fixes at the first :meth:`end_epoch` (LibMTL's ``train_loss_buffer[:, 0]``; the paper uses the loss
      at step 0). **Our choice:** a task never seen during epoch 0 takes its first later loss as reference;
    * **our choice:** with tasks absent from a step, the present ones get ``k · softmax(q_present)``.

    State: ``logits`` (parameter), ``initial_loss``/``initial_known`` and the epoch-0 accumulators (buffers).
    """

    epoch0_loss_sum: Tensor
    epoch0_loss_count: Tensor
    initial_loss: Tensor
    initial_known: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        alpha: float = 1.5,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = alpha
        k = self.num_tasks
        self.logits = nn.Parameter(torch.ones(k))
        self.register_buffer("epoch0_loss_sum", torch.zeros(k))
        self.register_buffer("epoch0_loss_count", torch.zeros(k))
        self.register_buffer("initial_loss", torch.zeros(k))
        self.register_buffer("initial_known", torch.zeros(k, dtype=torch.bool))

    def weights(self, index: Tensor | None = None) -> Tensor:
        """Current weights ``k · softmax(q)`` of the tasks in ``index`` (default: all), with gradient."""
        logits = self.logits if index is None else self.logits[index]
        return logits.shape[0] * torch.softmax(logits, dim=0)

    def aggregate(self, step: GradientStep) -> Aggregation:
        losses, index = step.losses, step.index
        if self.epoch_count == 0:
            self.epoch0_loss_sum.index_add_(0, index, losses.to(self.epoch0_loss_sum.dtype))
            self.epoch0_loss_count.index_add_(0, index, torch.ones_like(self.epoch0_loss_count[index]))
            return Aggregation(weights=torch.ones_like(losses))
        losses = losses.to(self.initial_loss.dtype)
        known = self.initial_known[index]
        reference = torch.where(known, self.initial_loss[index], losses)
        self.initial_loss.index_copy_(0, index, reference)
        self.initial_known.index_fill_(0, index, True)

        with torch.enable_grad():
            weights = self.weights(index)
            weighted_norms = weights * step.gramian.diagonal().clamp_min(0).sqrt().to(weights.dtype)
            rate = losses / torch.where(reference > 0, reference, torch.ones_like(reference))
            relative_rate = rate / rate.mean().clamp_min(torch.finfo(rate.dtype).tiny)
            target = (weighted_norms.mean() * relative_rate**self.alpha).detach()
            gradnorm_loss = (weighted_norms - target).abs().sum()
            (logits_grad,) = torch.autograd.grad(gradnorm_loss, self.logits)
        scale = getattr(self, "_grad_scale", None)  # under a GradScaler every .grad is left scaled
        if scale is not None:
            logits_grad = logits_grad * scale.to(logits_grad.dtype)
        if self.logits.grad is None:
            self.logits.grad = logits_grad
        else:
            self.logits.grad.add_(logits_grad)
        return Aggregation(
            weights=weights.detach(),
            extras={"weighted_norms": weighted_norms.detach(), "gradnorm_loss": gradnorm_loss.detach()},
        )

    def _on_epoch_end(self) -> None:
        if self.epoch_count == 0:
            seen = self.epoch0_loss_count > 0
            mean = self.epoch0_loss_sum / self.epoch0_loss_count.clamp_min(1)
            self.initial_loss.copy_(torch.where(seen, mean, self.initial_loss))
            self.initial_known.copy_(seen)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"
