"""ARML: the auxiliary weights descend ‖h − Σ α_a g_a‖² on {α ≥ 0, Σ α = #auxiliaries}, as the official update
(checked against a double-backward reference) and converging to the constrained minimiser (cvxpy); the state
round-trips; an unusable validation batch changes nothing."""

from __future__ import annotations

import copy

import cvxpy as cp
import numpy as np
import pytest
import torch
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance
from taskbalance import NonFiniteLossError, TaskError
from taskbalance.balancers.base import GradientStep
from taskbalance.balancers.extra_batches import ReplayedExtraBatches

TASKS = ["main", "aux1", "aux2", "aux3", "aux4"]
F64 = torch.float64


def f64_batch(seed: int):
    x, y = toy_batch(TASKS, seed=seed)
    return x.to(F64), {t: v.to(F64) for t, v in y.items()}


def replayed_step(jacobian: torch.Tensor, h: torch.Tensor, index: torch.Tensor | None = None) -> GradientStep:
    extra = ReplayedExtraBatches([h[None]], ["main"], source="validation")
    k = jacobian.shape[0]
    return GradientStep.of(jacobian, torch.ones(k, dtype=F64), index, extra=extra)


def constrained_minimiser(aux_gradients: np.ndarray, h: np.ndarray) -> np.ndarray:
    alpha = cp.Variable(aux_gradients.shape[0])
    problem = cp.Problem(cp.Minimize(cp.sum_squares(h - aux_gradients.T @ alpha)),
                         [alpha >= 0, cp.sum(alpha) == aux_gradients.shape[0]])
    problem.solve(solver=cp.CLARABEL)
    return alpha.value


def test_iterated_updates_converge_to_the_constrained_minimiser_of_the_matching_objective():
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(8, generator=generator, dtype=F64)
    aux = 0.3 * torch.randn(4, 8, generator=generator, dtype=F64) + torch.stack([h, 2 * h, -h, 0 * h])
    jacobian = torch.cat([h[None] + 0.1, aux])  # the target's own training gradient takes no part in f
    lipschitz = 2 * torch.linalg.eigvalsh(aux @ aux.T).max().item()
    balancer = taskbalance.make("arml", TASKS, main="main", update_every=1, weight_lr=1 / lipschitz)
    for _ in range(3000):
        aggregation = balancer.aggregate(replayed_step(jacobian, h))
    expected = constrained_minimiser(aux.numpy(), h.numpy())
    assert (expected < 1e-6).any()  # the non-negativity constraint is active at the optimum
    np.testing.assert_allclose(balancer.weights[1:].double().numpy(), expected, atol=1e-5)
    assert balancer.weights[0] == 1 and abs(balancer.weights[1:].sum().item() - 4) < 1e-5
    torch.testing.assert_close(aggregation.weights, balancer.weights.to(F64))


@pytest.mark.parametrize("main_gradient", ["validation", "batch"])
def test_one_update_is_the_official_sgd_step_on_the_double_backward_objective(main_gradient):
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS).to(F64)
    trunk = list(model.trunk.parameters())
    x, y = f64_batch(1)
    x_val, y_val = f64_batch(2)
    lr = 1e-3
    balancer = taskbalance.make("arml", TASKS, update_every=1, weight_lr=lr, main_gradient=main_gradient)
    # reference, as the official task_weighter: ‖∇_trunk(L_main − Σ α_a L_a)‖², one SGD step, shift to Σ = A
    alpha = torch.ones(4, dtype=F64, requires_grad=True)
    losses = toy_losses(model, x, y)[1]
    validation = toy_losses(model, x_val, y_val)[1]
    main_loss = validation["main"] if main_gradient == "validation" else losses["main"]
    gap = torch.autograd.grad(main_loss - (alpha * torch.stack([losses[t] for t in TASKS[1:]])).sum(), trunk,
                              create_graph=True)
    objective = sum((g**2).sum() for g in gap)
    (gradient,) = torch.autograd.grad(objective, alpha)
    expected = alpha.detach() - lr * gradient
    expected = expected + (4 - expected.sum()) / 4
    assert (expected > 0).all()  # no clipping: the official shift-then-clip is the exact projection here
    record = balancer.backward(toy_losses(model, x, y)[1], shared=trunk,
                               extra_losses=lambda: toy_losses(model, x_val, y_val)[1])
    torch.testing.assert_close(balancer.weights[1:].to(F64), expected, rtol=1e-6, atol=1e-9)
    assert record.weights[0] == 1 and not torch.allclose(expected, torch.ones(4, dtype=F64))


def test_weights_move_only_every_update_every_steps_and_the_validation_batch_is_drawn_only_then():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    balancer = taskbalance.make("arml", TASKS, update_every=3, weight_lr=0.5)
    calls = []
    x_val, y_val = toy_batch(TASKS, seed=9)

    def closure():
        calls.append(balancer.step_count)
        return toy_losses(model, x_val, y_val)[1]

    history = []
    for step in range(6):
        x, y = toy_batch(TASKS, seed=step)
        record = balancer.backward(toy_losses(model, x, y)[1], shared=model.trunk.parameters(),
                                   extra_losses=closure)
        history.append(record.weights.clone())
    assert calls == [2, 5]
    assert torch.equal(history[0], torch.ones(5)) and torch.equal(history[1], torch.ones(5))
    assert not torch.equal(history[2], history[1]) and torch.equal(history[3], history[2])
    assert abs(balancer.weights[1:].sum().item() - 4) < 1e-5 and (balancer.weights >= 0).all()


