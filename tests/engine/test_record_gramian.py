"""Gradient balancers can leave the Gramian in their record, and the conflict monitor reads it for free."""

import pytest
import torch
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance as tb
from taskbalance.diagnostics import ConflictMonitor
from taskbalance.jacobian import parameter_jacobian

TASKS = ["a", "b", "c"]


# The Jacobian engine widens J to float64 before J Jᵀ (exact to float64 rounding); the Gramian engine forms
# float32 products summed in float64 (docs/gramian.md), so it is float32-accurate on a float32 model.
@pytest.mark.parametrize(("engine", "rtol"), [("jacobian", 1e-12), ("gramian", 1e-5)])
def test_record_gramian_is_off_by_default_and_equals_j_jt_when_on(engine, rtol):
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    balancer = tb.make("upgrad", TASKS, engine=engine)
    _, losses = toy_losses(model, x, y)
    assert "gramian" not in balancer.backward(losses, shared=model.trunk.parameters()).extras

    balancer.record_gramian = True
    _, losses = toy_losses(model, x, y)
    stacked = torch.stack([losses[t] for t in TASKS])
    expected = parameter_jacobian(stacked, list(model.trunk.parameters()))
    record = balancer.backward(losses, shared=model.trunk.parameters())
    wide = expected.double()
    torch.testing.assert_close(record.extras["gramian"], wide @ wide.T, rtol=rtol, atol=1e-15)


def test_monitor_reads_the_record_gramian_with_a_missing_task():
    torch.manual_seed(1)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    balancer = tb.make("mgda", TASKS)
    balancer.record_gramian = True
    monitor = ConflictMonitor(TASKS, every=1)
    _, losses = toy_losses(model, x, y)
    del losses["b"]
    stats = monitor.observe_record(balancer.backward(losses, shared=model.trunk.parameters()))
    assert stats is not None
    summary = monitor.summary()
    assert torch.isnan(summary.cosine[1, 0]) and torch.isnan(summary.cosine[0, 1])
    torch.testing.assert_close(summary.cosine[0, 0], torch.tensor(1.0))
    assert -1.0 <= float(summary.cosine[0, 2]) <= 1.0
