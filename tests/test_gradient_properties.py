"""Family properties of the gradient methods, asserted on sampled Jacobians in TorchJD's ``_asserts`` style:
non-conflict where the paper claims it, permutation equivariance, and the documented scale behaviour
(including no float32 overflow at gradients of 1e20). Parametrised over ``available()``."""

from __future__ import annotations

import pytest
import torch

import taskbalance
from taskbalance.balancers.base import GradientStep

TASKS = ["a", "b", "c", "d"]
GRADIENT_METHODS = sorted(m.name for m in taskbalance.available() if m.family == "gradient")
RANDOM = {"pcgrad", "gradvac", "graddrop"}  # random visiting orders / masks: equivariant in law only
# Papers' claim: the update never conflicts with a task gradient (d·g_k >= 0).
NON_CONFLICTING = {"mgda", "mgda-ub", "upgrad", "dualproj"}
# Documented scale behaviour d(cJ) = c^degree d(J); Nash-MTL's bargaining solution is scale-free (degree 0).
DEGREE = {"nash-mtl": 0.0}
# Solver accuracy belongs to the solvers' slice of issue 10 (items 1-2); these fail today on the sampler.
SOLVER_GAPS = {("dualproj", "non-conflict"), ("upgrad", "non-conflict"), ("nash-mtl", "scale"),
               ("imtl", "1e20"), ("imtl-g", "1e20")}


def direction(name: str, jacobian: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
    level = "features" if taskbalance.method_info(name).feature_level == "only" else "parameters"
    extra = {"seed": 0} if name in RANDOM else {}
    balancer = taskbalance.make(name, TASKS, gradients=level, **extra)
    k = jacobian.shape[0]
    index = torch.arange(k) if perm is None else perm
    rows = jacobian if perm is None else jacobian[perm]
    losses = torch.linspace(1.0, 2.0, k, dtype=jacobian.dtype)
    step = GradientStep.of(rows, losses if perm is None else losses[perm], index)
    return balancer.aggregate(step).shared_update(rows)


def sampled_jacobians(count: int = 4) -> list[torch.Tensor]:
    """Conflicting rows of mixed norms (a row nearly opposed to another, one 30x larger)."""
    out = []
    for seed in range(count):
        g = torch.Generator().manual_seed(seed)
        jacobian = torch.randn(4, 24, generator=g)
        jacobian[1] = -0.8 * jacobian[0] + 0.3 * jacobian[1]
        jacobian[3] = 30.0 * jacobian[3]
        out.append(jacobian)
    return out


def _gap(name: str, prop: str) -> None:
    if (name, prop) in SOLVER_GAPS:
        pytest.xfail(f"{name}: solver tolerance (issue 10, items 1-2)")


@pytest.mark.parametrize("name", sorted(NON_CONFLICTING & set(GRADIENT_METHODS)))
def test_update_does_not_conflict_with_any_task(name):
    _gap(name, "non-conflict")
    for jacobian in sampled_jacobians():
        d = direction(name, jacobian.double())
        assert float((jacobian.double() @ d).min()) >= -1e-9 * float(d.norm() * jacobian.double().norm())


@pytest.mark.parametrize("name", sorted(set(GRADIENT_METHODS) - RANDOM))
def test_permuting_the_tasks_leaves_the_update_unchanged(name):
    perm = torch.tensor([2, 0, 3, 1])
    for jacobian in sampled_jacobians(2):
        d = direction(name, jacobian.double())
        torch.testing.assert_close(direction(name, jacobian.double(), perm), d, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_scaling_the_gradients_scales_the_update_as_documented(name):
    _gap(name, "scale")
    degree = DEGREE.get(name, 1.0)
    for c in (1e3, 1e-2):
        for jacobian in sampled_jacobians(2):
            d = direction(name, jacobian.double())
            scaled = direction(name, c * jacobian.double())
            # atol: the methods' eps (1e-8, added to norms) is not scale-free
            torch.testing.assert_close(scaled, c**degree * d, rtol=1e-4, atol=1e-6 * float(d.norm()))


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_float32_gradients_of_1e20_do_not_overflow(name):
    _gap(name, "scale")
    _gap(name, "1e20")
    degree = DEGREE.get(name, 1.0)
    jacobian = sampled_jacobians(1)[0]
    d = direction(name, jacobian)
    big = direction(name, 1e20 * jacobian)
    assert bool(torch.isfinite(big).all()), f"{name}: non-finite update at gradients of 1e20"
    expected = d.double()
    torch.testing.assert_close(big.double() / 1e20**degree, expected, rtol=1e-3, atol=1e-5 * float(d.norm()))
