"""Krum (Blanchard, El Mhamdi, Guerraoui & Stainer, NeurIPS 2017), TorchJD's robust aggregator."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register

__all__ = ["Krum", "krum_weights"]


def krum_weights(gramian: Tensor, n_byzantine: int, n_selected: int) -> Tensor:
    """Krum's selection from the Gramian alone: ``‖g_i − g_j‖² = M_ii + M_jj − 2 M_ij``.

    Each row's score is the sum of its distances to its ``k − f − 2`` nearest other rows; the ``m``
    rows with the lowest scores get weight ``1/m`` each (``f = n_byzantine``, ``m = n_selected``).
    """
    k = gramian.shape[0]
    diagonal = gramian.diagonal()
    distances = (diagonal[None, :] + diagonal[:, None] - 2 * gramian).clamp_min(0.0).sqrt()
    nearest, _ = torch.topk(distances, k=k - n_byzantine - 1, largest=False)  # includes the row itself
    scores = nearest[:, 1:].sum(1)
    _, chosen = torch.topk(scores, k=n_selected, largest=False)
    return torch.zeros(k, dtype=gramian.dtype, device=gramian.device).index_fill(0, chosen, 1.0 / n_selected)


@register(
    "krum",
    family="gradient",
    feature_level="no",
    paper="Blanchard, El Mhamdi, Guerraoui & Stainer, 'Machine Learning with Adversaries: Byzantine Tolerant "
    "Gradient Descent', NeurIPS 2017; as TorchJD's Krum aggregator",
    description="Keep the task gradient(s) closest to their k − f − 2 nearest neighbours (robust).",
)
class Krum(GradientBalancer):
    """Krum / Multi-Krum (paper §4, Def. 1; TorchJD ``Krum(n_byzantine, n_selected)``), from the Gramian.

    Distances between task gradients come from the Gramian (``‖g_i − g_j‖² = M_ii + M_jj − 2M_ij``), so it
    runs on the Gramian engine. Score of task ``i``: the sum of its distances to its ``k − f − 2`` nearest
    other tasks; the ``n_selected`` lowest-scoring tasks share the update equally (``n_selected = 1``: Krum;
    ``> 1``: Multi-Krum). Defining property (tested): an outlying gradient is never selected.

    Defaults: ``n_byzantine = 0`` (our choice: TorchJD has no default; tasks are not adversaries, and
    ``f = 0`` still drops the most atypical gradients), ``n_selected = 1``.

    Our choices: Krum needs ``k ≥ f + 3`` present tasks (and ``k ≥ n_selected``); a step with fewer present
    tasks falls back to the mean of the present gradients and says so in ``extras["krum_fallback"]``
    (construction with fewer *tasks* than that raises). ``scale_heads = False``: as TorchJD's
    ``mtl_backward``, every head gets its own gradient (a weight-0 task would otherwise never train its head).

    Args:
        tasks: task names.
        n_byzantine: ``f >= 0``, the number of gradients assumed adversarial.
        n_selected: ``m >= 1``, how many gradients are averaged.
    """

    scale_heads = False

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        n_byzantine: int = 0,
        n_selected: int = 1,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if n_byzantine < 0 or n_selected < 1:
            raise ValueError(f"need n_byzantine >= 0 and n_selected >= 1, got {n_byzantine}, {n_selected}")
        needed = max(n_byzantine + 3, n_selected)
        if self.num_tasks < needed:
            raise ValueError(
                f"krum with n_byzantine={n_byzantine}, n_selected={n_selected} needs >= {needed} tasks, "
                f"got {self.num_tasks}; lower n_byzantine / n_selected or use 'trimmed-mean' or 'upgrad'"
            )
        self.n_byzantine = n_byzantine
        self.n_selected = n_selected

    def aggregate(self, step: GradientStep) -> Aggregation:
        gram = step.gramian
        k = gram.shape[0]
        if k < max(self.n_byzantine + 3, self.n_selected):
            weights = torch.full((k,), 1.0 / k, dtype=step.dtype, device=gram.device)
            return Aggregation(weights, extras={"krum_fallback": torch.ones((), device=gram.device)})
        weights = krum_weights(gram, self.n_byzantine, self.n_selected)
        return Aggregation(
            weights.to(step.dtype), extras={"krum_fallback": torch.zeros((), device=gram.device)}
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_byzantine={self.n_byzantine}, n_selected={self.n_selected}"
