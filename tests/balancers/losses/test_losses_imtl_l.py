"""IMTL-L (Liu et al., ICLR 2021, Eq. 5) on its own: L = Σ_k e^{s_k} L_k − s_k, agreement with TorchJD."""

from __future__ import annotations

import torch
from torchjd.scalarization import IMTLL as TorchJDIMTLL

import taskbalance

TASKS = ["a", "b", "c"]


def test_value_and_scale_gradients_agree_with_torchjd_after_training_steps():
    ours = taskbalance.make("imtl-l", TASKS)
    theirs = TorchJDIMTLL(3)
    g = torch.Generator().manual_seed(0)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1)
    for _ in range(5):
        values = torch.rand(3, generator=g) * 10
        losses = {t: v.clone().requires_grad_(True) for t, v in zip(TASKS, values, strict=True)}
        reference = values.clone().requires_grad_(True)
        opt_ours.zero_grad()
        opt_theirs.zero_grad()
        record = ours.backward(losses)
        total = theirs(reference)
        total.backward()
        torch.testing.assert_close(ours.loss_scale.grad, theirs.log_scale.grad)
        torch.testing.assert_close(torch.stack([losses[t].grad for t in TASKS]), reference.grad)
        torch.testing.assert_close(record.weights, reference.grad)
        opt_ours.step()
        opt_theirs.step()
    torch.testing.assert_close(ours.loss_scale.detach(), theirs.log_scale.detach())


def test_training_the_scales_makes_every_scaled_loss_one():
    """The defining claim: at the optimum of s, e^{s_k} L_k = 1 for every task, whatever the loss scales."""
    balancer = taskbalance.make("imtl-l", TASKS)
    optimizer = torch.optim.SGD(balancer.parameters(), lr=0.05)
    values = {"a": 0.01, "b": 1.0, "c": 300.0}
    for _ in range(4000):
        optimizer.zero_grad()
        balancer.backward({t: torch.tensor(v, requires_grad=True) for t, v in values.items()})
        optimizer.step()
    scaled = balancer.loss_scale.detach().exp() * torch.tensor(list(values.values()))
    torch.testing.assert_close(scaled, torch.ones(3), rtol=1e-3, atol=1e-3)


def test_missing_task_scale_gets_no_gradient():
    balancer = taskbalance.make("imtl-l", TASKS)
    losses = {"a": torch.tensor(2.0, requires_grad=True), "c": torch.tensor(3.0, requires_grad=True)}
    balancer.backward(losses)
    torch.testing.assert_close(balancer.loss_scale.grad, torch.tensor([1.0, 0.0, 2.0]))
