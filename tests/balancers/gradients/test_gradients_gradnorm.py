"""GradNorm: learned weights pull ‖w_k g_k‖ toward (inverse training rate)^α, after an EW first epoch."""

from __future__ import annotations

import pytest
import torch
from test_gradients_pcgrad import TASKS, assert_resume_bit_exact, grads_of
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance
from taskbalance import GradientStep
from taskbalance.balancers.gradients.gradnorm import GradNorm

F64 = torch.float64


def after_first_epoch(losses_epoch0: torch.Tensor, **options) -> GradNorm:
    balancer = GradNorm([f"t{i}" for i in range(losses_epoch0.shape[1])], **options).double()
    for row in losses_epoch0:
        balancer.aggregate(GradientStep.of(torch.zeros(row.shape[0], 3, dtype=F64), row))
    balancer.end_epoch()
    return balancer


def test_first_epoch_is_equal_weighting_and_records_the_mean_losses():
    epoch0 = torch.tensor([[1.0, 4.0, 0.5], [3.0, 2.0, 0.5]], dtype=F64)
    balancer = GradNorm(TASKS).double()
    for row in epoch0:
        aggregation = balancer.aggregate(GradientStep.of(torch.randn(3, 4, dtype=F64), row, torch.arange(3)))
        torch.testing.assert_close(aggregation.weights, torch.ones(3, dtype=F64))
    assert balancer.logits.grad is None
    balancer.end_epoch()
    torch.testing.assert_close(balancer.initial_loss, epoch0.mean(dim=0))


def test_logit_gradient_is_that_of_the_gradnorm_loss():
    jacobian = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    losses = torch.tensor([0.9, 2.0, 0.3], dtype=F64)
    balancer = after_first_epoch(torch.tensor([[1.0, 4.0, 0.5]], dtype=F64), alpha=1.5)
    with torch.no_grad():
        balancer.logits.copy_(torch.tensor([0.2, -0.4, 1.0]))
    aggregation = balancer.aggregate(GradientStep.of(jacobian, losses, torch.arange(3)))

    logits = balancer.logits.detach().clone().requires_grad_()
    weights = 3 * torch.softmax(logits, dim=0)
    norms = weights * jacobian.norm(dim=1)
    rate = losses / torch.tensor([1.0, 4.0, 0.5], dtype=F64)
    target = (norms.mean() * (rate / rate.mean()) ** 1.5).detach()
    (norms - target).abs().sum().backward()
    torch.testing.assert_close(balancer.logits.grad, logits.grad)
    torch.testing.assert_close(aggregation.weights, weights.detach())


def test_weights_move_toward_norms_proportional_to_the_inverse_training_rate():
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([[0.5], [1.0], [2.0], [4.0]], dtype=F64)  # reachable with weights summing to K
    jacobian = torch.randn(4, 10, generator=g, dtype=F64) * scales
    losses = torch.tensor([0.8, 1.0, 1.2, 1.0], dtype=F64)  # epoch-0 losses are 1: L̃ = L
    balancer = after_first_epoch(torch.ones(1, 4, dtype=F64))
    optimizer = torch.optim.SGD(balancer.parameters(), lr=0.01)
    rate = losses / losses.mean()

    def imbalance() -> float:
        """Spread of log(‖w_k g_k‖ / r_k^α): zero when the norms are proportional to r^α."""
        norms = balancer.weights().detach() * jacobian.norm(dim=1)
        return float(torch.log(norms / rate**1.5).std())

    start = imbalance()
    for _ in range(200):
        optimizer.zero_grad()
        balancer.aggregate(GradientStep.of(jacobian, losses, torch.arange(4)))
        optimizer.step()
    assert imbalance() < 0.1 * start
    torch.testing.assert_close(balancer.weights().sum().detach(), torch.tensor(4.0, dtype=F64))
    assert bool((balancer.weights()[:-1] > balancer.weights()[1:]).all())  # larger gradients, smaller weights


def test_a_task_unseen_in_the_first_epoch_takes_its_first_later_loss_as_reference():
    balancer = GradNorm(["a", "b"]).double()
    balancer.aggregate(GradientStep.of(torch.randn(1, 3, dtype=F64), torch.tensor([2.0], dtype=F64)))
    balancer.end_epoch()
    assert balancer.initial_known.tolist() == [True, False]
    balancer.aggregate(GradientStep.of(torch.randn(2, 3, dtype=F64), torch.tensor([1.0, 7.0], dtype=F64)))
    assert balancer.initial_loss.tolist() == [2.0, 7.0] and balancer.initial_known.tolist() == [True, True]


def test_a_missing_task_gets_no_logit_gradient_and_the_present_weights_sum_to_their_count():
    balancer = after_first_epoch(torch.ones(1, 3, dtype=F64))
    losses = torch.tensor([0.5, 2.0], dtype=F64)
    step = GradientStep.of(torch.randn(2, 5, dtype=F64), losses, torch.tensor([0, 2]))
    aggregation = balancer.aggregate(step)
    assert balancer.logits.grad[1] == 0 and bool((balancer.logits.grad[[0, 2]] != 0).all())
    torch.testing.assert_close(aggregation.weights.sum(), torch.tensor(2.0, dtype=F64))


@pytest.mark.parametrize("level", ["parameters", "features"])
def test_backward_scales_trunk_and_heads_by_the_weights(level):
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    balancer = taskbalance.make("gradnorm", TASKS, gradients=level)
    balancer.end_epoch()
    with torch.no_grad():
        balancer.logits.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x, y = toy_batch(TASKS)
    z, losses = toy_losses(model, x, y)
    weights = balancer.weights().detach()
    sum(w * losses[t] for w, t in zip(weights, TASKS, strict=True)).backward(retain_graph=True)
    expected = grads_of(model)
    model.zero_grad(set_to_none=True)
    record = balancer.backward(losses, shared=model.trunk.parameters(), features=z)
    got = grads_of(model)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(record.weights, weights)
    assert record.extras["weighted_norms"].shape == (3,)
    assert balancer.logits.grad is not None


def test_negative_alpha_is_rejected():
    with pytest.raises(ValueError, match="alpha"):
        taskbalance.make("gradnorm", TASKS, alpha=-1.0)


def test_resume_is_bit_exact_across_epochs():
    assert_resume_bit_exact("gradnorm", total=12, cut=5, epoch_every=2)
