"""Family properties of the gradient methods, asserted on sampled Jacobians in TorchJD's ``_asserts`` style:
non-conflict where the paper claims it, permutation equivariance, and the documented scale behaviour
(including no float32 overflow at gradients of 1e20). Parametrised over ``available()``."""

from __future__ import annotations

import pytest
import torch

import taskbalance
from taskbalance.balancers.base import Aggregation, GradientStep
from taskbalance.balancers.extra_batches import ReplayedExtraBatches

TASKS = ["a", "b", "c", "d"]
GRADIENT_METHODS = sorted(m.name for m in taskbalance.available() if m.family == "gradient")
RANDOM = {"pcgrad", "gradvac", "graddrop"}  # random visiting orders / masks: equivariant in law only
# Papers' claim: the update never conflicts with a task gradient (d·g_k >= 0).
NON_CONFLICTING = {"mgda", "mgda-ub", "upgrad", "dualproj"}
# UPGrad/DualProj solve on TorchJD's conditioned Gramian G/tr G + reg_eps·I (their docstrings): the exact
# projection (reg_eps = 0) is non-conflicting (Quinton & Rey 2024, Prop. 1 / Thm. 2); with the default
# reg_eps the KKT conditions give (G/tr G + reg_eps·I) w >= 0, i.e. J d = G w >= -reg_eps·tr(G)·w.
CONDITIONED = {"upgrad", "dualproj"}
# Documented scale behaviour d(cJ) = c^degree d(J); Nash-MTL's bargaining solution is scale-free (degree 0).
# FairGrad (Ban & Ji 2024, Eq. 8, M w = w^(-1/α)): weights scale as c^(-2α/(1+α)), the update as
# c^((1-α)/(1+α)), degree 0 at the default α = 1. MoCo (Fernando et al. 2023, as the official code) tracks
# ĝ_k = g_k/‖g_k‖·L_k: only directions enter, degree 0.
DEGREE = {"nash-mtl": 0.0, "fairgrad": 0.0, "moco": 0.0}
# ExcessMTL's first step weighs by the raw excess risk e ∝ c (He et al. 2024, Eqs. 6-7, 9; official code,
# TorchJD): not homogeneous at the defaults, by design. Its scale processing e/e⁰ (§3.2) is scale-free, so
# after one warm-up step (which sets e⁰) the update has degree 1: the scale tests run that protocol.
# Its ε = 1e-7 under the AdaGrad root (Eq. 7) is compared with squared entries, so that protocol takes the
# rows ×100: at c = 1e-2 the squared entries stay well above ε.
AFTER_WARMUP = {"excess-mtl": {"warmup_steps": 1}}
# No scale degree, by design of the sources: MoDo's λ step γ·(J₁J₂ᵀλ + ρλ) (Chen et al. 2023, as LibMTL and
# TorchJD) and ARML's SGD step on ‖h − Σ α_a g_a‖² (Shi et al. 2020, official code) act on raw inner
# products, so their step sizes mean a different step at every gradient scale. Their updates are checked for
# finiteness at 1e20 and for this non-homogeneity below, not against a degree.
NOT_HOMOGENEOUS = {"modo", "arml"}
# Options that make the first step exercise the method's update (ARML updates its weights every 20 steps by
# default, and these tests take one step).
FIRST_STEP_UPDATES = {"arml": {"update_every": 1}}
WARMUP_BASE_SCALE = 100.0


def aggregate(
    name: str, jacobian: torch.Tensor, perm: torch.Tensor | None = None, **options: float
) -> Aggregation:
    level = "features" if taskbalance.method_info(name).feature_level == "only" else "parameters"
    extra = {"seed": 0} if name in RANDOM else {}
    balancer = taskbalance.make(name, TASKS, gradients=level, **extra, **FIRST_STEP_UPDATES.get(name, {}),
                                **options)
    k = jacobian.shape[0]
    index = torch.arange(k) if perm is None else perm
    rows = jacobian if perm is None else jacobian[perm]
    losses = torch.linspace(1.0, 2.0, k, dtype=jacobian.dtype)
    # methods that draw extra batches (MoDo, SDMGrad, Auto-λ, …) see the same gradients on every batch
    extra_batches = ReplayedExtraBatches([rows] * balancer.extra_batches, [TASKS[i] for i in index.tolist()])
    step = GradientStep.of(rows, losses if perm is None else losses[perm], index, extra=extra_batches)
    return balancer.aggregate(step)


