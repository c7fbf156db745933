"""OL-AUX — online learning of auxiliary-task weights (Lin, Baweja, Kantor & Held, NeurIPS 2019)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ...auxiliary.roles import resolve_roles
from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register
from .gcs import target_cosines_from_gramian

__all__ = ["OnlineAuxiliaryWeighting"]

Similarity = Literal["cosine", "dot"]


@register(
    "ol-aux",
    family="gradient",
    paper="Lin et al., 'Adaptive Auxiliary Task Weighting for Reinforcement Learning', NeurIPS 2019; "
    "as bundled with ForkMerge (Jiang et al., NeurIPS 2023)",
    description="Auxiliary weights move by the accumulated similarity of their gradient with the target's.",
    feature_level="yes",
)
class OnlineAuxiliaryWeighting(GradientBalancer):
    """OL-AUX: auxiliary weights follow the running agreement of their gradients with the target gradient.

    As implemented in the LibMTL copy bundled with ForkMerge (``LibMTL/weighting/OLAUX.py``;
    ``docs/method-notes.md`` §3.5), a cosine version of Lin et al.'s online rule (their Eq. for the weight
    gradient ``∇_w L_main = −η Σ ∇L_main^T ∇L_aux``, accumulated over N steps). Per step, with
    ``c_k = cos(g_k, g_m)``:

    1. accumulate ``a_k ← a_k + β c_k`` for each auxiliary task;
    2. every ``update_every`` steps (the 5th, 10th, …): ``w_k ← w_k + a_k`` and ``a_k ← 0``;
    3. shared update ``Σ_k w_k g_k`` with the (possibly just updated) weights; targets keep ``w = 1``.

    Defaults (reference): ``beta=0.5``, ``update_every=5``, initial weights 1. The weights are not clipped,
    as in the reference: an auxiliary task that keeps disagreeing with the target can reach a negative weight.

    **Our choices**: any number of tasks (the reference hard-codes 3); several targets use the summed target
    gradient as ``g_m``; ``similarity="dot"`` accumulates ``β ⟨g_k, g_m⟩`` instead, as in Lin et al.'s paper
    (the cosine is ForkMerge's); a task absent from a step accumulates nothing; a zero gradient gives
    cosine 0; heads receive their own unscaled gradient, as in the reference (``scale_heads=False``);
    ``gradients="features"`` is an extension. The accumulator is kept on the device in the weights' dtype
    (the reference accumulates Python floats), and the "every 5 steps" counter is the Python step count, so
    no step reads the device.

    State (``state_dict``): ``weights`` and ``accumulated`` buffers, and the step count.
    """

    scale_heads = False
    target_mask: Tensor
    weights: Tensor
    accumulated: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        targets: Sequence[str] | None = None,
        main: str | None = None,
        beta: float = 0.5,
        update_every: int = 5,
        similarity: Similarity = "cosine",
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if not beta > 0:
            raise ValueError(f"ol-aux: beta must be > 0, got {beta}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"ol-aux: update_every must be a positive integer, got {update_every!r}")
        if similarity not in ("cosine", "dot"):
            raise ValueError(f"ol-aux: similarity must be 'cosine' or 'dot', got {similarity!r}")
        self.roles = resolve_roles(self.tasks, targets=targets, main=main, method="ol-aux")
        self.beta = float(beta)
        self.update_every = update_every
        self.similarity: Similarity = similarity
        mask = torch.zeros(self.num_tasks, dtype=torch.bool)
        mask[list(self.roles.target_index)] = True
        self.register_buffer("target_mask", mask, persistent=False)
        self.register_buffer("weights", torch.ones(self.num_tasks))
        self.register_buffer("accumulated", torch.zeros(self.num_tasks))

    def aggregate(self, step: GradientStep) -> Aggregation:
        index = step.index
        is_target = self.target_mask[index]
        if self.similarity == "cosine":
            similarity = target_cosines_from_gramian(step.gramian, is_target)
        else:
            similarity = step.gramian @ is_target.to(step.gramian.dtype)
        increment = torch.where(is_target, torch.zeros_like(similarity), self.beta * similarity)
        self.accumulated.index_add_(0, index, increment.to(self.accumulated.dtype))
        if (self.step_count + 1) % self.update_every == 0:
            self.weights.add_(self.accumulated)
            self.accumulated.zero_()
        weights = self.weights[index].to(step.dtype)
        return Aggregation(weights=weights, extras={"similarity": similarity.detach()})

    def extra_repr(self) -> str:
        return (
            f"tasks={list(self.tasks)}, targets={list(self.roles.targets)}, beta={self.beta}, "
            f"update_every={self.update_every}, similarity={self.similarity!r}"
        )
