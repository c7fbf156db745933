"""CGC and PLE — Progressive Layered Extraction (Tang, Liu, Zhao & Gong, RecSys 2020).

**CGC** (Customized Gate Control, paper §4.2, Eq. 1–3): every task ``k`` has ``m_k`` task-specific experts,
all tasks share ``m_s`` shared experts; task ``k``'s gate ``g_k(x) = softmax(W_k x)`` mixes **its own experts
and the shared ones only** (never another task's), and its tower reads that mixture.

**PLE** (paper §4.3, Eq. 4–5) stacks ``levels`` extraction networks. At every level but the last, besides the
task gates, a *shared gate* mixes **all** experts of the level (every task's and the shared ones) into the
shared experts' input of the next level; task ``k``'s experts at level ``l + 1`` read task ``k``'s mixture of
level ``l``. The last level is a CGC (no shared gate). ``levels = 1`` is exactly CGC.

Defaults (our choice; the paper tunes per dataset): ``levels = 2`` (PLE) / 1 (CGC), ``task_experts = 1``,
``shared_experts = 2``, experts are MLPs ``expert_hidden = (64,)`` → ``expert_size = 32``, ReLU; gates linear
on their level's input (the raw input at level 1, as the paper); linear heads (``head_hidden`` for towers).

**With a balancer.** ``.trunk`` holds all experts and gates. :meth:`PLE.shared_parameters` are the
parameters more than one task's loss reaches: the shared experts and shared gates of every level, and the
task experts of every level but the last (they feed the shared gate). Task gates and last-level task experts
are task-specific (:meth:`PLE.task_parameters`). ``features`` returned by ``forward`` (and the meaningful
``features=`` for ``gradients="features"``) are the **last level's shared-expert outputs** ``(B, m_s, D)``:
the one representation every task's gate reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..data.tasks import Task
from .base import MultiTaskModel, make_head, mlp

__all__ = ["PLE"]


def _experts(count: int, in_features: int, hidden: Sequence[int], out: int, act: str) -> nn.ModuleList:
    return nn.ModuleList(mlp(in_features, [*hidden, out], act=act) for _ in range(count))


def _run(experts: nn.ModuleList, x: Tensor) -> Tensor:
    return torch.stack([expert(x) for expert in experts], dim=1)  # (B, E, D)


def _mix(gate: nn.Module, gate_input: Tensor, experts: Tensor) -> Tensor:
    weights = torch.softmax(gate(gate_input), dim=-1)  # (B, E)
    return torch.einsum("be,bed->bd", weights, experts)


class _Level(nn.Module):
    """One extraction network: task experts, shared experts, task gates and (unless last) a shared gate."""

    def __init__(
        self,
        names: Sequence[str],
        in_features: int,
        task_experts: int,
        shared_experts: int,
        hidden: Sequence[int],
        size: int,
        act: str,
        last: bool,
    ) -> None:
        super().__init__()
        self.task_experts = nn.ModuleDict(
            {n: _experts(task_experts, in_features, hidden, size, act) for n in names}
        )
        self.shared_experts = _experts(shared_experts, in_features, hidden, size, act)
        self.task_gates = nn.ModuleDict(
            {n: nn.Linear(in_features, task_experts + shared_experts) for n in names}
        )
        total = len(names) * task_experts + shared_experts
        self.shared_gate = None if last else nn.Linear(in_features, total)
        self.names = list(names)

    def _task_experts(self, name: str) -> nn.ModuleList:
        experts = self.task_experts[name]
        assert isinstance(experts, nn.ModuleList)
        return experts

    def forward(
        self, task_inputs: dict[str, Tensor], shared_input: Tensor
    ) -> tuple[dict[str, Tensor], Tensor | None, Tensor]:
        """``({task: mixture}, shared mixture or None, shared expert outputs)``."""
        shared = _run(self.shared_experts, shared_input)
        own = {n: _run(self._task_experts(n), task_inputs[n]) for n in self.names}
        mixtures = {
            n: _mix(self.task_gates[n], task_inputs[n], torch.cat([own[n], shared], dim=1))
            for n in self.names
        }
        shared_mixture = None
        if self.shared_gate is not None:
            everything = torch.cat([*(own[n] for n in self.names), shared], dim=1)
            shared_mixture = _mix(self.shared_gate, shared_input, everything)
        return mixtures, shared_mixture, shared


class PLE(MultiTaskModel):
    """PLE (``levels >= 2``) or CGC (``levels = 1``) over flat inputs; see the module docstring."""

    def __init__(
        self,
        tasks: Sequence[Task],
        in_features: int,
        *,
        levels: int = 2,
        task_experts: int = 1,
        shared_experts: int = 2,
        expert_hidden: Sequence[int] = (64,),
        expert_size: int = 32,
        head_hidden: Sequence[int] = (),
        act: str = "relu",
    ) -> None:
        if levels < 1 or task_experts < 1 or shared_experts < 1 or expert_size < 1:
            raise ValueError(
                "levels, task_experts, shared_experts and expert_size must be >= 1, got "
                f"{levels}, {task_experts}, {shared_experts}, {expert_size}"
            )
        names = [t.name for t in tasks]
        trunk = nn.ModuleList(
            _Level(
                names,
                in_features if level == 0 else expert_size,
                task_experts,
                shared_experts,
                expert_hidden,
                expert_size,
                act,
                last=level == levels - 1,
            )
            for level in range(levels)
        )
        heads = nn.ModuleDict({t.name: make_head(t, expert_size, head_hidden, act) for t in tasks})
        super().__init__(tasks, trunk, heads, expert_size)
        self.levels = int(levels)

    def _levels(self) -> list[_Level]:
        trunk = self.trunk
        assert isinstance(trunk, nn.ModuleList)
        return [level for level in trunk if isinstance(level, _Level)]

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Shared experts and gates of every level, and task experts below the last level."""
        levels = self._levels()
        for index, level in enumerate(levels):
            yield from level.shared_experts.parameters()
            if level.shared_gate is not None:
                yield from level.shared_gate.parameters()
            if index < len(levels) - 1:
                yield from level.task_experts.parameters()

    def task_parameters(self) -> Iterator[nn.Parameter]:
        """Task gates of every level, last-level task experts, and the heads."""
        levels = self._levels()
        for level in levels:
            yield from level.task_gates.parameters()
        yield from levels[-1].task_experts.parameters()
        yield from self.heads.parameters()

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        flat = x.flatten(1)
        task_inputs = {t.name: flat for t in self.tasks}
        shared_input = flat
        shared_outputs = flat
        for level in self._levels():
            task_inputs, shared_mixture, shared_outputs = level(task_inputs, shared_input)
            if shared_mixture is not None:
                shared_input = shared_mixture
        predictions: dict[str, Tensor] = {}
        for task in self.tasks:
            prediction = self.heads[task.name](task_inputs[task.name])
            predictions[task.name] = prediction.squeeze(-1) if task.output_size == 1 else prediction
        return shared_outputs, predictions
