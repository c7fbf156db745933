"""Gradient-conflict statistics and the ConflictMonitor in a user's loop."""

import io
import json
import math

import pytest
import torch
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance as tb
import taskbalance.diagnostics.conflict as conflict_module
from taskbalance.balancers.base import Aggregation, GradientBalancer
from taskbalance.balancers.registry import MethodInfo
from taskbalance.diagnostics.conflict import (
    ConflictHistory,
    ConflictMonitor,
    WeightTrajectory,
    conflict_rate,
    conflict_statistics,
    cosine_similarity_matrix,
    gradient_magnitude_similarity,
    pair_names,
)
from taskbalance.sinks import MemorySink

TASKS = ["a", "b", "c"]


class GramianUnitWeights(GradientBalancer):
    """A gradient-level test balancer that exposes the Gramian of the gradients it used."""

    def aggregate(self, step):
        return Aggregation(weights=torch.ones_like(step.losses), extras={"gramian": step.gramian})


GramianUnitWeights.info = MethodInfo(
    "gramian-unit-test", "gradient", frozenset({"losses", "jacobian"}), "yes", "-", "-", GramianUnitWeights
)


# ------------------------------------------------------------------------------------------ pure statistics
def constructed_gradients():
    """g_a = (1, 0), g_b = (0, 2), g_c = (-1, 1): a ⟂ b, a and c conflict, b and c agree."""
    return torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]], dtype=torch.float64)


def test_cosine_conflict_and_gms_match_hand_computation():
    jacobian = constructed_gradients()
    gramian = jacobian @ jacobian.T
    na, nb, nc = 1.0, 2.0, math.sqrt(2.0)
    cosine = cosine_similarity_matrix(gramian)
    torch.testing.assert_close(cosine[0, 1], torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(cosine[0, 2], torch.tensor(-1.0 / (na * nc), dtype=torch.float64))
    torch.testing.assert_close(cosine[1, 2], torch.tensor(2.0 / (nb * nc), dtype=torch.float64))
    torch.testing.assert_close(cosine.diagonal(), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(cosine, cosine.T)

    gms = gradient_magnitude_similarity(gramian)
    for (i, j), (ni, nj) in {(0, 1): (na, nb), (0, 2): (na, nc), (1, 2): (nb, nc)}.items():
        expected = 2 * ni * nj / (ni**2 + nj**2)
        torch.testing.assert_close(gms[i, j], torch.tensor(expected, dtype=torch.float64))
        torch.testing.assert_close(gms[j, i], gms[i, j])
    torch.testing.assert_close(gms.diagonal(), torch.ones(3, dtype=torch.float64))

    # exactly one of the three pairs (a, c) conflicts
    assert conflict_rate(gramian).item() == pytest.approx(1 / 3)

    stats = conflict_statistics(gramian, TASKS)
    torch.testing.assert_close(stats.norms, torch.tensor([na, nb, nc], dtype=torch.float64))
    torch.testing.assert_close(stats.norm_ratio[1, 0], torch.tensor(nb / na, dtype=torch.float64))
    torch.testing.assert_close(stats.relative_norms, stats.norms / stats.norms.mean())


def test_statistics_agree_with_torch_cosine_on_random_gradients():
    jacobian = torch.randn(5, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cosine = cosine_similarity_matrix(jacobian @ jacobian.T)
    expected = torch.nn.functional.cosine_similarity(jacobian[:, None, :], jacobian[None, :, :], dim=-1)
    torch.testing.assert_close(cosine, expected)
    upper = torch.triu_indices(5, 5, 1)
    assert conflict_rate(jacobian @ jacobian.T).item() == pytest.approx(
        (expected[upper[0], upper[1]] < 0).double().mean().item()
    )


def test_scaling_a_gradient_changes_gms_but_not_cosine():
    jacobian = constructed_gradients()
    scaled = jacobian * torch.tensor([[3.0], [1.0], [1.0]], dtype=torch.float64)
    before, after = jacobian @ jacobian.T, scaled @ scaled.T
    torch.testing.assert_close(cosine_similarity_matrix(before), cosine_similarity_matrix(after))
    assert not torch.allclose(gradient_magnitude_similarity(before), gradient_magnitude_similarity(after))


def test_zero_gradient_conventions():
    jacobian = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, -1.0]])
    gramian = jacobian @ jacobian.T
    cosine = cosine_similarity_matrix(gramian)
    assert torch.isfinite(cosine).all()
    assert cosine[0, 2].item() == 0.0  # a zero gradient conflicts with nothing
    gms = gradient_magnitude_similarity(gramian)
    assert gms[0, 1].item() == 1.0 and gms[0, 2].item() == 0.0
    assert conflict_rate(gramian).item() == 0.0
    assert math.isnan(conflict_rate(gramian[:1, :1]).item())


