"""HydaLearn: auxiliary weights are main-task gains relative to the main task's own gain.

Specification: docs/method-notes.md §5.2.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_gradients_pcgrad import TASKS, grads_of, sample_jacobians
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance
from taskbalance import GradientStep, TaskError
from taskbalance.balancers.gradients import hydalearn as hydalearn_module
from taskbalance.balancers.gradients.hydalearn import HydaLearn

F64 = torch.float64


def first_order(jacobian: torch.Tensor, main: int = 0, **options) -> torch.Tensor:
    k = jacobian.shape[0]
    balancer = HydaLearn([f"t{i}" for i in range(k)], main=f"t{main}", **options)
    return balancer.aggregate(GradientStep.of(jacobian)).weights


@pytest.mark.parametrize("label,jacobian", list(sample_jacobians()))
def test_first_order_weights_are_the_projection_coefficients_on_the_main_gradient(label, jacobian):
    main = jacobian.shape[0] - 1
    weights = first_order(jacobian, main)
    g_m = jacobian[main]
    if float(g_m @ g_m) == 0:
        expected = torch.zeros(jacobian.shape[0], dtype=F64)  # no main-task gain at all: main task only
    else:
        expected = (jacobian @ g_m).clamp(min=0) / (g_m @ g_m)
    expected[main] = 1.0
    torch.testing.assert_close(weights, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("c", [0.01, 1.0, 50.0])
def test_an_auxiliary_opposed_to_the_main_task_is_switched_off(c):
    g = torch.randn(9, generator=torch.Generator().manual_seed(0), dtype=F64)
    weights = first_order(torch.stack([g, -c * g, 2 * g]))
    assert weights.tolist()[:2] == [1.0, 0.0]
    unclipped = first_order(torch.stack([g, -c * g]), clip_negative=False)
    torch.testing.assert_close(unclipped, torch.tensor([1.0, -c], dtype=F64))


def test_an_auxiliary_identical_to_the_main_task_gets_weight_one():
    jacobian = torch.randn(3, 7, generator=torch.Generator().manual_seed(1), dtype=F64)
    jacobian[2] = jacobian[0]
    weights = first_order(jacobian)
    torch.testing.assert_close(weights[2], torch.tensor(1.0, dtype=F64))


def test_normalisation_options_rescale_the_present_weights():
    jacobian = torch.randn(3, 7, generator=torch.Generator().manual_seed(2), dtype=F64)
    raw = first_order(jacobian)
    torch.testing.assert_close(first_order(jacobian, normalize="sum_to_1"), raw / raw.sum())
    torch.testing.assert_close(first_order(jacobian, normalize="sum_to_K"), 3 * raw / raw.sum())


def test_roles_follow_the_library_convention():
    assert HydaLearn(TASKS).main == "a"  # neither main= nor targets=: the first task
    assert HydaLearn(TASKS, targets=["c"]).main == "c"
    with pytest.raises(TaskError, match="single target"):
        taskbalance.make("hydalearn", TASKS, targets=["a", "b"])
    with pytest.raises(TaskError, match="unknown"):
        taskbalance.make("hydalearn", TASKS, main="z")


# ---------------------------------------------------------------- through backward() on the toy model
def setup(seed: int = 0, dtype: torch.dtype = torch.float32, batch_seed: int = 0):
    torch.manual_seed(seed)
    model = ToyMultiTask(TASKS).to(dtype)
    x, y = toy_batch(TASKS, seed=batch_seed)
    x, y = x.to(dtype), {t: v.to(dtype) for t, v in y.items()}
    return model, x, y


def main_loss_closure(model: ToyMultiTask, x: torch.Tensor, y: dict[str, torch.Tensor], main: str = "a"):
    names = [n for n, p in model.trunk.named_parameters() if p.requires_grad]

    def main_loss_at(values):
        z = torch.func.functional_call(model.trunk, dict(zip(names, values, strict=True)), (x,))
        return ((model.heads[main](z).squeeze(-1) - y[main]) ** 2).mean()

    return main_loss_at


def shared_jacobian(model, losses) -> torch.Tensor:
    shared = list(model.trunk.parameters())
    rows = [torch.autograd.grad(losses[t], shared, retain_graph=True) for t in TASKS]
    return torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows])


def test_backward_applies_the_weights_to_the_trunk_and_the_heads():
    model, x, y = setup()
    _, losses = toy_losses(model, x, y)
    jacobian = shared_jacobian(model, losses)
    record = taskbalance.make("hydalearn", TASKS, main="b").backward(losses, shared=model.trunk.parameters())
    weights = record.weights
    got = grads_of(model)
    model.zero_grad(set_to_none=True)
    _, losses = toy_losses(model, x, y)
    sum(w * losses[t] for w, t in zip(weights, TASKS, strict=True)).backward()
    for name, expected in grads_of(model).items():
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-7)
    g_m = jacobian[1]
    torch.testing.assert_close(record.extras["gain"], jacobian @ g_m)
    assert record.weight("b") == 1.0


def test_weights_change_with_the_batch():
    model, *_ = setup()
    weights = []
    for batch_seed in range(3):
        x, y = toy_batch(TASKS, seed=batch_seed)
        _, losses = toy_losses(model, x, y)
        record = taskbalance.make("hydalearn", TASKS).backward(losses, shared=model.trunk.parameters())
        weights.append(record.weights)
        model.zero_grad(set_to_none=True)
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])


def test_without_the_main_task_nothing_is_learned_this_step():
    model, x, y = setup()
    _, losses = toy_losses(model, x, y)
    del losses["a"]
    record = taskbalance.make("hydalearn", TASKS, main="a").backward(losses, shared=model.trunk.parameters())
    assert record.weights.tolist() == [0.0, 0.0, 0.0] and record.skipped == {"a": "missing"}
    assert all(float(p.grad.abs().max()) == 0 for p in model.trunk.parameters())


def exact_and_first_order(eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unclipped weights δ_a / δ_m of both modes (clipping would hide the gap for conflicting tasks)."""
    model, x, y = setup(dtype=F64)
    _, losses = toy_losses(model, x, y)
    closure = main_loss_closure(model, x, y)
    exact = taskbalance.make("hydalearn", TASKS, mode="exact", lookahead_lr=eta, clip_negative=False)
    record = exact.backward(losses, shared=model.trunk.parameters(), main_loss_at=closure)
    _, losses = toy_losses(model, x, y)
    approx = taskbalance.make("hydalearn", TASKS, clip_negative=False)
    return record.weights, approx.backward(losses, shared=model.trunk.parameters()).weights


