"""GLS (Chennupati et al. 2019): L = (Π_k L_k)^{1/K}, computed in log space."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchjd.scalarization import GeometricMean
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance

TASKS = ["a", "b", "c"]


def test_model_gradient_equals_the_gradient_of_the_geometric_mean():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS, scales={"c": 30.0})
    _, losses = toy_losses(model, x, y)
    torch.stack([losses[t] for t in TASKS]).prod().pow(1 / 3).backward()  # LibMTL's formula, literally
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _, losses = toy_losses(model, x, y)
    taskbalance.make("gls", TASKS).backward(losses)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(1e-6, 1e6), min_size=3, max_size=3))
def test_value_and_implied_weights_agree_with_torchjd_geometric_mean(values):
    losses = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    reference = losses.detach().clone().requires_grad_(True)
    total, weights = taskbalance.make("gls", TASKS).objective(losses, torch.ones(3, dtype=torch.bool))
    expected = GeometricMean()(reference)
    torch.testing.assert_close(total, expected)
    expected.backward()
    torch.testing.assert_close(weights, reference.grad)
    torch.testing.assert_close(weights, expected.detach() / (3 * losses.detach()))  # L / (K L_k)


def test_log_space_survives_products_that_overflow_or_underflow():
    names = ["a", "b", "c", "d", "e"]
    balancer = taskbalance.make("gls", names)
    big = {t: torch.tensor(1e30, requires_grad=True) for t in names}  # product 1e150: inf in float32
    small = {t: torch.tensor(1e-10, requires_grad=True) for t in names}  # product 1e-50: 0 in float32
    assert not torch.isfinite(torch.tensor(1e30) ** 5) and torch.tensor(1e-10) ** 5 == 0
    torch.testing.assert_close(balancer.backward(big).weights, torch.full((5,), 1 / 5))
    torch.testing.assert_close(balancer.backward(small).weights, torch.full((5,), 1 / 5))


def test_zero_loss_and_missing_tasks_stay_finite():
    balancer = taskbalance.make("gls", TASKS)
    losses = {"a": torch.tensor(0.0, requires_grad=True), "b": torch.tensor(4.0, requires_grad=True)}
    record = balancer.backward(losses)
    assert bool(torch.isfinite(record.weights).all())
    assert record.weight("a") == 0 and record.weight("c") == 0
    assert bool(torch.isfinite(losses["b"].grad))
    losses = {"a": torch.tensor(1.0, requires_grad=True), "b": torch.tensor(4.0, requires_grad=True)}
    record = balancer.backward(losses)
    torch.testing.assert_close(record.weights, torch.tensor([1.0, 0.25, 0.0]))  # sqrt(4) / (2 L_k)
