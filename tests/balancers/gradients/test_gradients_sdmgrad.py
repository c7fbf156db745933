"""SDMGrad (Xiao, Ban & Ji, NeurIPS 2023): w by double-sampled projected SGD on ½‖Jᵀ(w + λw̃)‖², update
J_ζᵀ(w + λw̃)/(1 + λ).

* the weights and the update equal LibMTL's ``SDMGrad.backward`` (re-written below in float64, with
  ``torch.optim.SGD`` for the inner loop and numpy for the projection) and TorchJD's ``SDMGradWeighting``;
* ``λ = 0`` is MGDA (the inner SGD reaches the min-norm weights); ``λ → ∞`` is the mean gradient;
* the update is degree 1 in the gradients (the cross-Gramian is scale-normalised).
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


def jacobian_triples(steps: int = 5, k: int = 4, p: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(k, p, generator=g, dtype=F64)
    mean[1] = -0.7 * mean[0] + 0.3 * mean[1]
    mean = mean * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=F64)[:k, None]
    for _ in range(steps):
        yield tuple(mean + 0.5 * torch.randn(k, p, generator=g, dtype=F64) for _ in range(3))


def step_of(own, *extra, index=None):
    index = torch.arange(own.shape[0]) if index is None else index
    names = [TASKS[i] for i in index.tolist()]
    return GradientStep.of(own, index=index, extra=ReplayedExtraBatches(list(extra), names))


def euclidean_projection(v: np.ndarray) -> np.ndarray:
    """LibMTL ``SDMGrad.euclidean_proj_simplex`` (Duchi et al.), numpy float64."""
    if v.sum() == 1 and (v >= 0).all():
        return v
    u = np.sort(v)[::-1]
    cssv = np.cumsum(u)
    rho = np.nonzero(u * np.arange(1, len(v) + 1) > (cssv - 1))[0][-1]
    theta = float(cssv[rho] - 1) / (rho + 1)
    return (v - theta).clip(min=0)


class LibMTLSDMGrad:
    """LibMTL's ``SDMGrad.backward`` on given Jacobians: grads = [ζ, ξ₁, ξ₂]."""

    def __init__(self, k: int, lamda: float, niter: int, lr: float = 5.0) -> None:
        self.w = torch.full((k,), 1.0 / k, dtype=F64)
        self.lamda, self.niter, self.lr = lamda, niter, lr

    def __call__(self, zeta, xi1, xi2):
        gg = xi1 @ xi2.T
        diag = torch.where(gg.diag() < 0, torch.zeros_like(gg.diag()), gg.diag())
        scale = diag.sqrt().mean()
        gg = gg / (scale.pow(2) + 1e-8)
        gg_mean = gg.mean(dim=1)
        self.w.requires_grad = True
        optimizer = torch.optim.SGD([self.w], lr=self.lr, momentum=0.5)
        for _ in range(self.niter):
            optimizer.zero_grad()
            self.w.grad = gg @ self.w.detach() + self.lamda * gg_mean
            optimizer.step()
            self.w.data.copy_(torch.from_numpy(euclidean_projection(self.w.data.numpy())))
        self.w.requires_grad = False
        g0 = zeta.mean(dim=0)
        gw = (zeta * self.w.view(-1, 1)).sum(0)
        return (gw + self.lamda * g0) / (1 + self.lamda)


@pytest.mark.parametrize(("lamda", "niter"), [(0.3, 20), (0.0, 5), (2.0, 3)])
def test_update_follows_libmtls_formula_over_steps(lamda, niter):
    ours = tb.make("sdmgrad", TASKS, lamda=lamda, niter=niter)
    theirs = LibMTLSDMGrad(4, lamda, niter)
    moved = False
    for zeta, xi1, xi2 in jacobian_triples():
        update = ours.aggregate(step_of(zeta, xi1, xi2)).shared_update(zeta)
        torch.testing.assert_close(update, theirs(zeta, xi1, xi2), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours.w, theirs.w, rtol=1e-10, atol=1e-12)
        moved |= float((theirs.w - 0.25).abs().max()) > 0.05
    assert moved


