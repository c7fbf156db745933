"""Mixed precision: balancers under ``torch.autocast`` (CPU bfloat16) and with ``torch.amp.GradScaler``.

Contract (``Balancer.backward(..., scaler=)``): pass the *unscaled* losses; weights and state come from true
losses and true per-task gradients; ``.grad`` is left scaled for ``scaler.step``; an overflow makes the scaler
skip the step and leaves a gradient method's buffers untouched.
"""

from __future__ import annotations

import pytest
import torch
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance

TASKS = ["a", "b", "c"]
METHODS = {"ew": {}, "ema": {}, "pcgrad": {"seed": 3}, "mgda": {}}


def _setup(method: str, **extra):
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS, width=32)
    balancer = taskbalance.make(method, TASKS, **METHODS.get(method, {}), **extra)
    return model, balancer


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _relative_error(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert got.keys() == expected.keys()
    num = sum(float((got[n] - expected[n]).pow(2).sum()) for n in expected)
    den = sum(float(expected[n].pow(2).sum()) for n in expected)
    return (num / den) ** 0.5


@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_autocast_fills_float32_gradients_close_to_full_precision(method):
    x, y = toy_batch(TASKS, n=64, scales={"a": 1.0, "b": 10.0, "c": 0.1})
    model, balancer = _setup(method)
    _, losses = toy_losses(model, x, y)
    balancer.backward(losses, shared=model.trunk.parameters())
    reference = _grads(model)

    model, balancer = _setup(method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, losses = toy_losses(model, x, y)
        assert model(x)[0].dtype == torch.bfloat16  # autocast is really on
        record = balancer.backward(losses, shared=model.trunk.parameters())
    got = _grads(model)
    assert all(g.dtype == torch.float32 for g in got.values())
    assert torch.isfinite(record.weights).all()
    assert _relative_error(got, reference) < 0.05  # bfloat16 keeps ~3 significant digits


# db-mtl keeps an EMA of gradient magnitudes: it fails unless the Jacobian is unscaled before aggregate().
@pytest.mark.parametrize("method", [*METHODS, "db-mtl"])
def test_scaler_leaves_scaled_gradients_and_the_step_equals_an_unscaled_run(method):
    x, y = toy_batch(TASKS, n=64)
    model, balancer = _setup(method)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        _, losses = toy_losses(model, x, y)
        plain_record = balancer.backward(losses, shared=model.trunk.parameters())
        plain_grads = _grads(model)
        optimizer.step()

    scaled_model, scaled_balancer = _setup(method)
    optimizer = torch.optim.SGD(scaled_model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        _, losses = toy_losses(scaled_model, x, y)
        record = scaled_balancer.backward(losses, shared=scaled_model.trunk.parameters(), scaler=scaler)
        scale = scaler.get_scale()
        scaled_grads = _grads(scaled_model)
        scaler.step(optimizer)
        scaler.update()

    # The scale is a power of two, so scaling and unscaling are exact.
    for name, grad in plain_grads.items():
        torch.testing.assert_close(scaled_grads[name], grad * scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(record.weights, plain_record.weights, rtol=1e-6, atol=1e-12)
    for (name, p), q in zip(scaled_model.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    for name, value in balancer.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(scaled_balancer.state_dict()[name], value, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["mgda", "gradvac"])
def test_an_overflowing_step_is_skipped_and_gradient_state_is_kept(method):
    x, y = toy_batch(TASKS, n=64)
    model, balancer = _setup(method)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)

    def step(blow_up: float) -> None:
        optimizer.zero_grad(set_to_none=True)
        _, losses = toy_losses(model, x, y)
        losses["a"] = losses["a"] * blow_up  # finite, but times the scale it overflows float32
        balancer.backward(losses, shared=model.trunk.parameters(), scaler=scaler)
        scaler.step(optimizer)
        scaler.update()

    step(1.0)
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in balancer.state_dict().items() if isinstance(v, torch.Tensor)}
    scale = scaler.get_scale()
    step(1e36)
    assert scaler.get_scale() == scale / 2  # the scaler saw the overflow
    for before, p in zip(params, model.parameters(), strict=True):
        assert torch.equal(before, p)  # step skipped
    for name, value in state.items():
        assert torch.equal(balancer.state_dict()[name], value), name  # state rolled back on-device
    step(1.0)  # and training goes on with finite gradients
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_loss_level_state_under_scaler_comes_from_unscaled_losses():
    x, y = toy_batch(TASKS, n=64, scales={"a": 1.0, "b": 100.0, "c": 0.01})
    model, balancer = _setup("ema")
    _, losses = toy_losses(model, x, y)
    balancer.backward(losses, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    expected = torch.stack([losses[t].detach() for t in TASKS])
    torch.testing.assert_close(balancer.ema, expected)  # first EMA value is the (unscaled) loss itself


def test_a_disabled_scaler_changes_nothing():
    x, y = toy_batch(TASKS, n=64)
    model, balancer = _setup("mgda")
    _, losses = toy_losses(model, x, y)
    balancer.backward(losses, shared=model.trunk.parameters())
    expected = _grads(model)
    model, balancer = _setup("mgda")
    _, losses = toy_losses(model, x, y)
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    balancer.backward(losses, shared=model.trunk.parameters(), scaler=disabled)
    for name, grad in expected.items():
        assert torch.equal(_grads(model)[name], grad)
