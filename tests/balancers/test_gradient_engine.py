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


# ---------------------------------------------------------------- the screen's one host read
def _step(losses, gramian=None, jacobian=None):
    from taskbalance.balancers.base import GradientStep

    losses = torch.tensor(losses, dtype=torch.float64)
    return GradientStep(losses=losses, index=torch.arange(len(losses)), jacobian=jacobian,
                        dtype=torch.float64, precomputed_gramian=gramian)


@pytest.mark.parametrize("poison", ["nan loss", "inf loss", "inf and -inf losses", "nan gradient",
                                    "inf gradient", "inf jacobian"])
def test_surely_finite_catches_every_nonfinite_loss_or_gradient(poison):
    inf, nan = float("inf"), float("nan")
    losses = {"nan loss": [1.0, nan], "inf loss": [inf, 1.0], "inf and -inf losses": [inf, -inf]}
    gramian = torch.eye(2, dtype=torch.float64)
    jacobian = torch.ones(2, 3, dtype=torch.float64)
    if poison == "nan gradient":
        gramian[1, 1] = nan
    if poison == "inf gradient":
        gramian[0, 0] = inf
    if poison == "inf jacobian":
        jacobian[1, 2] = inf
    step = _step(losses.get(poison, [1.0, 2.0]), None if poison == "inf jacobian" else gramian, jacobian)
    from_gramian = poison != "inf jacobian"
    assert not step.surely_finite(from_gramian=from_gramian)
    assert _step([1.0, 2.0], torch.eye(2, dtype=torch.float64)).surely_finite()
    if poison in ("nan gradient", "inf gradient", "inf jacobian"):  # the losses alone are finite
        assert step.surely_finite(gradients=False)
        assert not bool(step.finite_rows(from_gramian=from_gramian).all())


@pytest.mark.parametrize("engine", ["gramian", "jacobian"])
@pytest.mark.parametrize("method", ["upgrad", "mgda"])
def test_finite_losses_whose_sum_overflows_are_not_dropped(engine, method):
    """The screen's sum of the losses overflows (a false alarm): the exact check clears it and the step is
    the same as without the huge constant in the losses (it moves no gradient)."""
    import taskbalance

    torch.manual_seed(0)
    model = ToyMultiTask(TASKS).double()
    x, y = toy_batch(TASKS)
    x, y = x.double(), {t: v.double() for t, v in y.items()}
    results = []
    for offset in (0.0, 1e308):
        model.zero_grad(set_to_none=True)
        balancer = taskbalance.make(method, TASKS, engine=engine)
        _, losses = toy_losses(model, x, y)
        losses = {t: loss + offset for t, loss in losses.items()}
        if offset:
            assert not bool(torch.isfinite(torch.stack(list(losses.values())).sum()))
        record = balancer.backward(losses, shared=list(model.trunk.parameters()))
        assert record.skipped == {}
        results.append((record.weights.clone(), grads_of(model)))
    (weights, grads), (weights_big, grads_big) = results
    torch.testing.assert_close(weights_big, weights, rtol=1e-12, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_big[name], grads[name], rtol=1e-12, atol=0)


class BufferWeights(GradientBalancer):
    """Returns its own state tensor as the weights when every task is present (a method may hand out a
    buffer it updates in place later)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("held", torch.tensor([0.5, 1.0, 2.0]))

    def aggregate(self, step):
        return Aggregation(weights=self.held if len(step.index) == 3 else self.held[step.index])


BufferWeights.info = MethodInfo(
    "buffer-test", "gradient", frozenset({"losses", "jacobian"}), "yes", "-", "-", BufferWeights
)


@pytest.mark.parametrize("missing", [None, "b"])
@pytest.mark.parametrize("engine", ["gramian", "jacobian"])
def test_the_record_holds_its_own_weights_not_the_methods_tensor(engine, missing):
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    balancer = BufferWeights(TASKS)
    balancer.set_engine(engine)
    _, losses = toy_losses(model, x, y)
    if missing:
        del losses[missing]
    record = balancer.backward(losses, shared=list(model.trunk.parameters()))
    expected = torch.tensor([0.5, 0.0 if missing else 1.0, 2.0])
    assert torch.equal(record.weights, expected)
    balancer.held.mul_(10)  # the method updates its state in place later
    assert torch.equal(record.weights, expected)
