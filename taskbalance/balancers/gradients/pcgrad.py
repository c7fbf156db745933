"""PCGrad — projecting conflicting gradients (Yu, Kumar, Gupta, Levine, Hausman & Finn, NeurIPS 2020).

Also home of the two helpers the other projection methods (GradVac, GradDrop) share: a private, seeded
random stream whose state round-trips through ``state_dict`` (:class:`RandomStateMixin`) and per-task random
visiting orders (:func:`random_orders`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register

__all__ = ["PCGrad", "RandomStateMixin", "random_orders", "project_conflicting"]


class RandomStateMixin:
    """A private ``torch.Generator`` (on the CPU) whose state is saved in ``state_dict``.

    The generator lives on the CPU whatever the model's device: it draws only a few numbers per step, which
    are then copied to the device (host → device, no synchronisation), and its state stays valid when a
    checkpoint moves between devices. ``seed=None`` draws the seed from the global torch RNG once, at
    construction, so ``torch.manual_seed`` makes a run reproducible.
    """

    generator: torch.Generator
    seed: int

    def _init_random(self, seed: int | None) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.long))  # construction only, not per step
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.seed = seed
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    @property
    def rng_state(self) -> Tensor:
        """The generator's state (a CPU ``uint8`` tensor); listed in ``extra_state_fields``."""
        return self.generator.get_state()

    @rng_state.setter
    def rng_state(self, state: Tensor) -> None:
        self.generator.set_state(state.to(device="cpu", dtype=torch.uint8))


def random_orders(k: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """For each task ``i``, the other ``k − 1`` tasks in a uniformly random order: a ``(k, k−1)`` long tensor.

    Drawn as one ``k × k`` block of uniforms (the diagonal pushed last) and sorted row-wise, so the cost is
    one call whatever ``k``.
    """
    scores = torch.rand(k, k, generator=generator)
    scores.fill_diagonal_(2.0)  # uniforms are < 1: task i sorts last and is cut off
    return scores.argsort(dim=1)[:, : k - 1].to(device, non_blocking=True)


def project_conflicting(gramian: Tensor, orders: Tensor) -> Tensor:
    """PCGrad's projections, expressed on the Gramian.

    Args:
        gramian: ``(k, k)`` matrix ``G Gᵀ`` of the task gradients.
        orders: ``(k, k−1)`` long; row ``i``: the tasks ``j ≠ i`` in the order ``g_i`` is projected on them.

    Returns:
        The ``(k, k)`` coefficient matrix ``C`` with projected gradient ``g'_i = Σ_j C[i, j] g_j``.

    Each step handles one position of every task's order at once (``k − 1`` batched steps, not ``k²`` Python
    iterations): the projection of the ``i``-th row is sequential in ``j`` but independent across ``i``. The
    inner products ``g'_i · g_j`` are carried as ``C @ gramian`` and updated in ``O(k²)`` per step.
    """
    k = gramian.shape[0]
    coefficients = torch.eye(k, dtype=gramian.dtype, device=gramian.device)
    inner = gramian.clone()  # inner[i, j] = g'_i · g_j
    squared_norms = gramian.diagonal()
    rows = torch.arange(k, device=gramian.device)
    for position in range(orders.shape[1]):  # k − 1 steps, each batched over all tasks i
        j = orders[:, position]
        dot = inner[rows, j]
        norm_j = squared_norms[j]
        conflict = (dot < 0) & (norm_j > 0)  # a zero g_j has no conflict (dot = 0)
        shift = torch.where(conflict, -dot / torch.where(norm_j > 0, norm_j, torch.ones_like(norm_j)), 0.0)
        coefficients.index_put_((rows, j), shift, accumulate=True)
        inner = inner + shift[:, None] * gramian[j]
    return coefficients


@register(
    "pcgrad",
    family="gradient",
    feature_level="no",
    paper="Yu et al., 'Gradient Surgery for Multi-Task Learning', NeurIPS 2020 (arXiv:2001.06782)",
    description="Project each task gradient onto the normal plane of the gradients it conflicts with.",
)
class PCGrad(RandomStateMixin, GradientBalancer):
    """PCGrad (Yu et al., 2020, Algorithm 1).

    For every task ``i``, starting from ``g'_i = g_i`` and visiting the other tasks ``j`` in a random order:
    if ``g'_i · g_j < 0``, ``g'_i ← g'_i − (g'_i · g_j) / ‖g_j‖² · g_j``. The shared update is ``Σ_i g'_i``.
    Every ``g'_i`` is a combination of the original rows, so the update is ``w @ G`` with
    ``w = 1ᵀ C`` (:func:`project_conflicting`); ``record.weights`` reports these effective coefficients and
    ``record.extras["coefficients"]`` the ``k × k`` matrix ``C`` (row ``i`` gives ``g'_i``).

    Choices:

    * no hyperparameters in the paper; LibMTL's defaults agree. ``j = i`` is skipped (the paper's
      ``j ≠ i``; LibMTL also visits ``i`` itself, which is a no-op unless earlier projections turned
      ``g'_i`` against ``g_i``);
    * **our choice:** the division is by ``‖g_j‖²`` exactly (no ``+1e-8``); a zero ``g_j`` never conflicts,
      so it is never divided by;
    * each task draws its own random order every step (the paper's shuffle; LibMTL and TorchJD do the same),
      from a private generator seeded by ``seed`` (see :class:`RandomStateMixin`);
    * ``scale_heads = False``: task-specific parameters get their plain gradient ``∇L_k``, as in the
      reference code, where the surgery touches only the shared parameters;
    * parameter-level gradients only (LibMTL refuses ``rep_grad`` for PCGrad).

    Cost: the Gramian ``G Gᵀ`` plus ``k − 1`` batched steps on ``k × k`` matrices; no host synchronisation.
    """

    scale_heads = False
    extra_state_fields = ("rng_state",)

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        seed: int | None = None,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        self._init_random(seed)

    def aggregate(self, step: GradientStep) -> Aggregation:
        orders = random_orders(step.num_tasks, self.generator, step.device)
        coefficients = project_conflicting(step.gramian, orders)
        weights = coefficients.sum(dim=0).to(step.dtype)
        return Aggregation(weights=weights, extras={"coefficients": coefficients})

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}"
