"""GradDrop — gradient sign dropout (Chen et al., NeurIPS 2020; arXiv:2010.06808)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ...record import StepRecord
from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register
from .pcgrad import RandomStateMixin

__all__ = ["GradDrop", "sign_dropout"]


def sign_dropout(statistics: Tensor, uniform: Tensor) -> Tensor:
    """GradDrop's masks (Algorithm 1, lines 10–13) from per-task sign statistics.

    Args:
        statistics: ``(k, M)`` sign statistics ``G_k`` (one column per feature entry).
        uniform: ``(M,)`` draws ``U ~ Uniform[0, 1)``.

    Returns:
        ``(k, M)`` bool masks: with the positive-sign purity ``P = ½ (1 + Σ_k G_k / Σ_k |G_k|)``, task ``k``
        keeps an entry if ``P > U`` and ``G_k > 0``, or ``P < U`` and ``G_k < 0``. Within a column every kept
        entry has the same sign. Where all ``G_k`` are 0, ``P = ½`` (nothing is kept: no entry has a sign).
    """
    total = statistics.abs().sum(dim=0)
    ratio = statistics.sum(dim=0) / torch.where(total > 0, total, torch.ones_like(total))
    purity = 0.5 * (1 + ratio)
    return ((purity > uniform) & (statistics > 0)) | ((purity < uniform) & (statistics < 0))


@register(
    "graddrop",
    family="gradient",
    feature_level="only",
    paper="Chen et al., 'Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout', "
    "NeurIPS 2020 (arXiv:2010.06808)",
    description="Keep, per feature entry, only the task gradients of one randomly chosen sign.",
)
class GradDrop(RandomStateMixin, GradientBalancer):
    """GradDrop (Chen et al., 2020, Algorithm 1), on the gradients w.r.t. the shared features.

    With ``∇_A L_k`` the gradient of task ``k`` w.r.t. the shared activations ``A`` (``features=`` in
    :meth:`backward`):

    1. sign statistics ``G_k = Σ_batch sign(A) ⊙ ∇_A L_k`` (summed over the first, batch, dimension);
    2. purity ``P = ½ (1 + Σ_k G_k / Σ_k |G_k|)``, ``U ~ Uniform[0, 1)`` per entry of ``G``;
    3. masks ``M_k = [P > U][G_k > 0] + [P < U][G_k < 0]``, broadcast over the batch;
    4. feature gradient ``Σ_k (ℓ_k + (1 − ℓ_k) M_k) ⊙ ∇_A L_k`` with leak ``ℓ``, then one trunk backward.

    Defaults and choices:

    * ``leak=0.0`` (LibMTL), a float or one value per task; the paper's monotone ``f(P)`` is the identity;
    * ``sign_of_input=True`` and ``sum_over_batch=True`` follow the paper and LibMTL (``G`` as in step 1).
      With both false, ``G_k = ∇_A L_k`` entry-wise — the Jacobian-level form TorchJD's ``GradDrop``
      implements, and the one used when :meth:`aggregate` is called on a bare Jacobian;
    * no ``+1e-7`` in the purity denominator (LibMTL adds one); where ``Σ_k |G_k| = 0`` we set ``P = ½`` —
      both give the same masks (no task has a sign there);
    * ``U`` is drawn on the CPU from a private seeded generator and copied to the device (see
      :class:`~taskbalance.balancers.gradients.pcgrad.RandomStateMixin`);
    * defined on feature-level gradients only (LibMTL requires ``rep_grad``); the shared parameters get
      the one trunk backward of the masked feature gradient;
    * ``scale_heads = False``: heads get their plain gradients, as in LibMTL. ``record.weights`` is 1 for
      present tasks (the head factor); ``record.extras["kept_fraction"]`` gives each task's share of kept
      entries.
    """

    scale_heads = False
    needs = "jacobian"
    extra_state_fields = ("rng_state",)
    leak: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        leak: float | Sequence[float] = 0.0,
        sign_of_input: bool = True,
        sum_over_batch: bool = True,
        seed: int | None = None,
        gradients: GradientLevel = "features",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        leaks = [float(leak)] * self.num_tasks if isinstance(leak, (int, float)) else [float(v) for v in leak]
        if len(leaks) != self.num_tasks:
            raise ValueError(f"leak needs one value per task ({self.num_tasks}), got {len(leaks)}")
        if any(not 0.0 <= v <= 1.0 for v in leaks):
            raise ValueError(f"leak values must be in [0, 1], got {leaks}")
        self.sign_of_input = sign_of_input
        self.sum_over_batch = sum_over_batch
        self._init_random(seed)
        self.register_buffer("leak", torch.tensor(leaks))
        self._inputs: list[Tensor] | None = None

    def backward(
        self,
        losses: Mapping[str, Tensor],
        *,
        shared: Iterable[Tensor] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
        **options: Any,
    ) -> StepRecord:
        """As :meth:`Balancer.backward`; ``features=`` (the shared activations) is required."""
        # aggregate() sees only the Jacobian; the activations' signs and shapes are held for this one call.
        if features is not None:
            self._inputs = [features] if isinstance(features, Tensor) else list(features)
            features = self._inputs
        try:
            return super().backward(losses, shared=shared, features=features, **options)
        finally:
            self._inputs = None

    def _statistics(self, jacobian: Tensor) -> tuple[Tensor, list[tuple[int, int]]]:
        """``(k, M)`` sign statistics and, per feature tensor, ``(batch size, entries per sample)``."""
        k = jacobian.shape[0]
        if self._inputs is None:
            return jacobian, [(1, jacobian.shape[1])]
        pieces, layout = [], []
        blocks = jacobian.split([t.numel() for t in self._inputs], dim=1)
        for block, tensor in zip(blocks, self._inputs, strict=True):
            if self.sign_of_input:
                block = block * tensor.detach().sign().reshape(1, -1).to(block.dtype)
            if self.sum_over_batch and tensor.dim() > 1:
                batch_size = tensor.shape[0]
                block = block.reshape(k, batch_size, -1).sum(dim=1)
            else:
                batch_size = 1
            pieces.append(block)
            layout.append((batch_size, block.shape[1]))
        return torch.cat(pieces, dim=1), layout

    def aggregate(self, step: GradientStep) -> Aggregation:
        jacobian, losses, index = step.require_jacobian("graddrop"), step.losses, step.index
        k = jacobian.shape[0]
        statistics, layout = self._statistics(jacobian)
        uniform = torch.rand(statistics.shape[1], generator=self.generator, dtype=statistics.dtype)
        masks = sign_dropout(statistics, uniform.to(statistics.device, non_blocking=True))
        leak = self.leak[index].to(jacobian.dtype)[:, None]
        keep = leak + (1 - leak) * masks.to(jacobian.dtype)
        blocks = keep.split([entries for _, entries in layout], dim=1)
        expanded = [
            block.reshape(k, 1, entries).expand(k, batch_size, entries).reshape(k, -1)
            for block, (batch_size, entries) in zip(blocks, layout, strict=True)
        ]
        direction = (torch.cat(expanded, dim=1) * jacobian).sum(dim=0)
        return Aggregation(
            weights=torch.ones_like(losses),
            direction=direction,
            extras={"kept_fraction": masks.to(jacobian.dtype).mean(dim=1)},
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}"
