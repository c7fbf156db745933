"""EMA loss weighting (docs/method-notes.md §2.4): the properties that hold for the whole family."""

from __future__ import annotations

import pytest
import torch
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance

TASKS = ["a", "b", "c"]


def leaves(values):
    return {t: torch.tensor(float(v), requires_grad=True) for t, v in zip(TASKS, values, strict=True)}


def test_first_step_weights_are_inverse_losses_for_reference_one():
    values = [0.5, 2.0, 40.0]
    record = taskbalance.make("ema", TASKS).backward(leaves(values))
    torch.testing.assert_close(record.weights, 1 / torch.tensor(values))


def test_first_step_weights_are_mean_over_loss_for_reference_mean():
    values = torch.tensor([0.5, 2.0, 40.0])
    record = taskbalance.make("ema", TASKS, reference="mean").backward(leaves(values.tolist()))
    torch.testing.assert_close(record.weights, values.mean() / values)


@pytest.mark.parametrize("init", ["first", "zero"])
def test_constant_losses_converge_geometrically_at_rate_beta(init):
    beta, first, constant = 0.8, 10.0, 2.0
    balancer = taskbalance.make("ema", ["a"], beta=beta, init=init)
    balancer.backward({"a": torch.tensor(first, requires_grad=True)})
    for n in range(1, 8):
        balancer.backward({"a": torch.tensor(constant, requires_grad=True)})
        m = balancer._scale()[0]
        # m_n − L = β^n (m_0 − L) for init="first"; the bias-corrected zero-init EMA has its own closed form
        if init == "first":
            expected = constant + beta**n * (first - constant)
        else:
            raw = (1 - beta) * sum(beta ** (n - j) * (first if j == 0 else constant) for j in range(n + 1))
            expected = raw / (1 - beta ** (n + 1))
        torch.testing.assert_close(m, torch.tensor(expected))


def test_contribution_is_scale_invariant_after_warm_up():
    def shared_gradients(scale: float) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = ToyMultiTask(TASKS)
        balancer = taskbalance.make("ema", TASKS, beta=0.5)
        for step in range(12):  # the batches change; the EMA of the scaled loss is 1000× the plain one
            x, y = toy_batch(TASKS, seed=step)
            model.zero_grad(set_to_none=True)
            _, losses = toy_losses(model, x, y, scales={"b": scale})
            balancer.backward(losses)
        return [p.grad.clone() for p in model.trunk.parameters()]

    for plain, scaled in zip(shared_gradients(1.0), shared_gradients(1000.0), strict=True):
        torch.testing.assert_close(scaled, plain, rtol=1e-4, atol=1e-7)


def test_single_task_is_normalised_to_about_one():
    balancer = taskbalance.make("ema", ["a"])
    for value in [3.0, 3.3, 2.9, 3.1]:
        total, _ = balancer.objective(torch.tensor([value]), torch.tensor([True]))
        assert abs(float(total) - 1.0) < 0.1


def test_detach_false_ablation_reports_its_exact_derivative():
    balancer = taskbalance.make("ema", TASKS, detach=False, beta=0.7)
    for values in ([1.0, 2.0, 3.0], [1.5, 0.5, 4.0], [0.7, 0.9, 2.0]):
        losses = leaves(values)
        record = balancer.backward(losses)
        grads = torch.stack([losses[t].grad for t in TASKS])
        torch.testing.assert_close(grads, record.weights)


def test_task_reference_falls_back_to_one_until_the_reference_task_is_seen():
    balancer = taskbalance.make("ema", TASKS, reference="task:a")
    record = balancer.backward({"b": torch.tensor(4.0, requires_grad=True)})
    torch.testing.assert_close(record.weights, torch.tensor([0.0, 0.25, 0.0]))
    record = balancer.backward(leaves([2.0, 4.0, 8.0]))
    m = balancer._scale()
    torch.testing.assert_close(record.weights, m[0] / (m + 1e-8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"beta": 1.0}, "beta"), ({"reference": "median"}, "reference"), ({"reference": "task:zz"}, "zz"),
     ({"eps": 0.0}, "eps"), ({"max_weight": -1.0}, "max_weight"), ({"detach": False, "reference": "mean"},
                                                                   "detach")],
)
def test_bad_hyperparameters_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        taskbalance.make("ema", TASKS, **kwargs)
