"""MoDo (Chen et al., NeurIPS 2023): λ ← Π_Δ(λ − γ(J₁J₂ᵀλ + ρλ)) from two independent batches, update J₃ᵀλ.

* the λ step and the update equal LibMTL's ``MoDo.backward`` formula (re-written below in float64 with its
  own simplex projection) and TorchJD's ``MoDoWeighting`` over a sequence of steps;
* with ``J₁ = J₂ = J`` the λ step is a projected-gradient step of MGDA's objective ``½‖Jᵀλ‖² + ½ρ‖λ‖²``,
  whose fixed point (``ρ = 0``) satisfies the min-norm optimality conditions;
* in a real ``backward``: the extra batches give ``J₁``, ``J₂`` and the step's own batch the update.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchjd import aggregation as tjd
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance as tb
from taskbalance import GradientStep
from taskbalance.balancers import ReplayedExtraBatches

TASKS = ["a", "b", "c", "d"]
F64 = torch.float64


def jacobian_triples(steps: int = 6, k: int = 4, p: int = 20, seed: int = 0):
    """Three noisy draws of one mean Jacobian per step (rows of different norms, one conflicting)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(k, p, generator=g, dtype=F64)
    mean[1] = -0.7 * mean[0] + 0.3 * mean[1]
    mean = mean * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=F64)[:k, None]
    for _ in range(steps):
        yield tuple(mean + 0.5 * torch.randn(k, p, generator=g, dtype=F64) for _ in range(3))


def step_of(own, *extra, tasks=TASKS, index=None):
    index = torch.arange(own.shape[0]) if index is None else index
    names = [tasks[i] for i in index.tolist()]
    return GradientStep.of(own, index=index, extra=ReplayedExtraBatches(list(extra), names))


def libmtl_projection(y: np.ndarray) -> np.ndarray:
    """LibMTL ``MoDo._projection2simplex`` (its loop over the sorted entries), in numpy float64."""
    m = len(y)
    sorted_y = np.sort(y)[::-1]
    tmpsum, tmax_f = 0.0, (y.sum() - 1.0) / m
    for i in range(m - 1):
        tmpsum += sorted_y[i]
        tmax = (tmpsum - 1) / (i + 1.0)
        if tmax > sorted_y[i + 1]:
            tmax_f = tmax
            break
    return np.maximum(y - tmax_f, 0.0)


def test_lambda_and_update_follow_libmtls_formula_over_steps():
    gamma, rho = 0.01, 0.1
    balancer = tb.make("modo", TASKS, gamma=gamma, rho=rho)
    lambd = np.full(4, 0.25)
    for j1, j2, j3 in jacobian_triples():
        # LibMTL: grads = [batch 0, batch 1, batch 2]; λ from grads[0], grads[1]; update from grads[2]
        a, b = j1.numpy(), j2.numpy()
        lambd = libmtl_projection(lambd - gamma * (a @ (b.T @ lambd) + rho * lambd))
        expected = torch.from_numpy(lambd @ j3.numpy())
        result = balancer.aggregate(step_of(j3, j1, j2))
        torch.testing.assert_close(result.shared_update(j3), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result.weights, torch.from_numpy(lambd), rtol=1e-12, atol=1e-12)
    assert float(torch.from_numpy(lambd).min()) < 0.2  # the sequence really moved λ off uniform


@pytest.mark.parametrize(("gamma", "rho"), [(0.1, 0.1), (0.02, 0.0)])
def test_lambda_agrees_with_torchjds_modo_weighting(gamma, rho):
    ours = tb.make("modo", TASKS, gamma=gamma, rho=rho)
    theirs = tjd.MoDoWeighting(gamma=gamma, rho=rho)
    for j1, j2, j3 in jacobian_triples():
        weights = ours.aggregate(step_of(j3, j1, j2)).weights
        torch.testing.assert_close(weights, theirs(j1 @ j2.T), rtol=1e-10, atol=1e-12)


def test_with_one_jacobian_the_lambda_step_is_a_projected_gradient_step_of_mgdas_objective():
    gamma, rho = 0.01, 0.1
    j = next(jacobian_triples())[0]
    balancer = tb.make("modo", TASKS, gamma=gamma, rho=rho)
    for _ in range(3):
        before = balancer.lambd.clone().requires_grad_(True)
        objective = 0.5 * (j.T @ before).square().sum() + 0.5 * rho * before.square().sum()
        (gradient,) = torch.autograd.grad(objective, before)
        moved = (before - gamma * gradient).detach().numpy()
        weights = balancer.aggregate(step_of(j, j, j)).weights
        expected = torch.from_numpy(libmtl_projection(moved))
        torch.testing.assert_close(weights, expected, rtol=1e-12, atol=1e-12)


