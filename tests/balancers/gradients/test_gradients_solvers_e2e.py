"""End to end through ``balancer.backward`` on the toy model, level errors, and bit-exact resume."""

import io

import pytest
import torch
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance as tb

TASKS = ["a", "b", "c"]
METHODS = ["mgda", "mgda-ub", "cagrad", "nash-mtl", "upgrad", "dualproj", "aligned-mtl", "imtl-g", "imtl",
           "tensioners"]
FEATURE_LEVEL = {"mgda", "mgda-ub", "aligned-mtl", "imtl-g", "imtl"}


def run_step(balancer, model, x, y, level):
    model.zero_grad(set_to_none=True)
    balancer.zero_grad(set_to_none=True)  # IMTL's learnable loss scales
    z, losses = toy_losses(model, x, y)
    return balancer.backward(losses, shared=model.trunk.parameters(), features=z)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("level", ["parameters", "features"])
def test_backward_fills_gradients_that_match_the_aggregation(name, level):
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    if level == "features" and name not in FEATURE_LEVEL:
        with pytest.raises(ValueError, match="gradients='parameters'"):
            tb.make(name, TASKS, gradients=level)
        return
    balancer = tb.make(name, TASKS, gradients=level)
    record = run_step(balancer, model, x, y, level)
    assert torch.isfinite(record.weights).all()
    for parameter in model.parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
    if level == "parameters" and balancer.scale_heads and name != "imtl":
        # heads carry weight_k ∇L_k: compare with a reference backward
        z, losses = toy_losses(model, x, y)
        head = model.heads["b"].weight
        expected = torch.autograd.grad(losses["b"] * record.weights[1], head)[0]
        torch.testing.assert_close(head.grad, expected, rtol=1e-5, atol=1e-7)


def test_mgda_ub_defaults_to_features_and_needs_them():
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    _, losses = toy_losses(model, x, y)
    with pytest.raises(ValueError, match="features"):
        tb.make("mgda-ub", TASKS).backward(losses, shared=model.trunk.parameters())


def test_missing_task_is_skipped():
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    for name in METHODS:
        balancer = tb.make(name, TASKS)
        model.zero_grad(set_to_none=True)
        z, losses = toy_losses(model, x, y)
        del losses["b"]
        record = balancer.backward(losses, shared=model.trunk.parameters(), features=z)
        assert record.weights[1] == 0 and torch.isfinite(record.weights).all(), name


def train(name, steps, state=None, **kwargs):
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    balancer = tb.make(name, TASKS, **kwargs)
    optimizer = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.05, momentum=0.9)
    if state is not None:
        model.load_state_dict(state["model"])
        balancer.load_state_dict(state["balancer"])
        optimizer.load_state_dict(state["optimizer"])
    records = []
    for step in range(steps):
        x, y = toy_batch(TASKS, seed=step + (0 if state is None else 1000))
        records.append(run_step(balancer, model, x, y, "parameters"))
        optimizer.step()
    return model, balancer, optimizer, records


@pytest.mark.parametrize("name,kwargs", [("tensioners", {"window": 3}), ("imtl", {}),
                                         ("nash-mtl", {"update_weights_every": 2})])
def test_resume_is_bit_exact(name, kwargs):
    n, m = 8, 7
    # uninterrupted: n steps on seeds 0..n-1 then m steps on seeds 1000..
    model, balancer, optimizer, _ = train(name, n, **kwargs)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "balancer": balancer.state_dict(),
                "optimizer": optimizer.state_dict()}, buffer)
    continued = []
    for step in range(m):
        x, y = toy_batch(TASKS, seed=step + 1000)
        continued.append(run_step(balancer, model, x, y, "parameters"))
        optimizer.step()
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed_model, resumed_balancer, _, resumed = train(name, m, state=state, **kwargs)
    for a, b in zip(continued, resumed, strict=True):
        assert torch.equal(a.weights, b.weights)
    for (name_a, p), (_, q) in zip(model.named_parameters(), resumed_model.named_parameters(), strict=True):
        assert torch.equal(p, q), name_a
    for key, value in balancer.state_dict().items():
        other = resumed_balancer.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


def test_tensioners_activate_after_the_window():
    _, _, _, records = train("tensioners", 8, window=3)
    active = [bool(r.extras["tension_active"]) for r in records]
    assert active == [False, False, False, True, True, True, True, True]