def test_exact_and_first_order_modes_agree_as_the_look_ahead_step_vanishes():
    errors = []
    for eta in (1e-1, 1e-2, 1e-3, 1e-4):
        exact, approx = exact_and_first_order(eta)
        errors.append(float((exact - approx).abs().max()))
    assert errors[0] > 0  # a finite step is not the linearisation
    # the gap is O(η): each tenfold smaller step shrinks it at least fivefold
    assert all(later < 0.2 * earlier for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-4


def test_exact_gains_are_decreases_of_the_main_loss():
    model, x, y = setup(dtype=F64)
    _, losses = toy_losses(model, x, y)
    jacobian = shared_jacobian(model, losses)
    closure = main_loss_closure(model, x, y)
    balancer = taskbalance.make("hydalearn", TASKS, mode="exact", lookahead_lr=0.05)
    record = balancer.backward(losses, shared=model.trunk.parameters(), main_loss_at=closure)
    theta = [p.detach() for p in model.trunk.parameters()]
    sizes = [p.numel() for p in theta]
    for k in range(3):
        step = [piece.view_as(p) for piece, p in zip(jacobian[k].split(sizes), theta, strict=True)]
        moved = closure([p - 0.05 * s for p, s in zip(theta, step, strict=True)])
        torch.testing.assert_close(record.extras["gain"][k], closure(theta) - moved)


def test_a_closure_that_cannot_be_vmapped_falls_back_to_a_loop_with_the_same_result(monkeypatch):
    model, x, y = setup(dtype=F64)
    batched = main_loss_closure(model, x, y)

    def host_reading(values):
        float(values[0].sum())  # a host read: impossible under vmap
        return batched(values)

    results = []
    monkeypatch.setattr(hydalearn_module, "_warned_loop", False)
    for closure in (batched, host_reading):
        _, losses = toy_losses(model, x, y)
        balancer = taskbalance.make("hydalearn", TASKS, mode="exact", lookahead_lr=0.01)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results.append(balancer.backward(losses, shared=model.trunk.parameters(), main_loss_at=closure))
        model.zero_grad(set_to_none=True)
        assert any("one by one" in str(w.message) for w in caught) == (closure is host_reading)
    torch.testing.assert_close(results[0].weights, results[1].weights)


def test_a_look_ahead_that_raises_the_main_loss_falls_back_to_the_main_task_only():
    model, x, y = setup(dtype=F64)
    _, losses = toy_losses(model, x, y)
    balancer = taskbalance.make("hydalearn", TASKS, mode="exact", lookahead_lr=1e4)
    closure = main_loss_closure(model, x, y)
    record = balancer.backward(losses, shared=model.trunk.parameters(), main_loss_at=closure)
    assert float(record.extras["gain"][0]) <= 0
    assert record.weights.tolist() == [1.0, 0.0, 0.0]


def test_exact_mode_needs_a_step_size_a_closure_and_parameter_gradients():
    with pytest.raises(ValueError, match="lookahead_lr"):
        taskbalance.make("hydalearn", TASKS, mode="exact")
    with pytest.raises(ValueError, match="gradients='parameters'"):
        taskbalance.make("hydalearn", TASKS, mode="exact", lookahead_lr=0.1, gradients="features")
    with pytest.raises(ValueError, match="lookahead_lr must be > 0"):
        taskbalance.make("hydalearn", TASKS, lookahead_lr=-1.0)
    with pytest.raises(ValueError, match="mode"):
        taskbalance.make("hydalearn", TASKS, mode="second_order")
    model, x, y = setup()
    _, losses = toy_losses(model, x, y)
    balancer = taskbalance.make("hydalearn", TASKS, mode="exact", lookahead_lr=0.1)
    with pytest.raises(ValueError, match="main_loss_at"):
        balancer.backward(losses, shared=model.trunk.parameters())


def test_feature_level_first_order_uses_the_feature_gramian():
    model, x, y = setup()
    z, losses = toy_losses(model, x, y)
    rows = [torch.autograd.grad(losses[t], z, retain_graph=True)[0].reshape(-1) for t in TASKS]
    jacobian = torch.stack(rows)
    record = taskbalance.make("hydalearn", TASKS, gradients="features").backward(losses, features=z)
    expected = (jacobian @ jacobian[0]).clamp(min=0) / (jacobian[0] @ jacobian[0])
    expected[0] = 1.0
    torch.testing.assert_close(record.weights, expected)


def test_the_look_ahead_step_size_round_trips_through_state_dict():
    balancer = taskbalance.make("hydalearn", TASKS, mode="exact", lookahead_lr=0.1)
    balancer.lookahead_lr = 0.025  # e.g. following a learning-rate schedule
    copy = taskbalance.make("hydalearn", TASKS, mode="exact", lookahead_lr=0.1)
    copy.load_state_dict(balancer.state_dict())
    assert copy.lookahead_lr == 0.025
