"""SI (Navon et al. 2022's scale-invariant baseline): L = Σ_k log L_k."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance

TASKS = ["a", "b", "c"]


def model_gradients(scales: dict[str, float]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    _, losses = toy_losses(model, x, y, scales=scales)
    taskbalance.make("si", TASKS).backward(losses)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_rescaling_a_task_loss_leaves_every_gradient_unchanged():
    plain = model_gradients({})
    rescaled = model_gradients({"a": 1000.0, "c": 1e-3})
    for name in plain:
        torch.testing.assert_close(rescaled[name], plain[name], rtol=1e-4, atol=1e-7)


def test_model_gradient_equals_the_gradient_of_the_sum_of_logs():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    _, losses = toy_losses(model, x, y)
    sum(torch.log(v) for v in losses.values()).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _, losses = toy_losses(model, x, y)
    taskbalance.make("si", TASKS).backward(losses)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(1e-6, 1e6), min_size=3, max_size=3))
def test_value_and_weights_are_log_sum_and_inverse_losses(values):
    losses = torch.tensor(values, dtype=torch.float64)
    total, weights = taskbalance.make("si", TASKS).objective(losses, torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(total, torch.log(losses).sum())
    torch.testing.assert_close(weights, 1 / losses)


def test_zero_loss_is_finite_with_weight_zero_and_negative_loss_is_refused():
    balancer = taskbalance.make("si", TASKS)
    record = balancer.backward({"a": torch.tensor(0.0, requires_grad=True),
                                "b": torch.tensor(4.0, requires_grad=True)})
    torch.testing.assert_close(record.weights, torch.tensor([0.0, 0.25, 0.0]))
    try:
        balancer.backward({"a": torch.tensor(-1.0, requires_grad=True)})
    except ValueError as error:
        assert "'a'" in str(error)
    else:
        raise AssertionError("a negative loss must be refused")
