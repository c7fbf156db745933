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
