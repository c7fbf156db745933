"""Preference scalarisations: PBI (MOEA/D, Zhang & Li 2007) and COSMOS (Ruchte & Grabocka 2021).

Both agree with TorchJD's scalarizers in float64 (value and gradient) and keep their defining geometry.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchjd.scalarization import COSMOS as TorchJDCOSMOS
from torchjd.scalarization import PBI as TorchJDPBI

import taskbalance

TASKS = ["a", "b", "c"]
ALL = torch.ones(3, dtype=torch.bool)
positive = st.floats(1e-3, 1e3)
preference = st.lists(st.floats(0.05, 5.0), min_size=3, max_size=3)


def ours(name, values, present=ALL, **kw):
    losses = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    total, weights = taskbalance.make(name, TASKS, **kw).objective(losses, present)
    total.backward()
    return total.detach(), weights, losses.grad


@settings(max_examples=60, deadline=None)
@given(st.lists(positive, min_size=3, max_size=3), preference, st.floats(0.0, 10.0),
       st.lists(st.floats(-1.0, 0.0), min_size=3, max_size=3))
def test_pbi_agrees_with_torchjd(values, pref, theta, reference):
    total, weights, grad = ours("pbi", values, theta=theta, preference=pref, reference=reference)
    losses = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    expected = TorchJDPBI(theta, torch.tensor(pref, dtype=torch.float64),
                          torch.tensor(reference, dtype=torch.float64))(losses)
    expected.backward()
    torch.testing.assert_close(total, expected.detach())
    # on the ray, the 1e-14 rounding of f − d₁ŵ is amplified by θ / sqrt(1e-12): atol 1e-6 there
    torch.testing.assert_close(weights, losses.grad, rtol=1e-7, atol=1e-6)
    torch.testing.assert_close(grad, losses.grad, rtol=1e-7, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.lists(positive, min_size=3, max_size=3), preference, st.floats(0.0, 10.0))
def test_cosmos_agrees_with_torchjd(values, pref, lam):
    total, weights, grad = ours("cosmos", values, cosine_weight=lam, preference=pref)
    losses = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    expected = TorchJDCOSMOS(lam, torch.tensor(pref, dtype=torch.float64))(losses)
    expected.backward()
    torch.testing.assert_close(total, expected.detach())
    torch.testing.assert_close(weights, losses.grad)
    torch.testing.assert_close(grad, losses.grad)


def test_pbi_on_the_preference_ray_descends_along_it_and_off_it_pulls_back():
    pref = [1.0, 2.0, 3.0]
    unit = torch.tensor(pref, dtype=torch.float64) / torch.tensor(pref, dtype=torch.float64).norm()
    _, weights, _ = ours("pbi", (4 * unit).tolist(), preference=pref)
    torch.testing.assert_close(weights, unit, atol=1e-5, rtol=0)  # on the ray: the gradient is ŵ
    off = (4 * unit + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)).tolist()
    _, weights, _ = ours("pbi", off, preference=pref)
    assert weights[0] > unit[0]  # task a is worse than its share: pushed down harder than on the ray
    # a gradient step on the losses moves them closer to the ray
    losses = torch.tensor(off, dtype=torch.float64)
    moved = losses - 0.1 * weights

    def distance(v):
        return (v - (v @ unit) * unit).norm()

    assert distance(moved) < distance(losses)


def test_pbi_weights_are_negative_for_a_task_far_ahead_of_its_share():
    _, weights, _ = ours("pbi", [0.01, 10.0, 10.0])  # uniform preference, task a far below the others
    assert weights[0] < 0 < weights[1]


def test_cosmos_cosine_term_only_rotates_the_loss_vector():
    values = [0.5, 2.0, 7.0]
    _, linear, _ = ours("cosmos", values, cosine_weight=0.0, preference=[1.0, 1.0, 1.0])
    _, full, _ = ours("cosmos", values, cosine_weight=3.0, preference=[1.0, 1.0, 1.0])
    cosine_gradient = (linear - full) / 3.0
    torch.testing.assert_close(cosine_gradient @ torch.tensor(values, dtype=torch.float64),
                               torch.tensor(0.0, dtype=torch.float64), atol=1e-12, rtol=0)
    assert full[2] > linear[2] and full[0] < linear[0]  # the largest loss is pushed down hardest


@pytest.mark.parametrize("name", ["pbi", "cosmos"])
def test_missing_task_drops_out_of_the_decomposition(name):
    present = torch.tensor([True, False, True])
    _, weights, grad = ours(name, [1.0, 0.0, 3.0], present=present, preference=[1.0, 5.0, 2.0])
    two_tasks = taskbalance.make(name, ["a", "c"], preference=[1.0, 2.0])
    two_losses = torch.tensor([1.0, 3.0], dtype=torch.float64)
    _, two = two_tasks.objective(two_losses, torch.ones(2, dtype=torch.bool))
    assert weights[1] == 0 and grad[1] == 0
    torch.testing.assert_close(weights[[0, 2]], two)


@pytest.mark.parametrize("name", ["pbi", "cosmos"])
def test_preference_validation_names_the_problem(name):
    with pytest.raises(ValueError, match="3 tasks"):
        taskbalance.make(name, TASKS, preference=[1.0, 2.0])
    with pytest.raises(ValueError, match=">= 0"):
        taskbalance.make(name, TASKS, preference=[1.0, -2.0, 1.0])
    with pytest.raises(ValueError, match="missing"):
        taskbalance.make(name, TASKS, preference={"a": 1.0, "b": 1.0})
    balancer = taskbalance.make(name, TASKS, preference={"c": 3.0, "a": 1.0, "b": 2.0})
    torch.testing.assert_close(balancer.preference, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
