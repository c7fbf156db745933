"""IMTL-L — the loss part of Impartial Multi-Task Learning (Liu et al., ICLR 2021), on its own."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..base import LossBalancer
from ..inputs import NonFinitePolicy
from ..registry import register

__all__ = ["IMTLL"]


@register(
    "imtl-l",
    family="loss",
    paper="Liu et al., 'Towards Impartial Multi-task Learning', ICLR 2021, IMTL-L (§3.1, Eq. 5)",
    description="Learnable loss scales s_k: L = Σ_k e^{s_k} L_k − s_k.",
)
class IMTLL(LossBalancer):
    """IMTL-L (paper Eq. 5; TorchJD ``IMTLL``; the loss half of LibMTL's ``IMTL``)::

        L = Σ_k ( e^{s_k} L_k − s_k ),        w_k = ∂L/∂L_k = e^{s_k}

    The ``s_k`` are an ``nn.Parameter`` (init 0, so the first steps are the plain sum) trained by **your**
    optimiser jointly with the model: ``∂L/∂s_k = e^{s_k} L_k − 1`` drives each scaled loss
    ``e^{s_k} L_k`` towards 1, which is what makes the method impartial to the loss scales. Add
    ``balancer.parameters()`` to the optimiser, e.g. ``Adam([*model.parameters(), *balancer.parameters()])``.

    ``taskbalance.make("imtl")`` is the hybrid (IMTL-L + IMTL-G); this is the loss part alone, a
    one-backward method. It equals ``2 · UW`` at ``s = −log σ²`` (TorchJD's remark): the same optima.

    Our choice: a task absent from a step contributes neither ``e^{s_k} L_k`` nor ``−s_k`` (weight 0, no
    gradient for its ``s_k``).

    Args:
        tasks: task names.
        init: initial ``s_k`` (default 0, as the paper, LibMTL and TorchJD).
        on_nonfinite: see :class:`~taskbalance.Balancer`.
    """

    def __init__(
        self, tasks: Sequence[str], *, init: float = 0.0, on_nonfinite: NonFinitePolicy = "raise"
    ) -> None:
        super().__init__(tasks, on_nonfinite=on_nonfinite)
        if not torch.isfinite(torch.tensor(float(init))):
            raise ValueError(f"init must be a finite log-scale, got {init}")
        self.init = float(init)
        self.loss_scale = nn.Parameter(torch.full((self.num_tasks,), self.init))

    def objective(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        s = self.loss_scale.to(losses.dtype)
        scale = torch.exp(s)
        terms = torch.where(present, scale * losses - s, torch.zeros_like(losses))
        weights = torch.where(present, scale, torch.zeros_like(scale)).detach()
        return terms.sum(), weights
