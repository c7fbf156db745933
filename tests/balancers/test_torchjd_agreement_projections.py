"""Numerical agreement with TorchJD's PCGrad, GradVac and GradDrop aggregators on sampled matrices.

TorchJD draws its random orders / uniforms from the global torch RNG; ours come from a private seeded
generator. The orders are made to match by replaying TorchJD's ``torch.randperm`` calls from the same global
seed and handing them to our batched kernels; for GradDrop our generator is seeded like TorchJD's global one,
so the uniforms are the same. With two tasks the projections do not depend on the order at all, so there the
balancers are compared as users call them.

Error measure: ``max |ours − theirs| / max |theirs|`` per matrix (max-norm relative error), float32 inputs.
"""

from __future__ import annotations

import pytest
import torch
from torchjd.aggregation import GradDrop as TorchJDGradDrop
from torchjd.aggregation import GradVac as TorchJDGradVac
from torchjd.aggregation import PCGrad as TorchJDPCGrad

from taskbalance import GradientStep
from taskbalance.balancers.gradients.graddrop import GradDrop
from taskbalance.balancers.gradients.gradvac import GradVac, vaccinate
from taskbalance.balancers.gradients.pcgrad import PCGrad, project_conflicting

SAMPLES = 120
TOLERANCE = 1e-4


def sampled_matrix(seed: int, tasks: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A random k × P matrix (k = ``tasks``, else 1..8) with rows of very different norms and a shared
    direction of random strength, so that some pairs conflict and some agree."""
    g = torch.Generator().manual_seed(seed)
    k = tasks if tasks is not None else int(torch.randint(1, 9, (), generator=g))
    p = int(torch.randint(2, 40, (), generator=g))
    common = torch.randn(1, p, generator=g)
    rows = torch.randn(k, p, generator=g) + torch.rand(k, 1, generator=g) * common
    return (rows * torch.exp(1.5 * torch.randn(k, 1, generator=g))).to(dtype)


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(torch.finfo(theirs.dtype).tiny))


def torchjd_pcgrad_orders(k: int) -> torch.Tensor:
    """The orders TorchJD's PCGrad draws next from the global RNG: ``randperm(k)`` per task, ``i`` skipped."""
    orders = []
    for i in range(k):
        orders.append([j for j in torch.randperm(k).tolist() if j != i])
    return torch.tensor(orders, dtype=torch.long).reshape(k, k - 1)


def torchjd_gradvac_orders(k: int) -> torch.Tensor:
    """The orders TorchJD's GradVac draws next: one ``randperm(k − 1)`` over the other tasks, per task."""
    orders = []
    for i in range(k):
        others = [j for j in range(k) if j != i]
        orders.append([others[q] for q in torch.randperm(k - 1).tolist()])
    return torch.tensor(orders, dtype=torch.long).reshape(k, k - 1)


def test_pcgrad_matches_torchjd_with_the_same_orders():
    errors = []
    for seed in range(SAMPLES):
        matrix = sampled_matrix(seed)
        torch.manual_seed(seed)
        orders = torchjd_pcgrad_orders(matrix.shape[0])
        torch.manual_seed(seed)
        theirs = TorchJDPCGrad()(matrix)
        ours = project_conflicting(matrix @ matrix.T, orders).sum(dim=0) @ matrix
        errors.append(relative_error(ours, theirs))
    assert max(errors) <= TOLERANCE


def test_pcgrad_balancer_matches_torchjd_for_two_tasks_whatever_the_seed():
    errors = []
    for seed in range(SAMPLES):
        matrix = sampled_matrix(seed, tasks=1 if seed % 7 == 0 else 2)
        k = matrix.shape[0]
        aggregation = PCGrad([f"t{i}" for i in range(k)], seed=seed + 1).aggregate(GradientStep.of(matrix))
        errors.append(relative_error(aggregation.weights @ matrix, TorchJDPCGrad()(matrix)))
    assert max(errors) <= TOLERANCE


@pytest.mark.parametrize("beta", [0.5, 0.1])
def test_gradvac_matches_torchjd_over_a_stateful_sequence(beta):
    errors = []
    for run in range(SAMPLES // 4):
        k = int(torch.randint(2, 7, (), generator=torch.Generator().manual_seed(run)))
        theirs_aggregator = TorchJDGradVac(beta=beta)
        targets = torch.zeros(k, k)
        for step in range(4):  # targets carry over: the EMA state must agree too
            matrix = sampled_matrix(1000 * run + step, tasks=k)
            torch.manual_seed(run * 10 + step)
            orders = torchjd_gradvac_orders(k)
            torch.manual_seed(run * 10 + step)
            theirs = theirs_aggregator(matrix)
            coefficients, targets = vaccinate(matrix @ matrix.T, orders, targets, beta=beta, eps=1e-8)
            errors.append(relative_error(coefficients.sum(dim=0) @ matrix, theirs))
    assert len(errors) >= 100 and max(errors) <= TOLERANCE


def test_gradvac_balancer_matches_torchjd_for_two_tasks_over_steps():
    theirs_aggregator = TorchJDGradVac()
    balancer = GradVac(["a", "b"], seed=0)
    errors = []
    for step in range(SAMPLES):
        matrix = sampled_matrix(step, tasks=2)
        ours = balancer.aggregate(GradientStep.of(matrix))
        errors.append(relative_error(ours.weights @ matrix, theirs_aggregator(matrix)))
    assert len(errors) >= 100 and max(errors) <= TOLERANCE


@pytest.mark.parametrize("leak", [None, 0.3])
def test_graddrop_matches_torchjd_with_the_same_uniforms(leak):
    errors = []
    for seed in range(SAMPLES):
        matrix = sampled_matrix(seed)
        k = matrix.shape[0]
        torch.manual_seed(seed)
        theirs = TorchJDGradDrop(leak=None if leak is None else torch.full((k,), leak))(matrix)
        balancer = GradDrop([f"t{i}" for i in range(k)], seed=seed, leak=0.0 if leak is None else leak)
        ours = balancer.aggregate(GradientStep.of(matrix)).direction
        errors.append(relative_error(ours, theirs))
    assert max(errors) <= TOLERANCE
