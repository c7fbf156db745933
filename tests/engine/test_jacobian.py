"""The Jacobian engine equals a naive loop of autograd.grad calls."""

import pytest
import torch
from toy import ToyMultiTask, toy_batch, toy_losses

from taskbalance.jacobian import (
    accumulate_grad,
    feature_jacobian,
    parameter_jacobian,
    reachable_leaves,
)

TASKS = ["a", "b", "c"]


def naive_rows(losses, inputs):
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(x)).reshape(-1)
                    for g, x in zip(grads, inputs, strict=True)
                ]
            )
        )
    return torch.stack(rows)


@pytest.mark.parametrize("norm,dropout", [(False, 0.0), (True, 0.3)])
def test_parameter_jacobian_equals_loop(norm, dropout):
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS, norm=norm, dropout=dropout).train()
    x, y = toy_batch(TASKS)
    _, losses = toy_losses(model, x, y)
    stacked = torch.stack([losses[t] for t in TASKS])
    shared = list(model.trunk.parameters())
    expected = naive_rows(stacked, shared)
    got = parameter_jacobian(stacked, shared)
    assert got.shape == (3, sum(p.numel() for p in shared))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_feature_jacobian_equals_loop_and_backward_through_matches_chain_rule():
    torch.manual_seed(1)
    model = ToyMultiTask(TASKS, norm=True, dropout=0.2).train()
    x, y = toy_batch(TASKS)
    z, losses = toy_losses(model, x, y)
    stacked = torch.stack([losses[t] for t in TASKS])
    expected = naive_rows(stacked, [z])
    got = feature_jacobian(stacked, [z])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_unreached_parameters_give_zero_columns():
    torch.manual_seed(2)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    _, losses = toy_losses(model, x, y)
    stacked = torch.stack([losses[t] for t in TASKS])
    head_a = list(model.heads["a"].parameters())
    jac = parameter_jacobian(stacked, head_a)
    assert torch.all(jac[1:] == 0) and torch.any(jac[0] != 0)


def test_reachable_leaves_finds_heads_only_when_stopping_at_features():
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    z, losses = toy_losses(model, x, y)
    stacked = torch.stack([losses[t] for t in TASKS])
    heads = {id(p) for p in model.heads.parameters()}
    found = reachable_leaves([stacked], stop_at=[z])
    assert {id(p) for p in found} == heads
    found_all = reachable_leaves([stacked], exclude=list(model.trunk.parameters()))
    assert {id(p) for p in found_all} == heads


def test_accumulate_grad_adds_into_existing_grad():
    p = torch.nn.Parameter(torch.zeros(2, 3))
    q = torch.nn.Parameter(torch.zeros(4))
    flat = torch.arange(10.0)
    accumulate_grad([p, q], flat)
    accumulate_grad([p, q], flat)
    torch.testing.assert_close(p.grad, 2 * flat[:6].view(2, 3))
    torch.testing.assert_close(q.grad, 2 * flat[6:])