def test_absent_tasks_are_nan_and_left_out_of_scalars():
    jacobian = constructed_gradients()[[0, 2]]  # tasks a and c present, b absent
    stats = conflict_statistics(jacobian @ jacobian.T, TASKS, index=[0, 2])
    assert torch.isnan(stats.cosine[1]).all() and torch.isnan(stats.cosine[:, 1]).all()
    assert math.isnan(stats.norms[1].item())
    assert stats.cosine[0, 2].item() < 0
    scalars = stats.to_scalars()
    assert scalars["conflict/conflict_rate"] == 1.0
    assert "conflict/cosine/a~c" in scalars
    assert not any("b" in name.split("/")[-1] for name in scalars)
    with pytest.raises(ValueError, match="present task positions"):
        conflict_statistics(jacobian @ jacobian.T, TASKS, index=[0])


def test_pair_names_follow_triu_order():
    assert pair_names(TASKS) == ["a~b", "a~c", "b~c"]


# ---------------------------------------------------------------------------------------------- the monitor
def per_task_gradients(model, x, y, inputs):
    """Reference: one ordinary autograd.grad per task (the slow way)."""
    rows = []
    for task in TASKS:
        _, losses = toy_losses(model, x, y)
        grads = torch.autograd.grad(losses[task], inputs)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_monitor_statistics_match_reference_gradients():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    shared = list(model.trunk.parameters())
    reference = per_task_gradients(model, x, y, shared)
    _, losses = toy_losses(model, x, y)
    stats = ConflictMonitor(TASKS, every=1).observe(losses, shared=shared)
    assert stats is not None
    wide = reference.double()
    torch.testing.assert_close(stats.cosine, cosine_similarity_matrix(wide @ wide.T))
    torch.testing.assert_close(stats.norms, wide.norm(dim=1))


def test_monitor_leaves_gradients_and_balancer_update_unchanged():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS, norm=True)
    x, y = toy_batch(TASKS)
    balancer = tb.make("ema", TASKS)
    _, losses = toy_losses(model, x, y)
    balancer.backward(losses, shared=model.trunk.parameters())
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    balancer = tb.make("ema", TASKS)
    monitor = ConflictMonitor(TASKS, every=1)
    _, losses = toy_losses(model, x, y)
    monitor.observe(losses, shared=model.trunk.parameters())  # retains the graph for the balancer
    assert all(p.grad is None for p in model.parameters())
    balancer.backward(losses, shared=model.trunk.parameters())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=0, atol=0)


def test_monitor_does_no_work_on_inactive_steps(monkeypatch):
    calls = []
    real = conflict_module.parameter_jacobian

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(conflict_module, "parameter_jacobian", counting)
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    sink = MemorySink()
    monitor = ConflictMonitor(TASKS, every=10, sink=sink)
    results = []
    for _ in range(25):
        _, losses = toy_losses(model, x, y)
        results.append(monitor.observe(losses, shared=model.trunk.parameters()))
        sum(losses.values()).backward()
    assert len(calls) == 3  # steps 0, 10 and 20
    assert [i for i, r in enumerate(results) if r is not None] == [0, 10, 20]
    assert [step for step, _ in sink.series["conflict/conflict_rate"]] == [0, 10, 20]
    assert monitor.steps_observed == 3 and monitor.step_count == 25


