"""DWA (Liu et al. 2019): uniform for two epochs, then K · softmax(r / T) of epoch-average loss ratios."""

from __future__ import annotations

import pytest
import torch
from torchjd.scalarization import DWA as ReferenceDWA

import taskbalance

TASKS = ["a", "b", "c"]


def leaves(values):
    return {t: torch.tensor(float(v), requires_grad=True) for t, v in zip(TASKS, values, strict=True)}


def epochs_of_losses(epochs: int, steps: int, seed: int = 0) -> torch.Tensor:
    """(epochs, steps, K) positive losses that shrink at task-dependent rates."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.tensor([0.5, 0.8, 0.95])
    base = torch.stack([decay**e for e in range(epochs)])  # (epochs, K)
    return base[:, None, :] * (1 + 0.3 * torch.rand(epochs, steps, 3, generator=g))


def test_first_two_epochs_are_uniform_then_the_softmax_formula():
    temperature = 2.0
    history = epochs_of_losses(epochs=5, steps=3)
    balancer = taskbalance.make("dwa", TASKS)
    for epoch in range(5):
        for values in history[epoch]:
            record = balancer.backward(leaves(values.tolist()))
            if epoch < 2:
                assert record.weights.tolist() == [1.0, 1.0, 1.0]
            else:  # LibMTL: w = K softmax(L̄(e−1) / L̄(e−2) / T) with epoch-averaged training losses
                averages = history.mean(dim=1)
                rates = averages[epoch - 1] / averages[epoch - 2]
                expected = 3 * torch.softmax(rates / temperature, dim=0)
                torch.testing.assert_close(record.weights, expected)
        balancer.end_epoch()


def test_the_fastest_decreasing_task_gets_the_smallest_weight():
    balancer = taskbalance.make("dwa", TASKS)
    for epoch in range(3):
        balancer.backward(leaves([0.5**epoch, 0.9**epoch, 1.0]))
        balancer.end_epoch()
    record = balancer.backward(leaves([1.0, 1.0, 1.0]))
    w = record.weights
    assert w[0] < w[1] < w[2]
    torch.testing.assert_close(w.sum(), torch.tensor(3.0))


def test_agrees_with_torchjd_dwa_over_a_run():
    history = epochs_of_losses(epochs=5, steps=4, seed=1)
    ours, reference = taskbalance.make("dwa", TASKS, temperature=1.5), ReferenceDWA(temperature=1.5)
    for epoch in range(5):
        for values in history[epoch]:
            losses = leaves(values.tolist())
            record = ours.backward(losses)
            stacked = values.clone().requires_grad_(True)
            reference(stacked).backward()
            torch.testing.assert_close(record.weights, stacked.grad)
            torch.testing.assert_close(torch.stack([losses[t].grad for t in TASKS]), stacked.grad)
        ours.end_epoch()
        reference.step()


def test_missing_tasks_are_averaged_over_the_steps_they_appear_in():
    balancer = taskbalance.make("dwa", TASKS)
    balancer.backward(leaves([1.0, 2.0, 3.0]))
    balancer.backward({"a": torch.tensor(3.0, requires_grad=True)})
    balancer.end_epoch()
    torch.testing.assert_close(balancer.last_average, torch.tensor([2.0, 2.0, 3.0]))


def test_softmax_runs_over_present_tasks_only():
    balancer = taskbalance.make("dwa", TASKS)
    for epoch in range(2):
        balancer.backward(leaves([0.5**epoch, 0.9**epoch, 1.0]))
        balancer.end_epoch()
    record = balancer.backward({t: v for t, v in leaves([1.0, 9.0, 1.0]).items() if t != "b"})
    rates = torch.tensor([0.5, 1.0])
    expected = 2 * torch.softmax(rates / 2.0, dim=0)
    torch.testing.assert_close(record.weights, torch.stack([expected[0], torch.tensor(0.0), expected[1]]))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_bad_temperature_is_rejected(temperature):
    with pytest.raises(ValueError, match="temperature"):
        taskbalance.make("dwa", TASKS, temperature=temperature)