def direction(name: str, jacobian: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
    rows = jacobian if perm is None else jacobian[perm]
    return aggregate(name, jacobian, perm).shared_update(rows)


def scaled_direction(name: str, jacobian: torch.Tensor, scale: float) -> torch.Tensor:
    """The update for ``scale · jacobian``; for :data:`AFTER_WARMUP` methods, the second step's update,
    after a warm-up step on ``scale ·`` other rows (shifted by one entry, row k scaled by 0.5 … 1.25, so the
    tasks' baselines differ and the weights are far from uniform and from one-hot), all ×100."""
    if name not in AFTER_WARMUP:
        return direction(name, scale * jacobian)
    scale = scale * WARMUP_BASE_SCALE
    balancer = taskbalance.make(name, TASKS, **AFTER_WARMUP[name])
    k = jacobian.shape[0]
    losses = torch.linspace(1.0, 2.0, k, dtype=jacobian.dtype)
    warmup = torch.linspace(0.5, 1.25, k, dtype=jacobian.dtype)[:, None] * jacobian.roll(1, 1)
    balancer.aggregate(GradientStep.of(scale * warmup, losses))
    return balancer.aggregate(GradientStep.of(scale * jacobian, losses)).shared_update(scale * jacobian)


def sampled_jacobians(count: int = 4) -> list[torch.Tensor]:
    """Conflicting rows of mixed norms (a row nearly opposed to another, one 30x larger)."""
    out = []
    for seed in range(count):
        g = torch.Generator().manual_seed(seed)
        jacobian = torch.randn(4, 24, generator=g)
        jacobian[1] = -0.8 * jacobian[0] + 0.3 * jacobian[1]
        jacobian[3] = 30.0 * jacobian[3]
        out.append(jacobian)
    return out


@pytest.mark.parametrize("name", sorted(NON_CONFLICTING & set(GRADIENT_METHODS)))
def test_update_does_not_conflict_with_any_task(name):
    exact = {"reg_eps": 0.0} if name in CONDITIONED else {}
    for jacobian in sampled_jacobians():
        jacobian = jacobian.double()
        d = aggregate(name, jacobian, **exact).shared_update(jacobian)
        assert float((jacobian @ d).min()) >= -1e-9 * float(d.norm() * jacobian.norm())


@pytest.mark.parametrize("name", sorted(CONDITIONED & set(GRADIENT_METHODS)))
def test_conditioned_update_conflicts_at_most_by_the_documented_reg_eps_margin(name):
    reg_eps = taskbalance.make(name, TASKS).reg_eps
    violated = False
    for jacobian in sampled_jacobians():
        jacobian = jacobian.double()
        result = aggregate(name, jacobian)
        d, w = result.shared_update(jacobian), result.weights
        margin = -reg_eps * torch.trace(jacobian @ jacobian.T) * w
        assert bool((jacobian @ d >= margin - 1e-9 * float(d.norm() * jacobian.norm())).all())
        violated |= bool((jacobian @ d < 0).any())
    assert violated  # the sampler does reach the conditioning margin: the bound above is what is claimed


@pytest.mark.parametrize("name", sorted(set(GRADIENT_METHODS) - RANDOM))
def test_permuting_the_tasks_leaves_the_update_unchanged(name):
    perm = torch.tensor([2, 0, 3, 1])
    for jacobian in sampled_jacobians(2):
        d = direction(name, jacobian.double())
        torch.testing.assert_close(direction(name, jacobian.double(), perm), d, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", sorted(set(GRADIENT_METHODS) - NOT_HOMOGENEOUS))
def test_scaling_the_gradients_scales_the_update_as_documented(name):
    degree = DEGREE.get(name, 1.0)
    for c in (1e3, 1e-2):
        for jacobian in sampled_jacobians(2):
            d = scaled_direction(name, jacobian.double(), 1.0)
            scaled = scaled_direction(name, jacobian.double(), c)
            # atol: the methods' eps (1e-8, added to norms) is not scale-free
            torch.testing.assert_close(scaled, c**degree * d, rtol=1e-4, atol=1e-6 * float(d.norm()))


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_float32_gradients_of_1e20_do_not_overflow(name):
    degree = DEGREE.get(name, 1.0)
    jacobian = sampled_jacobians(1)[0]
    d = scaled_direction(name, jacobian, 1.0)
    big = scaled_direction(name, jacobian, 1e20)
    assert bool(torch.isfinite(big).all()), f"{name}: non-finite update at gradients of 1e20"
    if name in NOT_HOMOGENEOUS:
        return
    expected = d.double()
    torch.testing.assert_close(big.double() / 1e20**degree, expected, rtol=1e-3, atol=1e-5 * float(d.norm()))


@pytest.mark.parametrize("name", sorted(NOT_HOMOGENEOUS & set(GRADIENT_METHODS)))
def test_methods_without_a_scale_degree_really_have_none(name):
    jacobian = sampled_jacobians(1)[0].double()
    d = scaled_direction(name, jacobian, 1.0)
    ratios = [scaled_direction(name, jacobian, c) / c for c in (1e-2, 1e2)]
    assert not torch.allclose(ratios[0], ratios[1], rtol=1e-3), f"{name} is homogeneous: give it a degree"
    assert bool(torch.isfinite(d).all())