def test_inactive_step_keeps_no_reference_to_the_graph():
    import weakref

    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    monitor = ConflictMonitor(TASKS, every=5)
    _, losses = toy_losses(model, x, y)
    monitor.observe(losses, shared=model.trunk.parameters())  # step 0: active
    _, losses = toy_losses(model, x, y)
    probe = weakref.ref(losses["a"])
    assert monitor.observe(losses, shared=model.trunk.parameters()) is None
    del losses
    assert probe() is None


def test_feature_level_monitor_matches_reference():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    z, losses = toy_losses(model, x, y)
    rows = torch.stack([torch.autograd.grad(losses[t], z, retain_graph=True)[0].reshape(-1) for t in TASKS])
    stats = ConflictMonitor(TASKS, every=1).observe(losses, features=z)
    torch.testing.assert_close(stats.cosine, cosine_similarity_matrix(rows.double() @ rows.double().T))


def test_observe_record_uses_the_balancers_gramian_for_free(monkeypatch):
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    _, losses = toy_losses(model, x, y)
    expected = ConflictMonitor(TASKS, every=1).observe(losses, shared=model.trunk.parameters())

    def forbidden(*args, **kwargs):
        raise AssertionError("observe_record must not compute a Jacobian")

    monkeypatch.setattr(conflict_module, "parameter_jacobian", forbidden)
    monitor = ConflictMonitor(TASKS, every=1)
    record = GramianUnitWeights(TASKS).backward(losses, shared=model.trunk.parameters())
    stats = monitor.observe_record(record)
    torch.testing.assert_close(stats.cosine, expected.cosine)
    torch.testing.assert_close(stats.magnitude_similarity, expected.magnitude_similarity)


def test_observe_record_with_missing_task_and_without_gramian():
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    _, losses = toy_losses(model, x, y)
    del losses["b"]
    monitor = ConflictMonitor(TASKS, every=1)
    record = GramianUnitWeights(TASKS).backward(losses, shared=model.trunk.parameters())
    stats = monitor.observe_record(record)
    assert stats.index == (0, 2)
    assert torch.isnan(stats.cosine[1]).all()
    _, losses = toy_losses(model, x, y)
    with pytest.raises(KeyError, match="observe\\(losses"):
        monitor.observe_record(tb.make("ema", TASKS).backward(losses))


def test_observe_after_backward_names_the_fix():
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    _, losses = toy_losses(model, x, y)
    tb.make("ema", TASKS).backward(losses)
    with pytest.raises(RuntimeError, match="before balancer.backward"):
        ConflictMonitor(TASKS, every=1).observe(losses, shared=model.trunk.parameters())


def test_summary_averages_only_over_steps_where_a_pair_was_present():
    monitor = ConflictMonitor(TASKS, every=1)
    full = constructed_gradients().float()
    monitor.observe_gramian(full @ full.T)
    flipped = full * torch.tensor([[1.0], [1.0], [-1.0]])  # now a~c agree, b~c conflict
    monitor.observe_gramian(flipped @ flipped.T)
    partial = full[[0, 1]]
    monitor.observe_gramian(partial @ partial.T, present=["a", "b"])
    summary = monitor.summary()
    assert summary.steps_observed == 3
    c_full = cosine_similarity_matrix(full @ full.T)
    c_flip = cosine_similarity_matrix(flipped @ flipped.T)
    torch.testing.assert_close(summary.cosine[0, 2], (c_full[0, 2] + c_flip[0, 2]) / 2)  # 2 steps, not 3
    torch.testing.assert_close(summary.cosine[0, 1], c_full[0, 1])
    assert summary.conflict_frequency[0, 2].item() == 0.5
    assert summary.conflict_frequency[1, 2].item() == 0.5
    torch.testing.assert_close(summary.conflict_rate, torch.tensor((1 / 3 + 1 / 3 + 0) / 3))
    json.dumps(summary.to_dict(), allow_nan=False)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="every"):
        ConflictMonitor(TASKS, every=0)
    with pytest.raises(TypeError, match="Sink"):
        ConflictMonitor(TASKS, sink=print)
    model = ToyMultiTask(TASKS)
    _, losses = toy_losses(model, *toy_batch(TASKS))
    with pytest.raises(ValueError, match="shared="):
        ConflictMonitor(TASKS).observe(losses)
    with pytest.raises(tb.TaskError):
        ConflictMonitor(TASKS, every=1).observe({"zzz": losses["a"]}, shared=model.trunk.parameters())


