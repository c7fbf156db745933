"""The Jacobian engine equals a naive loop of autograd.grad calls."""

import pytest
import torch
from torch.autograd.graph import GradientEdge
from toy import ToyMultiTask, toy_batch, toy_losses

from taskbalance.jacobian import (
    accumulate_grad,
    batched_vjp,
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


def _graph(seed=3, dtype=torch.float32):
    torch.manual_seed(seed)
    model = ToyMultiTask(TASKS, norm=True).to(dtype).train()
    x, y = toy_batch(TASKS)
    z, losses = toy_losses(model, x.to(dtype), {t: v.to(dtype) for t, v in y.items()})
    return model, z, torch.stack([losses[t] for t in TASKS])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_batched_vjp_is_bit_identical_to_torch_autograd_grad(dtype):
    model, z, stacked = _graph(dtype=dtype)
    stray = torch.zeros(5, dtype=dtype, requires_grad=True)  # reached by no loss
    inputs = [*model.parameters(), GradientEdge(z.grad_fn, 0), stray]
    public = batched_vjp(stacked, inputs, True, lean=False)
    lean = batched_vjp(stacked, inputs, True, lean=True)
    reference = torch.autograd.grad(stacked, inputs[:-1], grad_outputs=torch.eye(3, dtype=dtype),
                                    retain_graph=True, is_grads_batched=True)
    for got, want in zip(lean, [*reference, torch.zeros(3, 5, dtype=dtype)], strict=True):
        assert got is not None and got.shape == want.shape and torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(public, lean, strict=True))  # type: ignore[arg-type]
    assert batched_vjp(stacked, [stray], True, materialize=False) == [None]
    torch.testing.assert_close(lean[-2].reshape(3, -1), naive_rows(stacked, [z]))


def _vmap_depth() -> int:
    depth = torch._C._vmapmode_increment_nesting()
    torch._C._vmapmode_decrement_nesting()
    return depth


def test_lean_batched_vjp_leaves_no_vmap_level_behind_when_the_backward_raises():
    depth = _vmap_depth()
    _, z, stacked = _graph()
    batched_vjp(stacked, [z], False)  # frees the graph
    assert _vmap_depth() == depth
    with pytest.raises(RuntimeError, match="second time"):
        batched_vjp(stacked, [z], False)
    assert _vmap_depth() == depth
    _, z, stacked = _graph()
    rows = batched_vjp(stacked, [z], True)[0]
    assert rows is not None and rows.shape == (3, *z.shape)
    torch.testing.assert_close(rows.reshape(3, -1), naive_rows(stacked, [z]))


class _Logged(torch.Tensor):
    """A tensor subclass that overrides torch functions (as DTensor and other wrappers do)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensors_that_override_torch_functions_take_the_public_batched_call(monkeypatch):
    from taskbalance import jacobian

    def refuse(*args, **kwargs):
        raise AssertionError("the lean call must not see a tensor that overrides torch functions")

    monkeypatch.setattr(jacobian, "_lean_vjp", refuse)
    weight = torch.randn(4, 3).as_subclass(_Logged).requires_grad_()
    x = torch.randn(5, 3)
    losses = torch.stack([(x @ weight.T).pow(2).mean(), (x @ weight.T).sin().sum()])
    (rows,) = batched_vjp(losses, [weight], True)
    torch.testing.assert_close(torch.Tensor(rows).reshape(2, -1), naive_rows(losses, [weight]))
