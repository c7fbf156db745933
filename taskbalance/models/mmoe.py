"""Multi-gate Mixture-of-Experts (MMoE) — Ma, Zhao, Yi, Chen, Hong, Chi, KDD 2018.

Eq. (4)-(5) of the paper: ``E`` expert networks ``f_e`` are shared by all tasks; task ``k`` has its own gate
``g_k(x) = softmax(W_k x)`` (``W_k ∈ R^{E×d}``) and reads the mixture ``z_k = Σ_e g_k(x)_e f_e(x)``; its tower
(head) maps ``z_k`` to the prediction. Defaults (our choice; the paper tunes them per dataset): 8 experts,
each an MLP with one hidden layer of 64 and output 32, ReLU; linear gates on the raw input as in the paper;
heads are a linear layer (optionally an MLP tower via ``head_hidden``).

**How to use it with a balancer.** ``.trunk`` holds ``experts`` and ``gates`` (so ``model.trunk`` moves,
saves and counts like any trunk), but only the experts are shared by every task: gate ``k`` is read by task
``k`` alone. Pass ``shared=model.shared_parameters()`` (the experts): the gates then get their own task's
gradient, like the heads. ``shared=model.trunk.parameters()`` also works but puts the gates' coordinates
into the per-task gradients, where they are zero for every other task; that inflates gradient norms with
task-specific directions and changes what norm- or angle-based methods see.

``forward`` returns ``(features, predictions)`` with ``features`` the per-task gated mixtures stacked as
``(B, K, D)`` in task order, for inspection and logging. Each head reads its own task's mixture (so task
``k``'s loss reaches gate ``k`` only); the per-task gradients w.r.t. the mixtures would be block-separated
anyway, so feature-level methods (``gradients="features"``) take the expert outputs instead, from
:meth:`MMoE.forward_with_experts`::

    mixtures, experts, predictions = model.forward_with_experts(x)
    balancer.backward(losses, shared=model.shared_parameters(), features=experts)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..data.tasks import Task
from .base import MultiTaskModel, make_head, mlp

__all__ = ["MMoE"]


class _Experts(nn.Module):
    """``E`` expert MLPs evaluated together; output ``(B, E, D)``."""

    def __init__(
        self, in_features: int, num_experts: int, hidden: Sequence[int], out_features: int, act: str
    ) -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            mlp(in_features, [*hidden, out_features], act=act) for _ in range(num_experts)
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([expert(x) for expert in self.experts], dim=1)


class _Gates(nn.Module):
    """One linear softmax gate per task (``gates[task]``); see :meth:`MMoE.forward_with_experts`."""

    def __init__(self, task_names: Sequence[str], in_features: int, num_experts: int) -> None:
        super().__init__()
        self.gates = nn.ModuleDict({name: nn.Linear(in_features, num_experts) for name in task_names})
        self.order = list(task_names)

    def forward(self, x: Tensor) -> Tensor:
        """All gate values ``(B, K, E)`` (for inspection; training reads each task's gate separately)."""
        return torch.stack([torch.softmax(self.gates[n](x), dim=-1) for n in self.order], dim=1)


class MMoE(MultiTaskModel):
    """MMoE over flat inputs of ``in_features``; see the module docstring for use with balancers."""

    def __init__(
        self,
        tasks: Sequence[Task],
        in_features: int,
        *,
        num_experts: int = 8,
        expert_hidden: Sequence[int] = (64,),
        expert_size: int = 32,
        head_hidden: Sequence[int] = (),
        act: str = "relu",
    ) -> None:
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if expert_size < 1:
            raise ValueError(f"expert_size must be >= 1, got {expert_size}")
        names = [t.name for t in tasks]
        trunk: nn.ModuleDict = nn.ModuleDict(
            {
                "experts": _Experts(in_features, num_experts, expert_hidden, expert_size, act),
                "gates": _Gates(names, in_features, num_experts),
            }
        )
        heads = nn.ModuleDict({t.name: make_head(t, expert_size, head_hidden, act) for t in tasks})
        super().__init__(tasks, trunk, heads, expert_size)
        self.num_experts = int(num_experts)

    @property
    def _experts(self) -> _Experts:
        experts = self.trunk.get_submodule("experts")
        assert isinstance(experts, _Experts)
        return experts

    @property
    def _gates(self) -> _Gates:
        gates = self.trunk.get_submodule("gates")
        assert isinstance(gates, _Gates)
        return gates

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The experts' parameters: the only part every task reads."""
        return self._experts.parameters()

    def task_parameters(self) -> Iterator[nn.Parameter]:
        """Gates and heads: each read by one task only."""
        yield from self._gates.parameters()
        yield from self.heads.parameters()

    def forward_with_experts(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(mixtures (B, K, D), expert outputs (B, E, D), predictions)``.

        Each head reads its own task's mixture computed from its own gate, so task ``k``'s loss reaches gate
        ``k`` only (a stacked gate tensor would make every gate part of every task's graph).
        """
        flat = x.flatten(1)
        experts = self._experts(flat)
        gates = self._gates.gates
        mixtures: list[Tensor] = []
        predictions: dict[str, Tensor] = {}
        for task in self.tasks:
            weights = torch.softmax(gates[task.name](flat), dim=-1)  # (B, E)
            mixture = torch.einsum("be,bed->bd", weights, experts)
            prediction = self.heads[task.name](mixture)
            predictions[task.name] = prediction.squeeze(-1) if task.output_size == 1 else prediction
            mixtures.append(mixture)
        return torch.stack(mixtures, dim=1), experts, predictions

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        mixtures, _, predictions = self.forward_with_experts(x)
        return mixtures, predictions
