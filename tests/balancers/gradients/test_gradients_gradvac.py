"""GradVac: corrections reach the similarity target, zero targets reproduce PCGrad, EMA targets, resume."""

from __future__ import annotations

import pytest
import torch
from test_gradients_pcgrad import TASKS, assert_resume_bit_exact, grads_of, orders_for, sample_jacobians
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance
from taskbalance import GradientStep
from taskbalance.balancers.gradients.gradvac import GradVac, vaccinate
from taskbalance.balancers.gradients.pcgrad import PCGrad, project_conflicting

F64 = torch.float64


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b / (a.norm() * b.norm())


@pytest.mark.parametrize("label,jacobian", list(sample_jacobians()))
def test_zero_targets_give_pcgrad_projection(label, jacobian):
    k = jacobian.shape[0]
    orders = orders_for(k, seed=4)
    gramian = jacobian @ jacobian.T
    coefficients, _ = vaccinate(gramian, orders, torch.zeros(k, k, dtype=F64), beta=0.5, eps=0.0)
    expected = project_conflicting(gramian, orders)
    scale = float(jacobian.norm(dim=1).max()) or 1.0
    torch.testing.assert_close(coefficients @ jacobian, expected @ jacobian, rtol=1e-7, atol=1e-7 * scale)


def test_first_step_of_the_balancer_equals_pcgrad_with_the_same_seed():
    jacobian = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    names = list("abcde")
    vac = GradVac(names, seed=11).aggregate(GradientStep.of(jacobian))
    pc = PCGrad(names, seed=11).aggregate(GradientStep.of(jacobian))
    torch.testing.assert_close(vac.weights @ jacobian, pc.weights @ jacobian, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", [0.3, 0.0, -0.2, 0.9])
def test_a_correction_lifts_the_similarity_exactly_to_its_target(target):
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        jacobian = torch.randn(2, 7, generator=g, dtype=F64) * torch.tensor([[1.0], [5.0]], dtype=F64)
        targets = torch.full((2, 2), target, dtype=F64)
        coefficients, _ = vaccinate(jacobian @ jacobian.T, orders_for(2, 0), targets, beta=0.5, eps=0.0)
        rows = coefficients @ jacobian
        for i, j in ((0, 1), (1, 0)):
            before = cosine(jacobian[i], jacobian[j])
            after = cosine(rows[i], jacobian[j])
            if before < target:
                torch.testing.assert_close(after, torch.tensor(target, dtype=F64), rtol=0, atol=1e-10)
            else:
                assert torch.equal(rows[i], jacobian[i])  # already similar enough: untouched


def test_targets_follow_an_ema_of_the_observed_similarity():
    jacobian = torch.randn(2, 6, generator=torch.Generator().manual_seed(2), dtype=F64)
    balancer = GradVac(["a", "b"], beta=0.25, seed=0).double()
    balancer.aggregate(GradientStep.of(jacobian))
    similarity = cosine(jacobian[0], jacobian[1])
    expected = 0.25 * similarity  # from ρ̂ = 0; with two tasks each row visits the other first
    torch.testing.assert_close(balancer.targets, torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64) * expected)
    balancer.aggregate(GradientStep.of(jacobian))
    # second step: g'_i starts from g_i again, so the observed similarity is the same
    torch.testing.assert_close(balancer.targets[0, 1], 0.75 * expected + 0.25 * similarity)


def test_on_correction_updates_only_corrected_pairs():
    jacobian = torch.tensor([[1.0, 0.2], [0.9, 0.1]], dtype=F64)  # similar: never below a zero target
    balancer = GradVac(["a", "b"], update_targets="on_correction", seed=0).double()
    aggregation = balancer.aggregate(GradientStep.of(jacobian))
    assert torch.equal(balancer.targets, torch.zeros(2, 2, dtype=F64))
    torch.testing.assert_close(aggregation.weights, torch.ones(2, dtype=F64))
    always = GradVac(["a", "b"], seed=0).double()
    always.aggregate(GradientStep.of(jacobian))
    assert bool((always.targets[~torch.eye(2, dtype=torch.bool)] > 0).all())


def test_targets_below_every_similarity_leave_the_plain_sum():
    jacobian = torch.randn(4, 9, generator=torch.Generator().manual_seed(3))
    balancer = GradVac(list("abcd"), seed=0)
    balancer.targets.fill_(-1.0)
    aggregation = balancer.aggregate(GradientStep.of(jacobian))
    torch.testing.assert_close(aggregation.weights, torch.ones(4))


@pytest.mark.parametrize("label,jacobian", list(sample_jacobians(seed=5)))
def test_degenerate_jacobians_give_finite_updates_and_targets(label, jacobian):
    k = jacobian.shape[0]
    balancer = GradVac([f"t{i}" for i in range(k)], seed=0).double()
    for _ in range(3):
        aggregation = balancer.aggregate(GradientStep.of(jacobian))
        assert bool(torch.isfinite(aggregation.weights).all()), label
    assert bool(torch.isfinite(balancer.targets).all()) and bool((balancer.targets.abs() <= 1 + 1e-9).all())


def test_a_missing_task_keeps_its_targets():
    balancer = GradVac(TASKS, seed=0)
    balancer.aggregate(GradientStep.of(torch.randn(3, 5), torch.ones(3), torch.arange(3)))
    before = balancer.targets.clone()
    balancer.aggregate(GradientStep.of(torch.randn(2, 5), torch.ones(2), torch.tensor([0, 2])))
    assert torch.equal(balancer.targets[1], before[1]) and torch.equal(balancer.targets[:, 1], before[:, 1])
    assert not torch.equal(balancer.targets[0, 2], before[0, 2])


def test_backward_fills_shared_grads_with_the_vaccinated_sum_and_heads_with_plain_gradients():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    _, losses = toy_losses(model, x, y)
    sum(losses.values()).backward(retain_graph=True)
    plain_heads = {n: g for n, g in grads_of(model).items() if n.startswith("heads")}
    shared = list(model.trunk.parameters())
    rows = [torch.autograd.grad(losses[t], shared, retain_graph=True) for t in TASKS]
    jacobian = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows])
    model.zero_grad(set_to_none=True)
    record = taskbalance.make("gradvac", TASKS, seed=0).backward(losses, shared=shared)
    got = grads_of(model)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), record.weights @ jacobian)
    for name, expected in plain_heads.items():
        torch.testing.assert_close(got[name], expected)


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="beta"):
        taskbalance.make("gradvac", TASKS, beta=1.5)
    with pytest.raises(ValueError, match="eps"):
        taskbalance.make("gradvac", TASKS, eps=-1.0)
    with pytest.raises(ValueError, match="update_targets"):
        taskbalance.make("gradvac", TASKS, update_targets="sometimes")


def test_resume_is_bit_exact():
    assert_resume_bit_exact("gradvac", seed=2)
