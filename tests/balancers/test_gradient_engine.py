"""The gradient-level base: a method that returns unit weights reproduces a summed-loss backward."""

import pytest
import torch
from toy import ToyMultiTask, toy_batch, toy_losses

from taskbalance.balancers.base import Aggregation, GradientBalancer
from taskbalance.balancers.registry import MethodInfo

TASKS = ["a", "b", "c"]


class UnitWeights(GradientBalancer):
    def aggregate(self, step):
        return Aggregation(weights=torch.ones_like(step.losses), extras={"gramian": step.gramian})


UnitWeights.info = MethodInfo(
    "unit-test", "gradient", frozenset({"losses", "jacobian"}), "yes", "-", "-", UnitWeights
)


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("level", ["parameters", "features"])
def test_unit_weights_equal_summed_backward(level):
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS, norm=True)
    x, y = toy_batch(TASKS)
    _, losses = toy_losses(model, x, y)
    sum(losses.values()).backward()
    expected = grads_of(model)
    model.zero_grad(set_to_none=True)

    balancer = UnitWeights(TASKS, gradients=level)
    z, losses = toy_losses(model, x, y)
    record = balancer.backward(losses, shared=model.trunk.parameters(), features=z)
    got = grads_of(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)
    assert record.extras["gramian"].shape == (3, 3)
    torch.testing.assert_close(record.weights, torch.ones(3))


def test_missing_task_gets_zero_weight_and_no_gradient():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    _, losses = toy_losses(model, x, y)
    del losses["b"]
    record = UnitWeights(TASKS).backward(losses, shared=model.trunk.parameters())
    assert record.skipped == {"b": "missing"}
    assert record.weights.tolist() == [1.0, 0.0, 1.0]
    assert model.heads["b"].weight.grad is None


def test_parameter_mode_requires_shared():
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    _, losses = toy_losses(model, x, y)
    with pytest.raises(ValueError, match="shared"):
        UnitWeights(TASKS).backward(losses)


def test_feature_mode_requires_features():
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    _, losses = toy_losses(model, x, y)
    with pytest.raises(ValueError, match="features"):
        UnitWeights(TASKS, gradients="features").backward(losses, shared=model.trunk.parameters())
