"""Krum, trimmed mean, ConFIG, FairGrad: agreement with TorchJD 0.18 in float64, and each defining property.

Convention: both sides return the update ``weights @ J`` (TorchJD's aggregator output) on the same matrix.
"""

from __future__ import annotations

import pytest
import torch
from torchjd import aggregation as tjd

import taskbalance as tb
from taskbalance import GradientStep

TASKS = [f"t{i}" for i in range(12)]


def sampled_matrices(count: int = 60, seed: int = 0, min_rows: int = 2):
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        k = min_rows + i % (11 - min_rows)
        j = torch.randn(k, 64, generator=g, dtype=torch.float64)
        if i % 3 == 1:  # partly aligned rows: a shared component
            j = j + 2 * torch.randn(1, 64, generator=g, dtype=torch.float64)
        if i % 5 == 2:  # norms spread over two orders of magnitude
            j = j * torch.logspace(-1, 1, k, dtype=torch.float64)[:, None]
        yield j


def update_of(name, j, **kw):
    balancer = tb.make(name, TASKS[: j.shape[0]], **kw)
    return balancer.aggregate(GradientStep.of(j)).shared_update(j)


def relative_error(ours, theirs):
    return float((ours - theirs).norm() / theirs.norm().clamp_min(1e-12))


CASES = {
    "krum": ({}, lambda: tjd.Krum(n_byzantine=0), 1e-12, 3),
    "krum-f1-m2": (
        {"n_byzantine": 1, "n_selected": 2},
        lambda: tjd.Krum(n_byzantine=1, n_selected=2),
        1e-12,
        4,
    ),
    "trimmed-mean": ({}, lambda: tjd.TrimmedMean(trim_number=1), 1e-12, 3),
    "trimmed-mean-2": ({"trim": 2}, lambda: tjd.TrimmedMean(trim_number=2), 1e-12, 5),
    "config": ({}, lambda: tjd.ConFIG(), 1e-8, 2),
    "fairgrad": ({}, lambda: tjd.FairGrad(alpha=1.0), 1e-4, 2),
    "fairgrad-a2": ({"alpha": 2.0}, lambda: tjd.FairGrad(alpha=2.0), 1e-4, 2),
    "fairgrad-a05": ({"alpha": 0.5}, lambda: tjd.FairGrad(alpha=0.5), 1e-4, 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_agrees_with_torchjd(case):
    kwargs, factory, tolerance, min_rows = CASES[case]
    name = case.split("-f")[0].split("-a")[0].removesuffix("-2")
    worst = 0.0
    for j in sampled_matrices(min_rows=min_rows):
        worst = max(worst, relative_error(update_of(name, j, **kwargs), factory()(j)))
    assert worst <= tolerance, f"{case}: max relative error {worst:.2e} > {tolerance:.0e}"


def test_krum_never_selects_an_outlier():
    g = torch.Generator().manual_seed(1)
    centre = torch.randn(1, 32, generator=g, dtype=torch.float64)
    j = centre + 0.1 * torch.randn(5, 32, generator=g, dtype=torch.float64)
    j[3] = -20 * centre[0]
    for selected in (1, 2, 3):
        krum = tb.make("krum", TASKS[:5], n_byzantine=1, n_selected=selected)
        weights = krum.aggregate(GradientStep.of(j)).weights
        assert weights[3] == 0 and torch.isclose(weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_krum_falls_back_to_the_mean_when_too_few_tasks_are_present_and_says_so():
    j = torch.randn(2, 8, dtype=torch.float64)
    aggregation = tb.make("krum", TASKS[:3]).aggregate(GradientStep.of(j))
    torch.testing.assert_close(aggregation.weights, torch.full((2,), 0.5, dtype=torch.float64))
    assert aggregation.extras["krum_fallback"] == 1
    with pytest.raises(ValueError, match=">= 4 tasks"):
        tb.make("krum", TASKS[:3], n_byzantine=1)


def test_trimmed_mean_is_bounded_when_one_gradient_explodes():
    g = torch.Generator().manual_seed(2)
    j = torch.randn(5, 32, generator=g, dtype=torch.float64)
    base = update_of("trimmed-mean", j)
    j[0] *= 1e6
    moved = update_of("trimmed-mean", j)
    lower, upper = torch.sort(j[1:], dim=0).values[0], torch.sort(j[1:], dim=0).values[-1]
    assert bool(((moved >= lower - 1e-12) & (moved <= upper + 1e-12)).all())  # inside the honest rows' range
    assert float((moved - base).norm()) < 10 * float(j[1:].norm())


def test_config_direction_has_equal_cosine_with_every_task_and_decreases_all():
    for j in sampled_matrices(count=30, min_rows=2):
        if j.shape[0] > 8:
            continue
        update = update_of("config", j)
        cosines = (j @ update) / (j.norm(dim=1) * update.norm())
        torch.testing.assert_close(cosines, cosines.mean().expand_as(cosines), rtol=1e-8, atol=1e-10)
        assert bool((cosines > 0).all())
        torch.testing.assert_close(update.norm(), (j @ update).sum() / update.norm())  # length Σ_i g_iᵀû


def test_config_ignores_a_zero_gradient():
    j = torch.randn(3, 16, dtype=torch.float64)
    with_zero = torch.cat([j, torch.zeros(1, 16, dtype=torch.float64)])
    torch.testing.assert_close(update_of("config", with_zero), update_of("config", j))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_solves_its_optimality_system(alpha):
    for j in sampled_matrices(count=30, min_rows=2):
        aggregation = tb.make("fairgrad", TASKS[: j.shape[0]], alpha=alpha).aggregate(GradientStep.of(j))
        w, gram = aggregation.weights, j @ j.T
        assert bool((w > 0).all())
        torch.testing.assert_close(gram @ w, w ** (-1 / alpha), rtol=1e-6, atol=1e-9)
        assert aggregation.extras["residual"] < 1e-8


def test_fairgrad_alpha_zero_is_the_mean_and_zero_gramian_gives_zero():
    j = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(update_of("fairgrad", j, alpha=0.0), j.mean(0))
    assert float(update_of("fairgrad", torch.zeros(3, 16, dtype=torch.float64)).abs().max()) == 0
