"""GCS: targets weight 1; an auxiliary counts only while its gradient agrees with the target's."""

import pytest
import torch
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance as tb
from taskbalance import GradientStep
from taskbalance.balancers.gradients.gcs import GradientCosineSimilarity, target_cosines

TASKS = ["main", "aux1", "aux2"]


def aggregate(balancer, jacobian):
    return balancer.aggregate(GradientStep.of(jacobian))


def test_opposite_auxiliary_gets_weight_zero_and_aligned_gets_one():
    g = torch.randn(20, generator=torch.Generator().manual_seed(0))
    jacobian = torch.stack([g, -2.0 * g, 0.5 * g])
    aggregation = aggregate(tb.make("gcs", TASKS, main="main"), jacobian)
    assert aggregation.weights.tolist() == [1.0, 0.0, 1.0]
    torch.testing.assert_close(aggregation.extras["cosine"], torch.tensor([1.0, -1.0, 1.0]))


def test_weighted_mode_uses_the_clipped_cosine():
    generator = torch.Generator().manual_seed(1)
    jacobian = torch.randn(3, 30, generator=generator)
    aggregation = aggregate(tb.make("gcs", TASKS, mode="weighted"), jacobian)
    g_main = jacobian[0]
    expected = [1.0] + [
        max(0.0, float(torch.dot(row, g_main) / (row.norm() * g_main.norm()))) for row in jacobian[1:]
    ]
    torch.testing.assert_close(aggregation.weights, torch.tensor(expected))


@pytest.mark.parametrize("seed", range(5))
def test_combined_update_never_opposes_the_target_gradient(seed):
    jacobian = torch.randn(4, 12, generator=torch.Generator().manual_seed(seed))
    aggregation = aggregate(tb.make("gcs", ["t", "a", "b", "c"]), jacobian)
    update = aggregation.weights @ jacobian
    assert torch.dot(update, jacobian[0]) >= jacobian[0].norm() ** 2 - 1e-5


def test_target_order_does_not_matter_and_several_targets_use_their_sum():
    generator = torch.Generator().manual_seed(2)
    jacobian = torch.randn(3, 10, generator=generator)
    balancer = tb.make("gcs", TASKS, targets=["main", "aux1"], mode="weighted")
    aggregation = aggregate(balancer, jacobian)
    reference = jacobian[0] + jacobian[1]
    cos = torch.dot(jacobian[2], reference) / (jacobian[2].norm() * reference.norm())
    expected = torch.stack([torch.tensor(1.0), torch.tensor(1.0), cos.clamp_min(0)])
    torch.testing.assert_close(aggregation.weights, expected)


def test_zero_gradients_give_weight_zero_not_nan():
    jacobian = torch.zeros(3, 5)
    jacobian[0, 0] = 1.0
    weights = aggregate(tb.make("gcs", TASKS, mode="weighted"), jacobian).weights
    assert weights.tolist() == [1.0, 0.0, 0.0]
    assert torch.isfinite(target_cosines(torch.zeros(2, 4), torch.tensor([True, False]))).all()


def test_backward_fills_shared_grad_with_gated_sum_and_heads_with_their_own_gradient():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS, seed=3)
    _, losses = toy_losses(model, x, y)
    shared = list(model.trunk.parameters())
    rows = []
    for name in TASKS:
        grads = torch.autograd.grad(losses[name], shared, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    jacobian = torch.stack(rows)
    expected_weights = aggregate(GradientCosineSimilarity(TASKS), jacobian).weights
    expected_heads = {
        n: torch.autograd.grad(losses[n], model.heads[n].weight, retain_graph=True)[0] for n in TASKS
    }

    record = tb.make("gcs", TASKS).backward(losses, shared=shared)
    torch.testing.assert_close(record.weights, expected_weights)
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(got, expected_weights @ jacobian, atol=1e-6, rtol=1e-5)
    for name in TASKS:  # heads: their own, unscaled gradient (reference LibMTL behaviour)
        torch.testing.assert_close(model.heads[name].weight.grad, expected_heads[name])


def test_missing_target_switches_auxiliaries_off_without_nan():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    _, losses = toy_losses(model, x, y)
    del losses["main"]
    record = tb.make("gcs", TASKS, mode="weighted").backward(losses, shared=model.trunk.parameters())
    assert record.skipped == {"main": "missing"}
    assert record.weights.tolist() == [0.0, 0.0, 0.0]
    assert all(torch.isfinite(p.grad).all() for p in model.trunk.parameters())


def test_feature_level_gradients_are_accepted():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    z, losses = toy_losses(model, x, y)
    balancer = tb.make("gcs", TASKS, gradients="features")
    record = balancer.backward(losses, shared=model.trunk.parameters(), features=z)
    assert record.weights[0] == 1.0


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        tb.make("gcs", TASKS, mode="soft")
