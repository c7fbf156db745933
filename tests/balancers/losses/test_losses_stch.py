"""STCH (Lin et al. 2024, LibMTL recipe): Σ log L during warm-up, then K μ log Σ exp(log(L/n)/μ)."""

from __future__ import annotations

import pytest
import torch
from torchjd.scalarization import STCH as ReferenceSTCH

import taskbalance

TASKS = ["a", "b", "c"]


def leaves(values):
    return {t: torch.tensor(float(v), requires_grad=True) for t, v in zip(TASKS, values, strict=True)}


def libmtl_stch(losses: torch.Tensor, nadir: torch.Tensor, mu: float) -> torch.Tensor:
    """LibMTL's post-warm-up objective, written out independently."""
    logs = torch.log(losses / nadir + 1e-20)
    shifted = logs - logs.detach().max()
    return mu * torch.log(torch.exp(shifted / mu).sum()) * losses.numel()


def test_warm_up_is_the_sum_of_log_losses_then_the_smooth_maximum_with_the_nadir_point():
    mu, warmup = 0.5, 2
    balancer = taskbalance.make("stch", TASKS, mu=mu, warmup_epoch=warmup)
    g = torch.Generator().manual_seed(0)
    nadir_epoch = []
    for epoch in range(warmup + 1):  # epochs 0..warmup inclusive: Σ log L
        for _ in range(3):
            values = 0.5 + torch.rand(3, generator=g)
            if epoch == warmup:
                nadir_epoch.append(values)
            record = balancer.backward(leaves(values.tolist()))
            torch.testing.assert_close(record.weights, 1 / values)
        balancer.end_epoch()
    nadir = torch.stack(nadir_epoch).mean(dim=0)
    torch.testing.assert_close(balancer.nadir, nadir)
    for _ in range(3):
        values = (0.2 + torch.rand(3, generator=g)).requires_grad_(True)
        record = balancer.backward(leaves(values.tolist()))
        libmtl_stch(values, nadir, mu).backward()
        torch.testing.assert_close(record.weights, values.grad)


def test_gradient_is_k_times_torchjd_stch_of_the_normalised_log_losses():
    balancer = taskbalance.make("stch", TASKS, mu=0.3, warmup_epoch=0)
    balancer.backward(leaves([2.0, 4.0, 8.0]))
    balancer.end_epoch()
    values = torch.tensor([1.0, 3.0, 2.0], requires_grad=True)
    record = balancer.backward(leaves(values.tolist()))
    objectives = torch.log(values / torch.tensor([2.0, 4.0, 8.0]))
    ReferenceSTCH(mu=0.3, weights=torch.ones(3))(objectives).backward()  # λ = 1, ideal point 0
    torch.testing.assert_close(record.weights, 3 * values.grad)


def test_small_mu_concentrates_the_weight_on_the_worst_normalised_task():
    balancer = taskbalance.make("stch", TASKS, mu=0.01, warmup_epoch=0)
    balancer.backward(leaves([1.0, 1.0, 1.0]))
    balancer.end_epoch()
    record = balancer.backward(leaves([0.5, 2.0, 1.0]))
    torch.testing.assert_close(record.weights, torch.tensor([0.0, 3 / 2.0, 0.0]), atol=1e-6, rtol=1e-5)


def test_defaults_follow_libmtl_five_warm_up_epochs():
    balancer = taskbalance.make("stch", TASKS)
    assert (balancer.mu, balancer.warmup_epoch) == (1.0, 4)
    phases = []
    for _ in range(6):
        phases.append(balancer.warming_up)
        balancer.backward(leaves([1.0, 2.0, 4.0]))
        balancer.end_epoch()
    assert phases == [True] * 5 + [False]


def test_without_end_epoch_it_stays_in_warm_up():
    balancer = taskbalance.make("stch", TASKS, warmup_epoch=0)
    for _ in range(5):
        record = balancer.backward(leaves([1.0, 2.0, 4.0]))
    torch.testing.assert_close(record.weights, torch.tensor([1.0, 0.5, 0.25]))
    assert balancer.warming_up


def test_task_absent_from_the_nadir_epoch_gets_nadir_one():
    balancer = taskbalance.make("stch", TASKS, warmup_epoch=0)
    balancer.backward({t: v for t, v in leaves([2.0, 9.0, 4.0]).items() if t != "b"})
    balancer.end_epoch()
    torch.testing.assert_close(balancer.nadir, torch.tensor([2.0, 1.0, 4.0]))


@pytest.mark.parametrize(("kwargs", "match"), [({"mu": 0.0}, "mu"), ({"warmup_epoch": -1}, "warmup_epoch"),
                                               ({"warmup_epoch": 1.5}, "warmup_epoch")])
def test_bad_hyperparameters_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        taskbalance.make("stch", TASKS, **kwargs)
