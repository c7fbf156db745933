"""A sampler of hard per-task Jacobians, shared by the solver reference tests and the contract suite.

Every kind is a ``(k, width)`` float64 matrix whose rows are task gradients that real training produces and
that break naive solvers::

    from hard_jacobians import KINDS, hard_jacobian, hard_cases

    j = hard_jacobian("badly_scaled", k=10, seed=0)         # one matrix
    for case in hard_cases(ks=(1, 3, 40), seeds=(0, 1)):     # every kind × k × seed
        case.id, case.kind, case.k, case.seed, case.jacobian

Kinds (with ``k = 1`` every kind but ``zero`` is a single random row):

* ``random``: i.i.d. Gaussian rows (full rank while ``k ≤ width``);
* ``rank_deficient``: rows drawn from a 2-dimensional subspace (rank 2 whatever ``k``);
* ``duplicate``: row 1 (and row 2) repeat row 0 exactly;
* ``opposed``: row 1 is ``−row 0`` (a fully conflicting pair: 0 lies in the rows' convex hull);
* ``zero``: row 0 is exactly zero (a task whose loss does not reach the shared part);
* ``badly_scaled``: random directions, row norms log-spaced over 4 orders of magnitude (1e-2 … 1e2);
* ``mixed``: norms over 6 orders (1e-3 … 1e3) with a duplicate and a near-opposed row and a shared
  component (aligned tasks), the worst of the above at once.

``width`` defaults to 48, above the largest ``k`` (40) tested, so ``random`` is full rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["KINDS", "HardCase", "hard_jacobian", "hard_cases", "has_opposed_rows"]

KINDS = ("random", "rank_deficient", "duplicate", "opposed", "zero", "badly_scaled", "mixed")
KS = (1, 2, 3, 5, 10, 40)


@dataclass(frozen=True)
class HardCase:
    kind: str
    k: int
    seed: int
    jacobian: torch.Tensor

    @property
    def id(self) -> str:
        return f"{self.kind}-k{self.k}-s{self.seed}"


def hard_jacobian(kind: str, k: int, seed: int = 0, width: int = 48) -> torch.Tensor:
    """One ``(k, width)`` float64 Jacobian of the given kind (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    g = torch.Generator().manual_seed(1000 * seed + 7 * k + KINDS.index(kind))
    j = torch.randn(k, width, generator=g, dtype=torch.float64)
    if kind == "rank_deficient":
        basis = torch.randn(2, width, generator=g, dtype=torch.float64)
        j = torch.randn(k, 2, generator=g, dtype=torch.float64) @ basis
    elif kind == "duplicate" and k >= 2:
        j[1] = j[0]
        if k >= 3:
            j[2] = j[0]
    elif kind == "opposed" and k >= 2:
        j[1] = -j[0]
    elif kind == "zero":
        j[0] = 0.0
    elif kind == "badly_scaled":
        j = _with_norms(j, torch.logspace(-2, 2, k, dtype=torch.float64), g)
    elif kind == "mixed":
        j = j + 2.0 * torch.randn(1, width, generator=g, dtype=torch.float64)
        if k >= 3:
            j[1] = j[0]
            j[2] = -j[0] + 0.05 * torch.randn(width, generator=g, dtype=torch.float64)
        j = _with_norms(j, torch.logspace(-3, 3, k, dtype=torch.float64), g)
    return j


def _with_norms(j: torch.Tensor, norms: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Rows rescaled to the given norms, assigned to rows in a seeded random order."""
    order = torch.randperm(j.shape[0], generator=g)
    return j / j.norm(dim=1, keepdim=True).clamp_min(1e-300) * norms[order][:, None]


def hard_cases(
    ks: Iterable[int] = KS, seeds: Iterable[int] = (0,), kinds: Iterable[str] = KINDS, width: int = 48
) -> Iterator[HardCase]:
    """Every ``kind × k × seed`` combination, as :class:`HardCase` (use ``case.id`` as a pytest id)."""
    seeds = tuple(seeds)
    for kind in kinds:
        for k in ks:
            for seed in seeds:
                yield HardCase(kind, k, seed, hard_jacobian(kind, k, seed, width))


def has_opposed_rows(kind: str, k: int) -> bool:
    """Whether the kind puts 0 in (or within 5 % of) the rows' convex hull at this ``k``."""
    return (kind == "opposed" and k >= 2) or (kind == "mixed" and k >= 3)
