"""DSelect-k — differentiable k-sparse expert selection for multi-task MoE (Hazimeh et al., NeurIPS 2021).

An MMoE whose softmax gates are replaced by **DSelect-k gates** (paper §3, Eq. 5–7). With ``n`` experts and
``m = ⌈log₂ n⌉``, each task's gate has ``k`` single-expert selectors; selector ``i`` holds ``m`` logits
``z_i`` (per example: ``z_i = W_i x``) passed through the smooth-step ``S`` (Eq. 5)::

    S(t) = 0 (t ≤ −γ/2),   −2t³/γ³ + 3t/(2γ) + ½ (|t| < γ/2),   1 (t ≥ γ/2)

and puts weight ``r_i(e) = Π_j [S(z_ij) if bit j of e is 1 else 1 − S(z_ij)]`` on expert ``e`` (Eq. 6: a
distribution over the ``2^m`` binary codes). The gate is ``Σ_i softmax(w)_i r_i`` (Eq. 7). Once the
smooth-steps saturate at 0 or 1 (they reach them exactly, unlike a sigmoid), each selector picks one expert
and the gate has **at most k non-zero entries** — the defining property (tested).

Defaults: ``γ = 1`` (paper), ``k = 2``, 8 experts (MLP ``(64,)`` → 32, ReLU), per-example gates, logits
initialised uniformly in ``[−γ/2, γ/2]`` (paper §C). Our choices: when ``n`` is not a power of 2, code
``c ≥ n`` selects expert ``c mod n`` (every code is a valid expert, so the gate stays a distribution and
k-sparse); the paper's optional entropy
regulariser (pushing ``S`` to 0/1 faster) is not added to the loss — :meth:`DSelectK.gate_entropy` returns
it for users who want it.

**With a balancer**, as MMoE: ``shared_parameters()`` are the experts (the gates are task-specific), and the
``features`` returned by ``forward`` are the expert outputs ``(B, n, D)`` that every task's gate reads (the
meaningful ``features=`` for ``gradients="features"``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..data.tasks import Task
from .base import MultiTaskModel, make_head, mlp

__all__ = ["DSelectK", "DSelectKGate", "smooth_step"]


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """The cubic smooth-step of Hazimeh et al. 2021 (Eq. 5): exactly 0 / 1 beyond ``∓γ/2``."""
    cubic = -2 * t**3 / gamma**3 + 3 * t / (2 * gamma) + 0.5
    return torch.where(
        t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic)
    )


class DSelectKGate(nn.Module):
    """A per-example DSelect-k gate: ``(B, in_features) → (B, n)`` weights on the simplex."""

    code_bits: Tensor
    code_to_expert: Tensor

    def __init__(self, in_features: int, num_experts: int, k: int, gamma: float = 1.0) -> None:
        super().__init__()
        if num_experts < 2 or not 1 <= k <= num_experts:
            raise ValueError(f"need num_experts >= 2 and 1 <= k <= num_experts, got {num_experts}, {k}")
        self.bits = max(1, math.ceil(math.log2(num_experts)))
        self.k, self.gamma, self.num_experts = k, float(gamma), num_experts
        self.selector_logits = nn.Linear(in_features, k * self.bits)
        self.selector_weights = nn.Linear(in_features, k)
        nn.init.uniform_(self.selector_logits.bias, -gamma / 2, gamma / 2)
        codes = torch.arange(2**self.bits)
        self.register_buffer(
            "code_bits", ((codes[:, None] >> torch.arange(self.bits)) & 1).float(), persistent=False
        )
        # code c selects expert c mod n (our choice for n not a power of 2: every code is a valid expert)
        assignment = torch.nn.functional.one_hot(codes % num_experts, num_experts).float()
        self.register_buffer("code_to_expert", assignment, persistent=False)

    def selectors(self, x: Tensor) -> Tensor:
        """``(B, k, n)``: each single-expert selector's distribution over the experts (Eq. 6)."""
        s = smooth_step(self.selector_logits(x).view(-1, self.k, self.bits), self.gamma)  # (B, k, m)
        bits = self.code_bits  # (2^m, m)
        per_bit = s[:, :, None, :] * bits + (1 - s[:, :, None, :]) * (1 - bits)  # (B, k, 2^m, m)
        return per_bit.prod(-1) @ self.code_to_expert  # (B, k, n), each row sums to 1

    def forward(self, x: Tensor) -> Tensor:
        mix = torch.softmax(self.selector_weights(x), dim=-1)  # (B, k)
        return torch.einsum("bk,bkn->bn", mix, self.selectors(x))

    def entropy(self, x: Tensor) -> Tensor:
        """Mean entropy of the single-expert selectors (the paper's optional regulariser)."""
        r = self.selectors(x)
        return -(r * r.clamp_min(1e-12).log()).sum(-1).mean()


class DSelectK(MultiTaskModel):
    """MMoE with DSelect-k gates over flat inputs; see the module docstring."""

    def __init__(
        self,
        tasks: Sequence[Task],
        in_features: int,
        *,
        num_experts: int = 8,
        k: int = 2,
        gamma: float = 1.0,
        expert_hidden: Sequence[int] = (64,),
        expert_size: int = 32,
        head_hidden: Sequence[int] = (),
        act: str = "relu",
    ) -> None:
        trunk = nn.ModuleDict(
            {
                "experts": nn.ModuleList(
                    mlp(in_features, [*expert_hidden, expert_size], act=act) for _ in range(num_experts)
                ),
                "gates": nn.ModuleDict(
                    {t.name: DSelectKGate(in_features, num_experts, k, gamma) for t in tasks}
                ),
            }
        )
        heads = nn.ModuleDict({t.name: make_head(t, expert_size, head_hidden, act) for t in tasks})
        super().__init__(tasks, trunk, heads, expert_size)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The experts' parameters (every task's gate reads them)."""
        return self.trunk.get_submodule("experts").parameters()

    def task_parameters(self) -> Iterator[nn.Parameter]:
        """Gates and heads: each read by one task only."""
        yield from self.trunk.get_submodule("gates").parameters()
        yield from self.heads.parameters()

    def gate(self, task: str, x: Tensor) -> Tensor:
        """Task ``task``'s gate weights ``(B, n)`` for inputs ``x``."""
        gate = self.trunk.get_submodule(f"gates.{task}")
        assert isinstance(gate, DSelectKGate)
        return gate(x.flatten(1))

    def gate_entropy(self, x: Tensor) -> Tensor:
        """Sum over tasks of the selectors' mean entropy (add ``λ ·`` this to the loss to sparsify faster)."""
        gates = [g for g in self.trunk.get_submodule("gates").children() if isinstance(g, DSelectKGate)]
        return torch.stack([g.entropy(x.flatten(1)) for g in gates]).sum()

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        flat = x.flatten(1)
        experts_module = self.trunk.get_submodule("experts")
        experts = torch.stack([expert(flat) for expert in experts_module.children()], dim=1)  # (B, n, D)
        predictions: dict[str, Tensor] = {}
        for task in self.tasks:
            gate = self.trunk.get_submodule(f"gates.{task.name}")
            mixture = torch.einsum("bn,bnd->bd", gate(flat), experts)
            prediction = self.heads[task.name](mixture)
            predictions[task.name] = prediction.squeeze(-1) if task.output_size == 1 else prediction
        return experts, predictions