# ---------------------------------------------------------------------------------------------- persistence
def run_loop(model, optimizer, balancer, monitor, trajectory, steps, start):
    for step in range(start, start + steps):
        x, y = toy_batch(TASKS, seed=step)
        optimizer.zero_grad(set_to_none=True)
        _, losses = toy_losses(model, x, y)
        if step % 4 == 3:
            del losses["c"]  # a partially labelled batch
        monitor.observe(losses, shared=model.trunk.parameters())
        record = balancer.backward(losses, shared=model.trunk.parameters())
        trajectory.append(step, record)
        optimizer.step()


def fresh(seed=0):
    torch.manual_seed(seed)
    model = ToyMultiTask(TASKS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, optimizer, tb.make("ema", TASKS), ConflictMonitor(TASKS, every=3)


def test_resume_continues_bit_for_bit():
    model, optimizer, balancer, monitor = fresh()
    run_loop(model, optimizer, balancer, monitor, WeightTrajectory(TASKS), 14, 0)

    model2, optimizer2, balancer2, monitor2 = fresh()
    run_loop(model2, optimizer2, balancer2, monitor2, WeightTrajectory(TASKS), 7, 0)
    buffer = io.BytesIO()
    torch.save({"model": model2.state_dict(), "optimizer": optimizer2.state_dict(),
                "balancer": balancer2.state_dict(), "monitor": monitor2.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    model3, optimizer3, balancer3, monitor3 = fresh(seed=123)
    model3.load_state_dict(state["model"])
    optimizer3.load_state_dict(state["optimizer"])
    balancer3.load_state_dict(state["balancer"])
    monitor3.load_state_dict(state["monitor"])
    run_loop(model3, optimizer3, balancer3, monitor3, WeightTrajectory(TASKS), 7, 7)

    for a, b in zip(model.parameters(), model3.parameters(), strict=True):
        assert torch.equal(a, b)
    assert monitor3.step_count == monitor.step_count == 14
    for name, buffer_a in monitor.named_buffers():
        assert torch.equal(buffer_a, dict(monitor3.named_buffers())[name]), name
    assert json.dumps(monitor.history().to_dict()) == json.dumps(monitor3.history().to_dict())


def test_history_and_trajectory_are_json_ready_and_round_trip():
    model, optimizer, balancer, monitor = fresh()
    trajectory = WeightTrajectory(TASKS)
    run_loop(model, optimizer, balancer, monitor, trajectory, 8, 0)
    history = monitor.history()
    assert history.steps == [0, 3, 6]
    assert len(history.cosine) == 3 and len(history.cosine[0]) == len(history.pairs) == 3
    text = json.dumps(history.to_dict(), allow_nan=False)
    assert ConflictHistory.from_dict(json.loads(text)) == history

    data = trajectory.to_dict()
    text = json.dumps(data, allow_nan=False)  # skipped losses are None, not NaN
    assert data["steps"] == list(range(8))
    assert data["losses"][3][2] is None and data["weights"][3][2] == 0.0
    again = WeightTrajectory.from_dict(json.loads(text))
    assert again.steps == trajectory.steps
    torch.testing.assert_close(again.weights, trajectory.weights)
    torch.testing.assert_close(again.losses, trajectory.losses, equal_nan=True)
    with pytest.raises(ValueError, match="differ"):
        WeightTrajectory(["a", "b"]).append(0, balancer.backward(toy_losses(model, *toy_batch(TASKS))[1]))
