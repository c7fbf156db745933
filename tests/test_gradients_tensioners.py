"""Task tensioners (docs/method-notes.md §6.4): central direction, tension bounds, weight form, repair."""

import math

import torch

import taskbalance as tb
from taskbalance import GradientStep
from taskbalance.balancers.gradients._solvers import gramian
from taskbalance.balancers.gradients.tensioners import central_direction_weights


def sample(k, seed, p=30):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, k, dtype=torch.float64)[:, None]
    return torch.randn(k, p, generator=g, dtype=torch.float64) * scales


def test_central_direction_has_equal_cosines_and_weights_sum_to_one():
    for seed in range(20):
        j = sample(2 + seed % 6, seed)
        a, _ = central_direction_weights(gramian(j))
        d = a @ j
        cosines = (j @ d) / (j.norm(dim=1) * d.norm())
        support = a > 1e-9
        assert torch.isclose(a.sum(), torch.tensor(1.0, dtype=a.dtype))
        torch.testing.assert_close(cosines[support], cosines[support].mean().expand(int(support.sum())))


def test_tensions_lie_between_one_minus_alpha_and_one():
    balancer = tb.make("tensioners", ["a", "b"], alpha=0.6)
    ratio = torch.linspace(0.2, 3.0, 50, dtype=torch.float64)
    losses = torch.logspace(-6, 3, 50, dtype=torch.float64)
    tau = balancer.tensions(ratio, losses)
    assert (tau >= 0.4 - 1e-12).all() and (tau <= 1.0).all()
    steady = balancer.tensions(torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    assert math.isclose(float(steady), 1 - 0.6 / 2)


def warmed(balancer, j, steps):
    for _ in range(steps):
        losses = torch.full((j.shape[0],), 2.0, dtype=j.dtype)
        result = balancer.aggregate(GradientStep.of(j, losses, torch.arange(j.shape[0])))
    return result


def test_weight_form_equals_vector_form_and_repair_removes_conflicts():
    for seed in range(10):
        j = sample(3, seed)
        balancer = tb.make("tensioners", ["a", "b", "c"], alpha=0.5, window=2)
        result = warmed(balancer, j, 4)
        assert bool(result.extras["tension_active"])
        a = result.extras["central_weights"]
        d = a @ j
        tau = result.extras["tensions"]
        v = d + (tau[:, None] * (j - d) / (j - d).norm(dim=1, keepdim=True)).sum(0)
        for i in range(3):  # official repair, vector form
            g = j[i]
            if v @ g < 0:
                w = v - (v @ g) / (g @ g) * g
                cos = (g @ (v - g)) / (g.norm() * (v - g).norm())
                phi = math.pi - torch.arccos(cos)
                v = torch.tan(phi) * g.norm() * w / w.norm()
        torch.testing.assert_close(result.weights @ j, v, rtol=1e-6, atol=1e-9)


def test_alpha_zero_orthogonal_equal_norms_is_symmetric():
    j = torch.eye(2, 5, dtype=torch.float64) * 3.0
    balancer = tb.make("tensioners", ["a", "b"], alpha=0.0, window=1)
    result = warmed(balancer, j, 3)
    update = result.weights @ j
    d = result.extras["central_weights"] @ j
    torch.testing.assert_close(update / update.norm(), d / d.norm())
    u = (j - d) / (j - d).norm(dim=1, keepdim=True)
    torch.testing.assert_close(update, d + u.sum(0))


def test_zero_gradient_skips_the_shared_update():
    j = sample(3, 0)
    j[1] = 0
    balancer = tb.make("tensioners", ["a", "b", "c"])
    result = balancer.aggregate(GradientStep.of(j))
    assert (result.weights == 0).all()


def test_mean_grad_norm_scale_multiplies_tensions():
    j = sample(3, 1)
    unit = warmed(tb.make("tensioners", ["a", "b", "c"], window=1), j, 3).extras["tensions"]
    scaled = warmed(tb.make("tensioners", ["a", "b", "c"], window=1, tension_scale="mean_grad_norm"), j, 3)
    torch.testing.assert_close(scaled.extras["tensions"], unit * j.norm(dim=1).mean())
