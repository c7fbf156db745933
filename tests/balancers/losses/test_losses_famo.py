"""FAMO (Liu et al. 2023): weights c z / ℓ; logits ξ updated after the model step from the log-loss change."""

from __future__ import annotations

import pytest
import torch
from torchjd.scalarization import FAMO as ReferenceFAMO

import taskbalance

TASKS = ["a", "b", "c"]


def leaves(values):
    return {t: torch.tensor(float(v), requires_grad=True) for t, v in zip(TASKS, values, strict=True)}


def loss_pairs(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(before, after) loss vectors: the model step decreases each loss by a task-dependent factor."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(steps):
        before = 0.5 + 2 * torch.rand(3, generator=g)
        after = before * (0.7 + 0.3 * torch.rand(3, generator=g))
        pairs.append((before, after))
    return pairs


def test_weights_are_a_convex_combination_proportional_to_z_over_loss():
    balancer = taskbalance.make("famo", TASKS)
    with torch.no_grad():
        balancer.logits.copy_(torch.tensor([0.5, -1.0, 0.2]))
    values = torch.tensor([0.3, 2.0, 5.0])
    record = balancer.backward(leaves(values.tolist()))
    z = torch.softmax(balancer.logits, dim=0)
    expected = (z / (values + 1e-8)) / (z / (values + 1e-8)).sum()
    torch.testing.assert_close(record.weights, expected)
    torch.testing.assert_close(record.weights.sum(), torch.tensor(1.0))


def test_logit_update_equals_the_formula_with_adam():
    w_lr, gamma = 0.025, 1e-3
    balancer = taskbalance.make("famo", TASKS, w_lr=w_lr, gamma=gamma)
    logits = torch.zeros(3, requires_grad=True)
    adam = torch.optim.Adam([logits], lr=w_lr, weight_decay=gamma)
    for before, after in loss_pairs(6):
        balancer.backward(leaves(before.tolist()))
        balancer.after_step(leaves(after.tolist()))
        delta = torch.log(before + 1e-8) - torch.log(after + 1e-8)
        # J_softmaxᵀ δ by autograd
        (grad,) = torch.autograd.grad(torch.softmax(logits, dim=0), logits, grad_outputs=delta)
        logits.grad = grad
        adam.step()
        torch.testing.assert_close(balancer.logits, logits.detach())


def test_sgd_logit_optimiser_is_algorithm_one():
    w_lr, gamma = 0.1, 0.01
    balancer = taskbalance.make("famo", TASKS, w_lr=w_lr, gamma=gamma, logit_optimizer="sgd")
    xi = torch.zeros(3)
    for before, after in loss_pairs(4, seed=1):
        balancer.backward(leaves(before.tolist()))
        balancer.after_step(leaves(after.tolist()))
        z = torch.softmax(xi, dim=0)
        delta = torch.log(before) - torch.log(after)
        xi = xi - w_lr * (z * (delta - (z * delta).sum()) + gamma * xi)  # ξ ← ξ − β(J_softmaxᵀδ + γξ)
        torch.testing.assert_close(balancer.logits, xi)


def test_the_task_that_improves_least_gains_weight():
    balancer = taskbalance.make("famo", TASKS, w_lr=0.1)
    for _ in range(20):
        balancer.backward(leaves([1.0, 1.0, 1.0]))
        balancer.after_step(leaves([0.5, 0.5, 0.95]))  # task c decreases slowest
    z = balancer.task_weights()
    assert z[2] > z[0] and z[2] > z[1]


def test_agrees_with_torchjd_famo_over_a_run():
    ours = taskbalance.make("famo", TASKS)
    reference = ReferenceFAMO(3, lr=0.025, weight_decay=1e-3)
    for before, after in loss_pairs(8, seed=2):
        record = ours.backward(leaves(before.tolist()))
        stacked = before.clone().requires_grad_(True)
        reference(stacked).backward()
        torch.testing.assert_close(record.weights, stacked.grad)
        ours.after_step(leaves(after.tolist()))
        reference.update(after)
        torch.testing.assert_close(ours.logits, reference._w.detach())


def test_logits_are_internal_not_user_parameters():
    balancer = taskbalance.make("famo", TASKS)
    assert list(balancer.parameters()) == []
    assert {"logits", "adam_first_moment", "adam_second_moment", "adam_steps"} <= set(balancer.state_dict())
    assert balancer.needs_post_step_losses and balancer.takes_log_of_losses


def test_after_step_must_follow_backward():
    balancer = taskbalance.make("famo", TASKS)
    with pytest.raises(RuntimeError, match="after_step"):
        balancer.after_step(leaves([1.0, 1.0, 1.0]))
    balancer.backward(leaves([1.0, 1.0, 1.0]))
    balancer.after_step(leaves([0.9, 0.9, 0.9]))
    with pytest.raises(RuntimeError, match="after_step"):
        balancer.after_step(leaves([0.9, 0.9, 0.9]))


def test_min_losses_shift_the_logarithm_per_task():
    balancer = taskbalance.make("famo", TASKS, min_losses={"b": 0.5})
    record = balancer.backward(leaves([1.0, 1.0, 0.25]))
    gaps = torch.tensor([1.0, 0.5, 0.25]) + 1e-8
    torch.testing.assert_close(record.weights, (1 / gaps) / (1 / gaps).sum())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"w_lr": -1.0}, "w_lr"), ({"gamma": -0.1}, "gamma"),
     ({"logit_optimizer": "rmsprop"}, "logit_optimizer"),
     ({"min_losses": {"zz": 1.0}}, "zz"), ({"betas": (0.9, 1.0)}, "betas"), ({"adam_eps": 0.0}, "adam_eps")],
)
def test_bad_hyperparameters_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        taskbalance.make("famo", TASKS, **kwargs)


def test_next_batch_mode_needs_no_extra_forward_and_updates_logits_from_the_next_losses():
    """Our extension: δ is measured between consecutive steps' losses instead of a re-evaluated batch."""
    import taskbalance as tb

    tasks = ["a", "b"]
    lagged = tb.make("famo", tasks, loss_change="next_batch", logit_optimizer="sgd", w_lr=0.5, gamma=0.0)
    paper = tb.make("famo", tasks, logit_optimizer="sgd", w_lr=0.5, gamma=0.0)
    assert not lagged.needs_post_step_losses and paper.needs_post_step_losses
    first = [torch.tensor(2.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)]
    second = [torch.tensor(1.0, requires_grad=True), torch.tensor(0.9, requires_grad=True)]
    lagged.backward(dict(zip(tasks, first, strict=True)))
    lagged.after_step(dict(zip(tasks, second, strict=True)))  # a no-op in this mode
    assert torch.equal(lagged.logits, torch.zeros(2))
    lagged.backward(dict(zip(tasks, second, strict=True)))
    paper.backward(dict(zip(tasks, first, strict=True)))
    paper.after_step({t: v.detach() for t, v in zip(tasks, second, strict=True)})
    torch.testing.assert_close(lagged.logits, paper.logits)
    assert not torch.equal(lagged.logits, torch.zeros(2))
