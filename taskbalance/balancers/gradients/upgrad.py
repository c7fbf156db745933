"""UPGrad (Quinton & Rey, 'Jacobian Descent for Multi-Objective Optimization', 2024, arXiv:2406.16232)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..base import Aggregation, GradientBalancer, GradientLevel, GradientStep
from ..inputs import NonFinitePolicy
from ..registry import register
from ._host_solvers import dual_cone_np
from ._solvers import dual_cone_weights, finite_or_nan, host_array, nan_unless, on_host, warn_if_capped

__all__ = ["UPGrad"]

_CONSTANTS: dict[tuple, Tensor] = {}


def _constant(name: str, k: int, like: Tensor, make: Callable[[], Tensor]) -> Tensor:
    """A read-only constant per ``(name, k, dtype, device)``, made once (not a per-step allocation)."""
    key = (name, k, like.dtype, like.device)
    value = _CONSTANTS.get(key)
    if value is None:
        if len(_CONSTANTS) > 64:
            _CONSTANTS.clear()
        value = _CONSTANTS[key] = make()
    return value


@register(
    "upgrad",
    family="gradient",
    feature_level="no",
    paper="Quinton & Rey, 'Jacobian Descent for Multi-Objective Optimization', 2024 (arXiv:2406.16232)",
    description="Project each scaled task gradient onto the dual cone of all gradients, then sum.",
)
class UPGrad(GradientBalancer):
    """UPGrad (paper Eq. 4 / TorchJD ``UPGrad``): ``Σ_i π_J(g_i / k)``, each projected onto the dual cone.

    In weight space (paper Prop. 1): for each ``u = e_i / k`` solve ``min_v vᵀMv`` s.t. ``v ≥ u`` on the
    conditioned Gramian ``M / tr M + reg_eps·I`` (``0 + reg_eps·I`` if ``tr M < norm_eps``); weights are the
    sum of the ``k`` solutions. Defaults ``norm_eps = reg_eps = 1e-4`` (TorchJD, LibMTL). The ``k`` problems
    are solved in one batched active-set call on device (instead of ``k`` quadprog calls). The result has a
    non-negative inner product with every task gradient (up to the ``reg_eps`` conditioning). The active-set
    iteration stops when the active set repeats (KKT exact) on CPU, or after ``iters`` iterations (``0``:
    ``2k + 10``; the fixed budget on accelerators; a CPU solve that hits it warns once).

    ``scale_heads = False``: TorchJD's ``mtl_backward`` gives every head its own gradient.
    ``feature_level = "no"``: LibMTL refuses ``rep_grad`` for UPGrad.
    """

    scale_heads = False

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        norm_eps: float = 1e-4,
        reg_eps: float = 1e-4,
        iters: int = 0,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, gradients=gradients, on_nonfinite=on_nonfinite)
        if norm_eps < 0 or reg_eps < 0:
            raise ValueError(f"norm_eps and reg_eps must be >= 0, got {norm_eps}, {reg_eps}")
        if iters < 0:
            raise ValueError(f"iters must be >= 0 (0 = automatic), got {iters}")
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps
        self.iters = iters

    def aggregate(self, step: GradientStep) -> Aggregation:
        if on_host(step.gramian):
            return self._aggregate_on_host(step)
        gram, finite = finite_or_nan(step.gramian)
        k = gram.shape[0]
        preferences = self._preferences(k, gram)
        projected, converged = dual_cone_weights(
            gram, preferences, iters=self.iters, norm_eps=self.norm_eps, reg_eps=self.reg_eps
        )
        converged = converged.all()
        warn_if_capped(self, converged, f"{self.info.name}'s dual-cone solver", "iters", finite=finite)
        weights = projected.sum(0) if projected.dim() == 2 else projected
        return Aggregation(nan_unless(finite, weights).to(step.dtype), extras={"solver_converged": converged})

    def _aggregate_on_host(self, step: GradientStep) -> Aggregation:
        """:meth:`aggregate` on CPU, in NumPy from the Gramian to the weights (the same operations as the
        tensor path: a non-finite Gramian is solved as the identity and gives NaN weights)."""
        gram = host_array(step.gramian)
        k = gram.shape[0]
        finite = bool(np.isfinite(gram).all())
        preferences = host_array(self._preferences(k, step.gramian))
        projected, converged = dual_cone_np(
            gram if finite else np.eye(k), preferences, self.iters, self.norm_eps, self.reg_eps
        )
        solved = bool(converged.all())
        warn_if_capped(self, solved, f"{self.info.name}'s dual-cone solver", "iters", finite=finite)
        weights = torch.from_numpy(projected.sum(0) if projected.ndim == 2 else projected)
        if not finite:
            weights = torch.full_like(weights, float("nan"))
        return Aggregation(weights.to(step.dtype), extras={"solver_converged": torch.tensor(solved)})

    def _preferences(self, k: int, gram: Tensor) -> Tensor:
        """The weight vectors projected onto the dual cone: ``e_i / k`` for every task (UPGrad)."""
        return _constant("upgrad", k, gram, lambda: torch.eye(k, dtype=gram.dtype, device=gram.device) / k)
