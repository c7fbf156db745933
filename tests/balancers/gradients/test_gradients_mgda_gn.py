"""MGDA's normaliser conventions: ``mgda_gn_apply="raw"`` (official code: c on the raw gradients) and
``"normalized"`` (LibMTL parameter mode: c on the normalised gradients)."""

import pytest
import torch

import taskbalance as tb
from taskbalance import GradientStep
from taskbalance.balancers.gradients._solvers import gramian, min_norm_weights


def jacobian(seed=0, k=3, p=20):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, p, generator=g, dtype=torch.float64) * torch.tensor([[0.1], [1.0], [10.0]])


@pytest.mark.parametrize("name", ["mgda", "mgda-ub"])
def test_default_applies_the_coefficients_to_the_raw_gradients_as_the_official_code(name):
    j = jacobian()
    norms = j.norm(dim=1)
    c = min_norm_weights(gramian(j) / (norms[:, None] * norms[None, :]))
    result = tb.make(name, ["a", "b", "c"], mgda_gn="l2").aggregate(GradientStep.of(j))
    torch.testing.assert_close(result.weights, c)
    torch.testing.assert_close(result.extras["min_norm_coefficients"], c)


def test_normalized_applies_the_coefficients_to_the_normalised_gradients():
    j = jacobian(1)
    losses = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    norms = j.norm(dim=1)
    for gn, n in (("l2", norms), ("loss", losses), ("loss+", losses * norms)):
        c = min_norm_weights(gramian(j) / (n[:, None] * n[None, :]))
        balancer = tb.make("mgda", ["a", "b", "c"], mgda_gn=gn, mgda_gn_apply="normalized")
        result = balancer.aggregate(GradientStep.of(j, losses))
        torch.testing.assert_close(result.weights @ j, c @ (j / n[:, None]))
        raw = tb.make("mgda", ["a", "b", "c"], mgda_gn=gn).aggregate(GradientStep.of(j, losses))
        assert not torch.allclose(raw.weights, result.weights)


def test_both_conventions_agree_without_a_normaliser():
    j = jacobian(2)
    raw = tb.make("mgda", ["a", "b", "c"]).aggregate(GradientStep.of(j)).weights
    normalized = tb.make("mgda", ["a", "b", "c"], mgda_gn_apply="normalized").aggregate(GradientStep.of(j))
    torch.testing.assert_close(raw, normalized.weights)


def test_unknown_convention_is_rejected_by_name():
    with pytest.raises(ValueError, match="mgda_gn_apply"):
        tb.make("mgda-ub", ["a", "b"], mgda_gn_apply="scaled")
