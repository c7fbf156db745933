"""UW (Kendall et al. 2018, LibMTL form): L = Σ L_k / (2 e^{s_k}) + s_k / 2 with learnable s."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchjd.scalarization import UW as ReferenceUW

import taskbalance

TASKS = ["a", "b", "c"]


def leaves(values):
    return {t: torch.tensor(float(v), requires_grad=True) for t, v in zip(TASKS, values, strict=True)}


def test_log_variances_start_at_minus_half_and_are_the_learnable_parameters():
    balancer = taskbalance.make("uw", TASKS)
    (parameter,) = list(balancer.parameters())
    assert parameter is balancer.log_variance and parameter.requires_grad
    torch.testing.assert_close(parameter.detach(), torch.full((3,), -0.5))
    record = balancer.backward(leaves([1.0, 2.0, 3.0]))
    torch.testing.assert_close(record.weights, torch.full((3,), 1 / (2 * math.exp(-0.5))))


def test_closed_form_optimum_is_log_of_the_loss():
    """For fixed L the optimal s_k is log L_k: the weight tends to 1 / (2 L_k)."""
    fixed = torch.tensor([0.2, 1.0, 7.0])
    balancer = taskbalance.make("uw", TASKS)
    optimizer = torch.optim.Adam(balancer.parameters(), lr=0.1)
    for _ in range(300):
        optimizer.zero_grad()
        record = balancer.backward(leaves(fixed.tolist()))
        optimizer.step()
    torch.testing.assert_close(balancer.log_variance.detach(), fixed.log(), atol=1e-3, rtol=0)
    torch.testing.assert_close(record.weights, 1 / (2 * fixed), rtol=2e-3, atol=0)


@settings(max_examples=25, deadline=None)
@given(values=st.lists(st.floats(0.0, 50.0), min_size=3, max_size=3),
       s=st.lists(st.floats(-3.0, 3.0), min_size=3, max_size=3))
def test_agrees_with_torchjd_uw(values, s):
    """TorchJD's UW is the same objective (it starts at s = 0)."""
    ours = taskbalance.make("uw", TASKS, init=0.0)
    reference = ReferenceUW(3)
    with torch.no_grad():
        ours.log_variance.copy_(torch.tensor(s))
        reference.log_var.copy_(torch.tensor(s))
    losses = torch.tensor(values, requires_grad=True)
    reference_losses = losses.detach().clone().requires_grad_(True)
    total, _ = ours.objective(losses, torch.ones(3, dtype=torch.bool))
    expected = reference(reference_losses)
    torch.testing.assert_close(total, expected)
    total.backward()
    expected.backward()
    torch.testing.assert_close(losses.grad, reference_losses.grad)
    torch.testing.assert_close(ours.log_variance.grad, reference.log_var.grad)


def test_missing_task_contributes_no_regulariser():
    balancer = taskbalance.make("uw", TASKS)
    balancer.backward({t: v for t, v in leaves([1.0, 9.0, 2.0]).items() if t != "b"})
    grad = balancer.log_variance.grad
    assert grad[1] == 0 and grad[0] != 0 and grad[2] != 0


def test_bad_init_is_rejected():
    with pytest.raises(ValueError, match="init"):
        taskbalance.make("uw", TASKS, init=float("inf"))
