"""Auto-λ: λ follows the exact hypergradient of the primary tasks' validation loss after a virtual SGD
step, updated by Adam as in the official code; the state round-trips; an unusable validation batch changes
nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance
from taskbalance import NonFiniteLossError
from taskbalance.balancers.base import GradientStep

TASKS = ["main", "helpful", "opposed"]
F64 = torch.float64


def f64_batch(seed: int):
    x, y = toy_batch(TASKS, seed=seed)
    return x.to(F64), {t: v.to(F64) for t, v in y.items()}


def setup(seed: int = 0, **options):
    torch.manual_seed(seed)
    model = ToyMultiTask(TASKS).to(F64)
    balancer = taskbalance.make("auto-lambda", TASKS, main="main", **options)
    return model, balancer


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


class ReplayedValidation:
    """A stand-in for ``step.extra``: a fixed validation gradient, recording where it was asked."""

    def __init__(self, gradient: torch.Tensor) -> None:
        self.value = gradient
        self.calls: list[tuple[list[str], torch.Tensor | None]] = []

    def gradient(self, tasks, *, at=None):
        self.calls.append((list(tasks), at))
        return self.value


def test_an_auxiliary_aligned_with_the_validation_gradient_gains_weight_and_an_opposed_one_loses_it():
    h = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=F64)
    jacobian = torch.stack([h + 0.1, 0.8 * h + torch.tensor([0.3, -0.2, 0.0, 0.1], dtype=F64), -h])
    balancer = taskbalance.make("auto-lambda", TASKS, main="main", meta_lr=1e-2, virtual_lr=0.5)
    before = balancer.weights.clone()
    for _ in range(5):
        current = balancer.weights.clone()
        extra = ReplayedValidation(h)
        step = GradientStep(losses=torch.ones(3, dtype=F64), index=torch.arange(3), jacobian=jacobian,
                            dtype=F64, extra=extra)
        aggregation = balancer.aggregate(step)
        tasks, at = extra.calls[0]
        assert tasks == ["main"]  # the meta-loss is the primary task's only
        torch.testing.assert_close(at, -0.5 * (current.to(F64) @ jacobian))  # θ' = θ − α Σ λ_j g_j
        assert torch.equal(aggregation.weights, balancer.weights)  # the step uses the *new* λ
    hyper = aggregation.extras["hypergradient"]
    assert hyper[1] < 0 < hyper[2]  # ∂L_val/∂λ = −α⟨g_k, h⟩
    assert balancer.weights[1] > before[1] and balancer.weights[2] < before[2]
    assert balancer.weights[0] > before[0]  # the primary itself agrees with its validation gradient


def test_the_hypergradient_is_the_derivative_of_the_validation_loss_after_the_virtual_step():
    model, balancer = setup(virtual_lr=0.3)
    balancer.weights.copy_(torch.tensor([0.7, 0.2, 0.4]))
    lam = balancer.weights.clone()
    trunk = list(model.trunk.parameters())
    x, y = f64_batch(1)
    x_val, y_val = f64_batch(2)
    # reference: g_j(θ) from the training batch, then L_main on the validation batch at θ − α Σ λ_j g_j
    _, losses = toy_losses(model, x, y)
    g = torch.stack([flat(torch.autograd.grad(losses[t], trunk, retain_graph=True)) for t in TASKS])
    theta = flat(trunk).detach()
    names = [n for n, _ in model.trunk.named_parameters()]

    def validation_loss(weights: torch.Tensor) -> torch.Tensor:
        point = theta - 0.3 * (weights @ g)
        split = point.split([p.numel() for p in trunk])
        pieces = {n: piece.view_as(p) for n, piece, p in zip(names, split, trunk, strict=True)}
        z = torch.func.functional_call(model.trunk, pieces, (x_val,))
        return ((model.heads["main"](z).squeeze(-1) - y_val["main"]) ** 2).mean()

    eps = 1e-6
    expected = torch.stack([
        (validation_loss(lam + eps * e) - validation_loss(lam - eps * e)) / (2 * eps)
        for e in torch.eye(3, dtype=F64)
    ]).detach()
    _, losses = toy_losses(model, x, y)
    record = balancer.backward(losses, shared=trunk, extra_losses=lambda: toy_losses(model, x_val, y_val)[1])
    torch.testing.assert_close(record.extras["hypergradient"], expected, rtol=1e-7, atol=1e-12)
    # and the parameters after the look-ahead are θ again, bit for bit; .grad is the new λ's combination
    assert torch.equal(flat(trunk).detach(), theta)
    torch.testing.assert_close(flat(p.grad for p in trunk), balancer.weights @ g)


def test_lambda_moves_as_torch_adam_on_the_hypergradient_over_several_steps():
    model, balancer = setup(meta_lr=3e-3, weight_init=0.25)
    reference = torch.full((3,), 0.25, dtype=F64, requires_grad=True)
    adam = torch.optim.Adam([reference], lr=3e-3)
    trunk = list(model.trunk.parameters())
    for step in range(4):
        x, y = f64_batch(10 + step)
        x_val, y_val = f64_batch(50 + step)
        _, losses = toy_losses(model, x, y)
        validation = toy_losses(model, x_val, y_val)[1]
        record = balancer.backward(losses, shared=trunk, extra_losses=lambda v=validation: v)
        reference.grad = record.extras["hypergradient"].clone()
        adam.step()
        torch.testing.assert_close(balancer.weights, reference.detach(), rtol=1e-12, atol=1e-15)
        with torch.no_grad():  # a model step, so the next hypergradient differs
            for p in trunk:
                p -= 0.1 * p.grad
                p.grad = None
    assert balancer.adam_steps.tolist() == [4.0, 4.0, 4.0]


def test_an_absent_task_keeps_its_weight_and_adam_moments():
    model, balancer = setup(meta_lr=1e-2)
    initial = balancer.weights.clone()
    x, y = f64_batch(3)
    x_val, y_val = f64_batch(4)
    _, losses = toy_losses(model, x, y)
    del losses["opposed"]
    balancer.backward(losses, shared=model.trunk.parameters(),
                      extra_losses=lambda: toy_losses(model, x_val, y_val)[1])
    assert balancer.weights[2] == initial[2] and balancer.exp_avg[2] == 0 and balancer.adam_steps[2] == 0
    assert balancer.adam_steps[:2].tolist() == [1.0, 1.0] and (balancer.weights[:2] != initial[:2]).all()


def test_state_round_trips_and_the_restored_balancer_takes_the_same_next_step():
    model, balancer = setup(meta_lr=1e-2)
    trunk = list(model.trunk.parameters())
    x_val, y_val = f64_batch(9)

    def closure():
        return toy_losses(model, x_val, y_val)[1]

    for step in range(3):
        x, y = f64_batch(step)
        balancer.backward(toy_losses(model, x, y)[1], shared=trunk, extra_losses=closure)
    restored = taskbalance.make("auto-lambda", TASKS, main="main", meta_lr=1e-2)
    restored.load_state_dict(copy.deepcopy(balancer.state_dict()))
    assert restored.step_count == 3
    x, y = f64_batch(7)
    records = [b.backward(toy_losses(model, x, y)[1], shared=trunk, extra_losses=closure)
               for b in (balancer, restored)]
    assert torch.equal(records[0].weights, records[1].weights)
    for name in ("weights", "exp_avg", "exp_avg_sq", "adam_steps"):
        assert torch.equal(getattr(balancer, name), getattr(restored, name)), name


def test_without_a_closure_the_error_names_the_fix_and_nothing_is_written():
    model, balancer = setup()
    x, y = f64_batch(0)
    with pytest.raises(ValueError, match=r"auto-lambda draws 1 extra validation batch.*extra_losses=fn"):
        balancer.backward(toy_losses(model, x, y)[1], shared=model.trunk.parameters())
    assert all(p.grad is None for p in model.parameters()) and balancer.step_count == 0


def test_a_nan_on_the_validation_batch_raises_and_leaves_state_and_parameters_unchanged():
    model, balancer = setup()
    trunk = list(model.trunk.parameters())
    x, y = f64_batch(0)
    x_val, y_val = f64_batch(1)
    y_val["main"][0] = float("nan")
    state = copy.deepcopy(balancer.state_dict())
    theta = flat(trunk).detach().clone()
    with pytest.raises(NonFiniteLossError, match="main"):
        balancer.backward(toy_losses(model, x, y)[1], shared=trunk,
                          extra_losses=lambda: toy_losses(model, x_val, y_val)[1])
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(balancer.state_dict()[key], value), key
    assert torch.equal(flat(trunk).detach(), theta)
    assert all(p.grad is None for p in model.parameters())


def test_options_roles_and_the_meta_batch_source():
    balancer = taskbalance.make("auto-lambda", TASKS)
    assert balancer.roles.targets == ("main",) and balancer.extra_batches == 1
    assert balancer.extra_batch_source == "validation" and balancer.needs == "jacobian"
    assert taskbalance.make("auto-lambda", TASKS, targets=TASKS).roles.targets == tuple(TASKS)
    assert taskbalance.make("auto-lambda", TASKS, meta_source="training").extra_batch_source == "training"
    assert "1 extra validation batch" in taskbalance.method_info("auto-lambda").cost
    bad_options = ({"meta_lr": 0.0}, {"virtual_lr": -1.0}, {"meta_source": "test"},
                   {"weight_init": float("nan")})
    for bad in bad_options:
        with pytest.raises(ValueError):
            taskbalance.make("auto-lambda", TASKS, **bad)
    with pytest.raises(ValueError, match="not defined on feature-level"):
        taskbalance.make("auto-lambda", TASKS, gradients="features")


def test_min_weight_clamps_lambda():
    model, balancer = setup(meta_lr=0.5, min_weight=0.0)
    x, y = f64_batch(0)
    x_val, y_val = f64_batch(1)
    for _ in range(3):
        balancer.backward(toy_losses(model, x, y)[1], shared=model.trunk.parameters(),
                          extra_losses=lambda: toy_losses(model, x_val, y_val)[1])
    assert (balancer.weights >= 0).all() and (balancer.weights == 0).any()