def test_weights_agree_with_torchjds_sdmgrad_weighting():
    ours = tb.make("sdmgrad", TASKS, lr=10.0)  # TorchJD's (and the authors' code's) inner step size
    theirs = tjd.SDMGradWeighting(lr=10.0, momentum=0.5, n_iter=20, lambda_=0.3)
    for zeta, xi1, xi2 in jacobian_triples():
        weights = ours.aggregate(step_of(zeta, xi1, xi2)).weights
        torch.testing.assert_close(weights, theirs(xi1 @ xi2.T), rtol=1e-10, atol=1e-12)


def test_without_the_pull_the_weights_reach_mgdas_min_norm_weights():
    j = next(jacobian_triples())[0]
    gramian = j @ j.T
    balancer = tb.make("sdmgrad", TASKS, lamda=0.0, niter=500, lr=0.2)
    weights = balancer.aggregate(step_of(j, j, j)).weights
    progress, value = gramian @ weights, weights @ gramian @ weights
    assert bool((progress >= value * (1 - 1e-6)).all())  # KKT of min_{w∈Δ} ½ wᵀGw
    support = weights > 1e-9
    torch.testing.assert_close(progress[support], value.expand(int(support.sum())), rtol=1e-6, atol=0)
    assert float((weights - 0.25).abs().max()) > 0.05


def test_a_large_pull_gives_the_mean_gradient():
    zeta, xi1, xi2 = next(jacobian_triples())
    mean = zeta.mean(dim=0)
    gaps = []
    for lamda in (1e2, 1e4, 1e6):
        result = tb.make("sdmgrad", TASKS, lamda=lamda).aggregate(step_of(zeta, xi1, xi2))
        gaps.append(float((result.shared_update(zeta) - mean).norm() / mean.norm()))
    assert gaps[2] < 1e-5 and gaps[0] > 50 * gaps[1] > 2500 * gaps[2]  # ‖d − g₀‖ = O(1/λ)


def test_the_update_scales_with_the_gradients():
    zeta, xi1, xi2 = next(jacobian_triples())
    reference = tb.make("sdmgrad", TASKS).aggregate(step_of(zeta, xi1, xi2)).shared_update(zeta)
    for c in (1e-3, 1e4):
        scaled = tb.make("sdmgrad", TASKS).aggregate(step_of(c * zeta, c * xi1, c * xi2))
        torch.testing.assert_close(scaled.shared_update(c * zeta), c * reference, rtol=1e-6, atol=0)


def test_absent_tasks_keep_their_weight_and_the_pull_is_uniform_over_the_present_ones():
    zeta, xi1, xi2 = next(jacobian_triples())
    balancer = tb.make("sdmgrad", TASKS)
    balancer.aggregate(step_of(zeta, xi1, xi2))
    before = balancer.w.clone()
    present = torch.tensor([0, 1, 3])
    result = balancer.aggregate(step_of(zeta[present], xi1[present], xi2[present], index=present))
    assert float(balancer.w[2]) == float(before[2])
    torch.testing.assert_close(balancer.w[present].sum(), before[present].sum(), rtol=1e-12, atol=0)
    w = result.extras["w"]
    torch.testing.assert_close(result.weights, (w + 0.3 / 3) / 1.3)


def test_in_backward_the_own_batch_gives_the_update_with_the_extra_batches_weights():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS).to(F64)
    trunk = list(model.trunk.parameters())
    batches = [toy_batch(TASKS, seed=s) for s in (1, 2, 3)]
    batches = [(x.to(F64), {t: v.to(F64) for t, v in y.items()}) for x, y in batches]

    def per_task(batch):
        losses = toy_losses(model, *batch)[1]
        return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            losses[t], trunk, retain_graph=True)]) for t in TASKS])

    zeta, xi1, xi2 = (per_task(b) for b in batches)
    expected = LibMTLSDMGrad(4, 0.3, 20)(zeta, xi1, xi2)
    drawn = iter(batches[1:])
    balancer = tb.make("sdmgrad", TASKS)
    _, losses = toy_losses(model, *batches[0])
    balancer.backward(losses, shared=trunk, extra_losses=lambda: toy_losses(model, *next(drawn))[1])
    update = torch.cat([p.grad.reshape(-1) for p in trunk])
    torch.testing.assert_close(update, expected, rtol=1e-9, atol=1e-12)


def test_hyperparameters_are_checked():
    for bad in ({"lamda": -0.1}, {"niter": 0}, {"niter": 2.5}, {"lr": 0.0}, {"momentum": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tb.make("sdmgrad", TASKS, **bad)
