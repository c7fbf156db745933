"""GradDrop: per entry, the kept gradients share one sign, chosen with probability given by the purity."""

from __future__ import annotations

import pytest
import torch
from test_gradients_pcgrad import TASKS, assert_resume_bit_exact, grads_of, sample_jacobians
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance
from taskbalance import GradientStep
from taskbalance.balancers.gradients.graddrop import GradDrop, sign_dropout


def drop(jacobian: torch.Tensor, seed: int = 0, **options) -> torch.Tensor:
    k = jacobian.shape[0]
    balancer = GradDrop([f"t{i}" for i in range(k)], seed=seed, **options)
    return balancer.aggregate(GradientStep.of(jacobian)).direction


@pytest.mark.parametrize("label,jacobian", list(sample_jacobians()))
def test_every_entry_keeps_the_gradients_of_one_sign_only(label, jacobian):
    positive = jacobian.clamp(min=0).sum(dim=0)
    negative = jacobian.clamp(max=0).sum(dim=0)
    for seed in range(3):
        direction = drop(jacobian, seed)
        assert bool(((direction == positive) | (direction == negative)).all()), label


@pytest.mark.parametrize("seed", range(5))
def test_masks_are_sign_consistent_within_each_column(seed):
    statistics = torch.randn(6, 200, generator=torch.Generator().manual_seed(seed))
    masks = sign_dropout(statistics, torch.rand(200, generator=torch.Generator().manual_seed(seed + 100)))
    all_positive = (masks == (statistics > 0)).all(dim=0)
    all_negative = (masks == (statistics < 0)).all(dim=0)
    assert bool((all_positive | all_negative).all())  # each column keeps exactly the entries of one sign


def test_unanimous_signs_are_always_kept():
    jacobian = torch.rand(4, 50, generator=torch.Generator().manual_seed(0)) + 0.1
    for seed in range(3):
        torch.testing.assert_close(drop(jacobian, seed), jacobian.sum(dim=0))
        torch.testing.assert_close(drop(-jacobian, seed), -jacobian.sum(dim=0))


def test_the_positive_sign_wins_with_probability_equal_to_the_purity():
    # column statistics (1, −3): purity P = ½ (1 + (1 − 3) / (1 + 3)) = 0.25
    jacobian = torch.tensor([[1.0], [-3.0]]).expand(2, 20000).contiguous()
    direction = drop(jacobian, seed=0)
    share_positive = float((direction > 0).double().mean())
    assert abs(share_positive - 0.25) < 0.015


def test_leak_one_is_the_plain_sum_and_leak_is_per_task():
    jacobian = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(drop(jacobian, leak=1.0), jacobian.sum(dim=0))
    half = drop(jacobian, seed=4, leak=[1.0, 0.0, 0.0])
    masks = sign_dropout(jacobian, torch.rand(40, generator=torch.Generator().manual_seed(4)))
    expected = jacobian[0] + (masks[1:].to(jacobian.dtype) * jacobian[1:]).sum(dim=0)
    torch.testing.assert_close(half, expected)


def test_all_zero_statistics_give_a_zero_update_not_nan():
    direction = drop(torch.zeros(3, 7))
    assert torch.equal(direction, torch.zeros(7))


def test_backward_masks_the_feature_gradient_by_batch_summed_signs():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    z, losses = toy_losses(model, x, y)
    # the spec step by step: per-task feature gradients, sign statistics summed over the batch, masks
    feature_grads = torch.stack([torch.autograd.grad(losses[t], z, retain_graph=True)[0] for t in TASKS])
    statistics = (feature_grads * z.detach().sign()).sum(dim=1)  # (K, width)
    uniform = torch.rand(statistics.shape[1], generator=torch.Generator().manual_seed(5))
    masks = sign_dropout(statistics, uniform).to(z.dtype)  # (K, width), broadcast over the batch
    combined = (masks[:, None, :] * feature_grads).sum(dim=0)
    expected_trunk = torch.autograd.grad(z, list(model.trunk.parameters()), combined, retain_graph=True)
    sum(losses.values()).backward(retain_graph=True)
    plain_heads = {n: g for n, g in grads_of(model).items() if n.startswith("heads")}
    model.zero_grad(set_to_none=True)

    record = taskbalance.make("graddrop", TASKS, seed=5).backward(losses, features=z)
    got = grads_of(model)
    for p, expected in zip(model.trunk.parameters(), expected_trunk, strict=True):
        torch.testing.assert_close(p.grad, expected)
    for name, expected in plain_heads.items():
        torch.testing.assert_close(got[name], expected)
    torch.testing.assert_close(record.weights, torch.ones(3))
    torch.testing.assert_close(record.extras["kept_fraction"], masks.mean(dim=1))


def test_is_defined_on_features_only():
    with pytest.raises(ValueError, match="only on feature-level"):
        taskbalance.make("graddrop", TASKS, gradients="parameters")
    balancer = taskbalance.make("graddrop", TASKS)
    model = ToyMultiTask(TASKS)
    _, losses = toy_losses(model, *toy_batch(TASKS))
    with pytest.raises(ValueError, match="features"):
        balancer.backward(losses, shared=model.trunk.parameters())


@pytest.mark.parametrize("leak", [-0.1, 1.5, [0.1, 0.2]])
def test_bad_leak_is_rejected(leak):
    with pytest.raises(ValueError, match="leak"):
        taskbalance.make("graddrop", TASKS, leak=leak)


def test_resume_continues_the_uniform_draws_bit_for_bit():
    assert_resume_bit_exact("graddrop", level="features", seed=9, leak=0.1)
