"""DB-MTL: log-loss gradients, an EMA per task, and every task scaled to the largest EMA norm."""

from __future__ import annotations

import pytest
import torch
from test_gradients_pcgrad import TASKS, assert_resume_bit_exact, grads_of, sample_jacobians
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance
from taskbalance import GradientStep
from taskbalance.balancers.gradients.db_mtl import DBMTL

F64 = torch.float64


def balancer_for(k: int, **options) -> DBMTL:
    return DBMTL([f"t{i}" for i in range(k)], **options).double()


@pytest.mark.parametrize("label,jacobian", list(sample_jacobians()))
def test_every_task_contributes_a_vector_of_the_largest_norm(label, jacobian):
    k = jacobian.shape[0]
    losses = torch.linspace(0.5, 3.0, k, dtype=F64)
    aggregation = balancer_for(k).aggregate(GradientStep.of(jacobian, losses, torch.arange(k)))
    ema = 0.1 * jacobian / (losses[:, None] + 1e-8)  # first step: h = (1 − β) ∇log L from h = 0
    norms = ema.norm(dim=1)
    contributions = aggregation.extras["alpha"][:, None] * ema
    # α_k = max_j ‖h_j‖ / (‖h_k‖ + ε): the largest norm, up to the ε that keeps a vanishing gradient at bay
    expected = norms.max() * norms / (norms + 1e-8)
    torch.testing.assert_close(contributions.norm(dim=1), expected, rtol=1e-9, atol=0)
    large = norms > 1e-2
    top = norms.max().expand(int(large.sum()))
    torch.testing.assert_close(contributions[large].norm(dim=1), top, rtol=1e-5, atol=0)
    torch.testing.assert_close(aggregation.direction, contributions.sum(dim=0))
    assert bool(torch.isfinite(aggregation.direction).all())


def test_rescaling_a_task_loss_does_not_change_the_update():
    jacobian = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    losses = torch.tensor([0.3, 1.2, 2.0], dtype=F64)
    scale = torch.tensor([1.0, 1000.0, 1e-3], dtype=F64)  # L_k → c_k L_k multiplies g_k by c_k too
    plain = balancer_for(3).aggregate(GradientStep.of(jacobian, losses, torch.arange(3))).direction
    scaled = balancer_for(3).aggregate(GradientStep.of(
        jacobian * scale[:, None], losses * scale, torch.arange(3)
    )).direction
    torch.testing.assert_close(scaled, plain, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("beta,beta_sigma", [(0.9, 0.0), (0.5, 0.5)])
def test_the_buffer_is_an_ema_of_log_loss_gradients(beta, beta_sigma):
    g = torch.Generator().manual_seed(1)
    balancer = balancer_for(2, beta=beta, beta_sigma=beta_sigma)
    ema = torch.zeros(2, 5, dtype=F64)
    for t in range(1, 5):
        jacobian = torch.randn(2, 5, generator=g, dtype=F64)
        losses = torch.rand(2, generator=g, dtype=F64) + 0.1
        balancer.aggregate(GradientStep.of(jacobian, losses, torch.arange(2)))
        log_gradients = jacobian / (losses[:, None] + 1e-8)
        ema = log_gradients + beta / t**beta_sigma * (ema - log_gradients)
        torch.testing.assert_close(balancer.ema, ema)


def test_a_missing_task_keeps_its_ema_and_step_count():
    balancer = balancer_for(3)
    balancer.aggregate(GradientStep.of(
        torch.randn(3, 4, dtype=F64), torch.ones(3, dtype=F64), torch.arange(3)
    ))
    before = balancer.ema.clone()
    balancer.aggregate(GradientStep.of(
        torch.randn(2, 4, dtype=F64), torch.ones(2, dtype=F64), torch.tensor([0, 2])
    ))
    assert torch.equal(balancer.ema[1], before[1]) and balancer.task_steps.tolist() == [2.0, 1.0, 2.0]


def test_backward_trains_heads_on_log_losses_and_the_trunk_on_the_balanced_ema():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS, scales={"a": 10.0})
    _, losses = toy_losses(model, x, y)
    sum(torch.log(v + 1e-8) for v in losses.values()).backward(retain_graph=True)
    log_heads = {n: g for n, g in grads_of(model).items() if n.startswith("heads")}
    model.zero_grad(set_to_none=True)
    balancer = taskbalance.make("db-mtl", TASKS)
    record = balancer.backward(losses, shared=model.trunk.parameters())
    got = grads_of(model)
    for name, expected in log_heads.items():
        torch.testing.assert_close(got[name], expected)
    values = torch.stack([losses[t].detach() for t in TASKS])
    torch.testing.assert_close(record.weights, 1 / (values + 1e-8))
    shared = torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()])
    torch.testing.assert_close(shared, record.extras["alpha"] @ balancer.ema)


def test_negative_losses_are_rejected():
    model = ToyMultiTask(TASKS)
    _, losses = toy_losses(model, *toy_batch(TASKS))
    losses["b"] = losses["b"] - 100.0
    with pytest.raises(ValueError, match="logarithm.*'b'"):
        taskbalance.make("db-mtl", TASKS).backward(losses, shared=model.trunk.parameters())


def test_changing_the_shared_parameters_is_an_error():
    balancer = balancer_for(2)
    balancer.aggregate(GradientStep.of(
        torch.randn(2, 4, dtype=F64), torch.ones(2, dtype=F64), torch.arange(2)
    ))
    with pytest.raises(ValueError, match="same shared parameters"):
        balancer.aggregate(GradientStep.of(
            torch.randn(2, 5, dtype=F64), torch.ones(2, dtype=F64), torch.arange(2)
        ))


@pytest.mark.parametrize("options,match", [({"beta": 1.0}, "beta"), ({"beta_sigma": -1.0}, "beta_sigma"),
                                           ({"eps": 0.0}, "eps")])
def test_bad_hyperparameters_are_rejected(options, match):
    with pytest.raises(ValueError, match=match):
        taskbalance.make("db-mtl", TASKS, **options)


def test_refuses_feature_level_gradients():
    with pytest.raises(ValueError, match="not defined on feature-level"):
        taskbalance.make("db-mtl", TASKS, gradients="features")


def test_resume_is_bit_exact_and_a_fresh_balancer_loads_the_sized_buffer():
    assert_resume_bit_exact("db-mtl", beta_sigma=0.5)
