"""On CPU the single-problem active set and the dual-cone projection run in NumPy; they must give what the
tensor path gives (the tensor path is the accelerators' branch-free one, run here on CPU)."""

import pytest
import torch
from hard_jacobians import hard_jacobian

from taskbalance.balancers.gradients import _solvers

KINDS = ["random", "duplicate", "opposed", "zero", "badly_scaled", "mixed"]


def both(monkeypatch, solve):
    host = solve()
    monkeypatch.setattr(_solvers, "_HOST_DECIDES_ON_CPU", False)
    tensor = solve()
    monkeypatch.setattr(_solvers, "_HOST_DECIDES_ON_CPU", True)
    return host, tensor


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3, 10])
def test_dual_cone_host_path_equals_the_tensor_path(monkeypatch, kind, k):
    gram = (lambda j: j @ j.T)(hard_jacobian(kind, k, seed=1))
    upgrad, dualproj = torch.eye(k, dtype=torch.float64) / k, torch.full((k,), 1.0 / k, dtype=torch.float64)
    for preferences in (upgrad, dualproj):
        (v_host, ok_host), (v_tensor, ok_tensor) = both(
            monkeypatch, lambda p=preferences: _solvers.dual_cone_weights(gram, p)
        )
        assert v_host.shape == v_tensor.shape and v_host.dtype == torch.float64
        torch.testing.assert_close(v_host, v_tensor, rtol=1e-9, atol=1e-12)
        assert torch.equal(ok_host, ok_tensor)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3, 10])
def test_simplex_qp_host_path_equals_the_tensor_path(monkeypatch, kind, k):
    """Plain, with a constraint vector, and as CAGrad calls it: a linear term, a warm start, the ridge already
    in the Hessian."""
    gram = (lambda j: j @ j.T)(hard_jacobian(kind, k, seed=2))
    c, s, _ = _solvers.jacobi_scaling(gram)
    linear = torch.linspace(-1, 1, k, dtype=torch.float64)
    warm = torch.arange(k) % 2 == 0
    ridged = c + 1e-12 * torch.eye(k, dtype=torch.float64)
    calls = [
        lambda: _solvers.simplex_qp(c),
        lambda: _solvers.simplex_qp(c, constraint=1.0 / s),
        lambda: _solvers.simplex_qp(3.0 * ridged, linear, constraint=1.0 / s, reg=0.0, init_free=warm),
    ]
    for call in calls:
        (w_host, ok_host, free_host), (w_tensor, ok_tensor, free_tensor) = both(monkeypatch, call)
        torch.testing.assert_close(w_host, w_tensor, rtol=1e-7, atol=1e-9)
        assert bool(ok_host) == bool(ok_tensor)
        assert torch.equal(free_host, free_tensor)


def test_a_hessian_that_requires_grad_stays_on_the_tensor_path():
    gram = (lambda j: j @ j.T)(hard_jacobian("random", 3, seed=0)).requires_grad_()
    weights, _, _ = _solvers.simplex_qp(gram)
    assert weights.requires_grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3, 10])
def test_min_norm_solve_host_path_equals_the_tensor_path(monkeypatch, kind, k):
    gram = (lambda j: j @ j.T)(hard_jacobian(kind, k, seed=3))
    (c_host, ok_host), (c_tensor, ok_tensor) = both(monkeypatch, lambda: _solvers.min_norm_solve(gram))
    assert c_host.dtype == torch.float64 and c_host.shape == (k,)
    torch.testing.assert_close(c_host, c_tensor, rtol=1e-7, atol=1e-9)
    assert bool(ok_host) == bool(ok_tensor)


def test_finite_or_nan_on_the_host_returns_a_finite_gramian_as_it_is_and_the_identity_otherwise(monkeypatch):
    gram = (lambda j: j @ j.T)(hard_jacobian("random", 3, seed=0))
    safe, finite = _solvers.finite_or_nan(gram)
    assert safe is gram and bool(finite)
    bad = gram.clone()
    bad[1, 2] = float("inf")
    host, tensor = both(monkeypatch, lambda: _solvers.finite_or_nan(bad))
    (safe_host, finite_host), (safe_tensor, finite_tensor) = host, tensor
    assert torch.equal(safe_host, torch.eye(3, dtype=torch.float64)) and not bool(finite_host)
    assert torch.equal(safe_host, safe_tensor) and not bool(finite_tensor)


AGGREGATES = [
    ("mgda", {}),
    ("mgda", {"mgda_gn": "l2"}),
    ("mgda", {"mgda_gn": "loss+", "mgda_gn_apply": "normalized"}),
    ("mgda", {"mgda_gn": "loss", "mgda_gn_apply": "normalized"}),
    ("upgrad", {}),
    ("dualproj", {}),
]


@pytest.mark.parametrize(("method", "options"), AGGREGATES)
@pytest.mark.parametrize("kind", KINDS)
def test_aggregate_on_the_host_equals_the_tensor_path(monkeypatch, method, options, kind):
    """The methods' own steps around the solvers (finite check, normalisers, NaN on a non-finite Gramian) are
    the same on both paths."""
    import taskbalance as tb
    from taskbalance.balancers.base import GradientStep

    k = 4
    gram = (lambda j: j @ j.T)(hard_jacobian(kind, k, seed=4))
    losses = torch.linspace(0.5, 2.0, k)
    step = GradientStep(losses=losses, index=torch.arange(k), dtype=torch.float32, precomputed_gramian=gram)
    balancer = tb.make(method, [f"t{i}" for i in range(k)], **options)
    host, tensor = both(monkeypatch, lambda: balancer.aggregate(step))
    assert host.weights.dtype == torch.float32
    torch.testing.assert_close(host.weights, tensor.weights, rtol=1e-6, atol=1e-8)
    assert host.extras.keys() == tensor.extras.keys()
    for name in host.extras:
        torch.testing.assert_close(host.extras[name], tensor.extras[name], rtol=1e-7, atol=1e-9)
    poisoned = gram.clone()
    poisoned[0, 0] = float("nan")
    bad = GradientStep(
        losses=losses, index=torch.arange(k), dtype=torch.float32, precomputed_gramian=poisoned
    )
    host, tensor = both(monkeypatch, lambda: balancer.aggregate(bad))
    assert torch.isnan(host.weights).all() and torch.isnan(tensor.weights).all()



def test_a_singular_active_set_system_raises_on_both_paths(monkeypatch):
    """Without a ridge an all-zero Hessian makes the bordered system singular: LAPACK's error, on the host as
    on the tensor path (the host path once returned uniform weights and a false 'capped' flag instead)."""
    hessian = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="singular"):
        _solvers.simplex_qp(hessian, reg=0.0)
    monkeypatch.setattr(_solvers, "_HOST_DECIDES_ON_CPU", False)
    with pytest.raises(RuntimeError, match="singular"):
        _solvers.simplex_qp(hessian, reg=0.0)