def test_an_absent_auxiliary_keeps_its_weight_and_the_total_stays_the_number_of_auxiliaries():
    generator = torch.Generator().manual_seed(1)
    balancer = taskbalance.make("arml", TASKS, update_every=1, weight_lr=0.05)
    balancer.weights.copy_(torch.tensor([1.0, 0.5, 1.5, 1.2, 0.8]))
    jacobian = torch.randn(4, 6, generator=generator, dtype=F64)
    h = torch.randn(6, generator=generator, dtype=F64)
    balancer.aggregate(replayed_step(jacobian, h, index=torch.tensor([0, 1, 2, 4])))
    assert balancer.weights[3] == 1.2 and balancer.weights[0] == 1
    assert abs(balancer.weights[1:].sum().item() - 4.0) < 1e-6
    assert not torch.equal(balancer.weights[[1, 2, 4]], torch.tensor([0.5, 1.5, 0.8]))


def test_batch_mode_reads_no_extra_batch_and_skips_the_update_without_a_labelled_target():
    balancer = taskbalance.make("arml", TASKS, main_gradient="batch", update_every=1)
    assert balancer.extra_batches == 0
    generator = torch.Generator().manual_seed(2)
    jacobian = torch.randn(4, 6, generator=generator, dtype=F64)
    balancer.aggregate(GradientStep.of(jacobian, index=torch.tensor([1, 2, 3, 4])))  # the target is absent
    assert torch.equal(balancer.weights, torch.ones(5))


def test_state_round_trips_and_the_restored_balancer_takes_the_same_next_step():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS).to(F64)
    trunk = list(model.trunk.parameters())
    balancer = taskbalance.make("arml", TASKS, update_every=2, weight_lr=0.5)
    x_val, y_val = f64_batch(9)

    def closure():
        return toy_losses(model, x_val, y_val)[1]

    for step in range(3):
        x, y = f64_batch(step)
        balancer.backward(toy_losses(model, x, y)[1], shared=trunk, extra_losses=closure)
    restored = taskbalance.make("arml", TASKS, update_every=2, weight_lr=0.5)
    restored.load_state_dict(copy.deepcopy(balancer.state_dict()))
    assert restored.step_count == 3 and torch.equal(restored.weights, balancer.weights)
    x, y = f64_batch(7)
    records = [b.backward(toy_losses(model, x, y)[1], shared=trunk, extra_losses=closure)
               for b in (balancer, restored)]
    assert torch.equal(records[0].weights, records[1].weights)
    assert torch.equal(balancer.weights, restored.weights)
    assert not torch.equal(balancer.weights, torch.ones(5))


def test_without_a_closure_the_error_names_the_fix_and_nothing_is_written():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    balancer = taskbalance.make("arml", TASKS)
    x, y = toy_batch(TASKS)
    with pytest.raises(ValueError, match=r"arml draws 1 extra validation batch.*extra_losses=fn"):
        balancer.backward(toy_losses(model, x, y)[1], shared=model.trunk.parameters())
    assert all(p.grad is None for p in model.parameters()) and balancer.step_count == 0


def test_a_nan_on_the_validation_batch_raises_and_leaves_the_state_unchanged():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    balancer = taskbalance.make("arml", TASKS, update_every=1)
    x, y = toy_batch(TASKS)
    x_val, y_val = toy_batch(TASKS, seed=1)
    y_val["main"][0] = float("nan")
    state = copy.deepcopy(balancer.state_dict())
    with pytest.raises(NonFiniteLossError, match="main"):
        balancer.backward(toy_losses(model, x, y)[1], shared=model.trunk.parameters(),
                          extra_losses=lambda: toy_losses(model, x_val, y_val)[1])
    assert torch.equal(balancer.state_dict()["weights"], state["weights"]) and balancer.step_count == 0
    assert all(p.grad is None for p in model.parameters())


def test_options_and_roles():
    balancer = taskbalance.make("arml", TASKS, targets=["main", "aux1"])
    assert balancer.roles.auxiliaries == ("aux2", "aux3", "aux4") and balancer.needs == "jacobian"
    assert "1 extra validation batch" in taskbalance.method_info("arml").cost
    with pytest.raises(ValueError, match="every task is a target"):
        taskbalance.make("arml", TASKS, targets=TASKS)
    with pytest.raises(TaskError):
        taskbalance.make("arml", TASKS, main="nope")
    for bad in ({"weight_lr": 0.0}, {"update_every": 0}, {"main_gradient": "test"}):
        with pytest.raises(ValueError):
            taskbalance.make("arml", TASKS, **bad)