def test_with_one_jacobian_and_no_regularisation_lambda_converges_to_the_min_norm_weights():
    j = next(jacobian_triples())[0]
    gramian = j @ j.T
    balancer = tb.make("modo", TASKS, gamma=0.5 / float(torch.linalg.matrix_norm(gramian, 2)), rho=0.0)
    for _ in range(3000):
        weights = balancer.aggregate(step_of(j, j, j)).weights
    # KKT of min_{λ∈Δ} ½ λᵀGλ: (Gλ)_k >= λᵀGλ for every k, with equality where λ_k > 0
    progress, value = gramian @ weights, weights @ gramian @ weights
    assert bool((progress >= value - 1e-9).all())
    support = weights > 1e-9
    torch.testing.assert_close(progress[support], value.expand(int(support.sum())), rtol=1e-7, atol=1e-9)
    assert float((weights - 0.25).abs().max()) > 0.05  # far from the uniform start


def test_two_batch_variant_takes_lambda_from_the_own_and_one_extra_batch_and_updates_with_their_mean():
    gamma, rho = 0.01, 0.1
    balancer = tb.make("modo", TASKS, gamma=gamma, rho=rho, batches=2)
    assert balancer.extra_batches == 1
    lambd = np.full(4, 0.25)
    for j1, j2, _ in jacobian_triples(3):
        lambd = libmtl_projection(lambd - gamma * (j1.numpy() @ (j2.numpy().T @ lambd) + rho * lambd))
        result = balancer.aggregate(step_of(j1, j2))
        expected = torch.from_numpy(lambd @ ((j1 + j2) / 2).numpy())
        torch.testing.assert_close(result.shared_update(j1), expected, rtol=1e-12, atol=1e-12)


def test_absent_tasks_keep_their_lambda_and_the_present_ones_keep_their_mass():
    balancer = tb.make("modo", TASKS, gamma=0.05)
    j1, j2, j3 = next(jacobian_triples())
    balancer.aggregate(step_of(j3, j1, j2))
    before = balancer.lambd.clone()
    present = torch.tensor([0, 2, 3])
    result = balancer.aggregate(step_of(j3[present], j1[present], j2[present], index=present))
    assert float(balancer.lambd[1]) == float(before[1])
    torch.testing.assert_close(balancer.lambd[present].sum(), before[present].sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(result.weights.sum(), torch.tensor(1.0, dtype=F64))
    assert not torch.equal(balancer.lambd[present], before[present])


def test_in_backward_the_extra_batches_set_lambda_and_the_own_batch_gives_the_update():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS).to(F64)
    trunk = list(model.trunk.parameters())
    batches = [toy_batch(TASKS, seed=s) for s in (1, 2, 3)]
    batches = [(x.to(F64), {t: v.to(F64) for t, v in y.items()}) for x, y in batches]
    drawn = iter(batches[1:])

    def per_task(batch):
        losses = toy_losses(model, *batch)[1]
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], trunk, retain_graph=True)])
                for t in TASKS]
        return torch.stack(rows)

    own, first, second = (per_task(b) for b in batches)
    gamma, rho = 0.02, 0.1
    start = np.full(4, 0.25)
    lambd = libmtl_projection(start - gamma * (first.numpy() @ (second.numpy().T @ start) + rho * start))
    balancer = tb.make("modo", TASKS, gamma=gamma, rho=rho)
    _, losses = toy_losses(model, *batches[0])
    record = balancer.backward(losses, shared=trunk, extra_losses=lambda: toy_losses(model, *next(drawn))[1])
    update = torch.cat([p.grad.reshape(-1) for p in trunk])
    torch.testing.assert_close(update, torch.from_numpy(lambd) @ own, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(record.weights, torch.from_numpy(lambd), rtol=1e-10, atol=1e-12)
    # heads: their own task's gradient on the step's batch, unweighted (scale_heads = False)
    _, again = toy_losses(model, *batches[0])
    (head_grad,) = torch.autograd.grad(again["b"], [model.heads["b"].weight])
    torch.testing.assert_close(model.heads["b"].weight.grad, head_grad)


def test_hyperparameters_are_checked():
    for bad in ({"gamma": 0.0}, {"gamma": float("nan")}, {"rho": -1.0}, {"batches": 4}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tb.make("modo", TASKS, **bad)
    with pytest.raises(ValueError, match="not defined on feature-level"):
        tb.make("modo", TASKS, gradients="features")
