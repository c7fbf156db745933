"""Every solver-based method against an independent high-accuracy solution, in float64, on hard Jacobians.

References (test-only dependencies): cvxpy + Clarabel (MGDA's min-norm point, CAGrad's primal), quadprog
(UPGrad / DualProj's projections, TorchJD's own solver), scipy (IMTL-G's pseudo-inverse, Aligned-MTL from the
SVD of ``J``, Nash-MTL's bargaining system by a log-space root finder and an LP feasibility test).

For each method and case: the shared update's direction has cosine ``≥ 1 − 1e-6`` to the reference, and
its scale follows the method's documented convention (norm ratio within ``1e-4``). For MGDA and CAGrad,
whose conic references are only accurate to ~1e-8 in objective, ours is also *certified* by a duality gap.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import quadprog
import scipy.linalg
import scipy.optimize
import torch
from hard_jacobians import KINDS, HardCase, hard_cases

import taskbalance as tb
from taskbalance import GradientStep

COSINE = 1 - 1e-6
SCALE = 1e-4
CASES = list(hard_cases(ks=(1, 2, 3, 5, 10, 40), seeds=(0, 1)))
IDS = [c.id for c in CASES]
# IMTL-G, IMTL and Aligned-MTL are *defined* by a rank truncation of M's spectrum at k·eps·λ_max. On "mixed"
# at k = 40 (norms over 6 orders, duplicates) eigenvalues sit within float64 rounding of that threshold, so
# the method's own answer is ill-defined there: those cases are left out of these three methods only.
SPECTRAL = [c for c in CASES if not (c.kind == "mixed" and c.k == 40)]
SPECTRAL_IDS = [c.id for c in SPECTRAL]


@pytest.fixture(scope="module")
def cp():
    """cvxpy is slow to import: once per module."""
    import cvxpy

    return cvxpy


def run(name: str, j: torch.Tensor, **kwargs):
    balancer = tb.make(name, [f"t{i}" for i in range(j.shape[0])], **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a solver that hits its iteration cap warns: fail on it here
        aggregation = balancer.aggregate(GradientStep.of(j))
    return aggregation, aggregation.shared_update(j)


def assert_same_update(ours: torch.Tensor, reference: np.ndarray, scale: float, what: str) -> None:
    """Cosine ``≥ 1 − 1e-6`` and equal norms (``1e-5``); an update of (near) zero norm must be matched by
    one of (near) zero norm, measured against ``scale`` (the largest row norm)."""
    ref = torch.from_numpy(np.asarray(reference, dtype=np.float64))
    ours = ours.to(torch.float64)
    if ref.norm() <= 1e-7 * scale:  # 0, to the reference's accuracy
        assert ours.norm() <= 1e-6 * scale, f"{what}: reference is 0, ours has norm {ours.norm():.3e}"
        return
    cosine = float(ours @ ref / (ours.norm() * ref.norm()).clamp_min(1e-300))
    assert cosine >= COSINE, f"{what}: cosine {cosine:.9f}"
    ratio = float(ours.norm() / ref.norm())
    assert abs(ratio - 1) <= SCALE, f"{what}: norm ratio {ratio:.9f}"


def row_scale(j: torch.Tensor) -> float:
    return float(j.norm(dim=1).max().clamp_min(1e-300))


# ---------------------------------------------------------------- MGDA: min-norm point of the convex hull
def reference_min_norm_point(cp, j: np.ndarray) -> np.ndarray:
    """Clarabel's interior point, then a crossover: the equality-constrained minimiser on its support
    (least squares on the KKT system), kept when feasible and no worse."""
    scale = np.linalg.norm(j, axis=1).max() or 1.0
    a = j / scale
    k = j.shape[0]
    c = cp.Variable(k)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(a.T @ c)), [c >= 0, cp.sum(c) == 1])
    problem.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    best = np.clip(c.value, 0, None) / np.clip(c.value, 0, None).sum()
    support = best > 1e-7 * best.max()
    s = int(support.sum())
    kkt = np.zeros((s + 1, s + 1))
    kkt[:s, :s] = a[support] @ a[support].T
    kkt[:s, s] = kkt[s, :s] = 1.0
    rhs = np.zeros(s + 1)
    rhs[s] = 1.0
    polished = np.zeros(k)
    polished[support] = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:s]
    if (polished >= 0).all() and np.linalg.norm(polished @ a) <= np.linalg.norm(best @ a):
        best = polished
    return best @ j


def certified_error(distance: float, norm: float) -> float:
    """``1 − cos`` bound between ``x`` and ``x*`` given ``‖x − x*‖ ≤ distance`` (``sin θ ≤ distance/‖x‖``)."""
    return min(1.0, (distance / norm) ** 2) if norm > 0 else 1.0


def assert_certified(ours: torch.Tensor, reference: np.ndarray, distance_ours: float, distance_ref: float,
                     scale: float, what: str) -> None:
    """Ours is within ``distance_ours`` of the exact optimum (a duality-gap certificate), hence cosine
    ``≥ 1 − 1e-6`` to it; and it agrees with the independent reference to ``1e-6`` plus the reference's own
    certified error."""
    norm = float(ours.norm())
    ref_norm = float(np.linalg.norm(reference))
    if norm <= 1e-7 * scale:  # the optimum is (certified) 0: 0 lies in the hull
        assert distance_ours <= 1e-6 * scale, f"{what}: certified distance {distance_ours:.2e} from 0"
        return
    bound = distance_ours / norm
    assert certified_error(distance_ours, norm) <= 1e-6, f"{what}: certified 1-cos {bound:.2e}²"
    assert distance_ours <= SCALE * norm, f"{what}: scale certified to {distance_ours / norm:.2e}"
    slack = certified_error(distance_ref, ref_norm)
    cosine = float(ours.to(torch.float64) @ torch.from_numpy(reference)) / (norm * ref_norm)
    assert cosine >= COSINE - slack, f"{what}: cosine {cosine:.9f} to the reference (slack {slack:.1e})"


def min_norm_distance(j: np.ndarray, x: np.ndarray) -> float:
    """Frank–Wolfe gap ``‖x‖² − min_k g_k·x ≥ ½‖x − x*‖²`` for ``x`` in the hull."""
    return float(np.sqrt(2 * max(x @ x - (j @ x).min(), 0.0)))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mgda_update_is_the_min_norm_point(cp, case: HardCase):
    """Scale: the update is the min-norm point ``Σ c_k g_k`` itself (``mgda_gn="none"``)."""
    j = case.jacobian
    aggregation, ours = run("mgda", j)
    c = aggregation.weights
    assert (c >= 0).all() and abs(float(c.sum()) - 1) <= 1e-12
    jn = j.numpy()
    reference = reference_min_norm_point(cp, jn)
    x = ours.numpy()
    assert x @ x <= reference @ reference * (1 + 1e-9) + 1e-14 * row_scale(j) ** 2, f"{case.id}: longer"
    assert_certified(ours, reference, min_norm_distance(jn, x), min_norm_distance(jn, reference),
                     row_scale(j), case.id)


# ---------------------------------------------------------------- UPGrad / DualProj: quadprog projections
def reference_dual_cone(j: np.ndarray, preferences: np.ndarray) -> np.ndarray:
    m = j @ j.T
    trace = np.trace(m)
    k = len(m)
    m = (m / trace if trace >= 1e-4 else np.zeros_like(m)) + 1e-4 * np.eye(k)
    weights = sum(quadprog.solve_qp(m, np.zeros(k), np.eye(k), u)[0] for u in preferences)
    return weights @ j


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_upgrad_matches_quadprog(case: HardCase):
    """Scale: TorchJD's (``Σ_i π(g_i / k)`` on the conditioned Gramian ``M/tr M + 1e-4 I``)."""
    j = case.jacobian
    _, ours = run("upgrad", j)
    k = case.k
    assert_same_update(ours, reference_dual_cone(j.numpy(), np.eye(k) / k), row_scale(j), case.id)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dualproj_matches_quadprog(case: HardCase):
    j = case.jacobian
    _, ours = run("dualproj", j)
    k = case.k
    assert_same_update(ours, reference_dual_cone(j.numpy(), np.full((1, k), 1 / k)), row_scale(j), case.id)


# ---------------------------------------------------------------- IMTL-G / IMTL: pseudo-inverse (scipy)
def reference_imtl_g(j: np.ndarray) -> np.ndarray:
    m = j @ j.T
    norms = np.sqrt(np.clip(np.diag(m), 0, None))
    k = len(m)
    eigenvalues = scipy.linalg.eigvalsh(m)
    v = scipy.linalg.pinvh(m, atol=0, rtol=k * np.finfo(np.float64).eps * max(eigenvalues.max(), 0) / max(
        eigenvalues.max(), 1e-300)) @ norms
    total = v.sum()
    return (v / total if abs(total) >= 1e-12 else np.zeros_like(v)) @ j


@pytest.mark.parametrize("case", SPECTRAL, ids=SPECTRAL_IDS)
def test_imtl_g_matches_scipy_pseudo_inverse(case: HardCase):
    """Scale: weights sum to 1 (paper Eq. 11)."""
    j = case.jacobian
    _, ours = run("imtl-g", j)
    assert_same_update(ours, reference_imtl_g(j.numpy()), row_scale(j), case.id)


@pytest.mark.parametrize("case", SPECTRAL[::3], ids=SPECTRAL_IDS[::3])
def test_imtl_shared_update_is_imtl_g_of_the_scaled_gradients(case: HardCase):
    j = case.jacobian
    k = case.k
    balancer = tb.make("imtl", [f"t{i}" for i in range(k)])
    with torch.no_grad():
        balancer.loss_scale.copy_(torch.linspace(-1, 1, k))
    ours = balancer.aggregate(GradientStep.of(j)).shared_update(j)
    scale = balancer.loss_scale.detach().to(torch.float64).exp()
    scaled = j * scale[:, None]
    assert_same_update(ours, reference_imtl_g(scaled.numpy()), row_scale(scaled), case.id)


# ---------------------------------------------------------------- CAGrad: the primal cone program (Clarabel)
def reference_cagrad(cp, j: np.ndarray, c: float) -> np.ndarray:
    """``max_d min_k g_k·d`` s.t. ``‖d − g₀‖ ≤ c‖g₀‖`` (paper Eq. 3), solved directly as a conic program."""
    scale = np.linalg.norm(j, axis=1).max() or 1.0
    a = j / scale
    g0 = a.mean(0)
    d, t = cp.Variable(a.shape[1]), cp.Variable()
    problem = cp.Problem(cp.Maximize(t), [a @ d >= t, cp.norm(d - g0) <= c * np.linalg.norm(g0)])
    problem.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return d.value * scale


def cagrad_has_unique_primal(j: np.ndarray) -> bool:
    """When 0 lies in the rows' hull the primal optimum is a set (Pareto-stationary point); we then return
    0 (documented), which is not comparable with an arbitrary optimal point."""
    return not (np.linalg.norm(j.mean(0)) == 0 or _zero_in_hull(j))


def _zero_in_hull(j: np.ndarray) -> bool:
    k = j.shape[0]
    a_eq = np.vstack([j.T, np.ones((1, k))])
    b_eq = np.concatenate([np.zeros(j.shape[1]), [1.0]])
    scale = np.linalg.norm(j, axis=1).max() or 1.0
    a_eq[:-1] /= scale
    result = scipy.optimize.linprog(np.zeros(k), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    return bool(result.status == 0)


def cagrad_distance(j: np.ndarray, c: float, w: np.ndarray, d: np.ndarray) -> float:
    """``‖d − d*‖ ≤ √(2φ (D(w) − p(d)) / ‖g_w‖)`` for ``d`` in the ball: weak duality with the strong
    concavity of ``g_w·d`` on the ball's boundary (``D(w) = g_w·g₀ + φ‖g_w‖``, ``p(d) = min_k g_k·d``)."""
    g0 = j.mean(0)
    phi = c * np.linalg.norm(g0)
    gw = w @ j
    gap = max(gw @ g0 + phi * np.linalg.norm(gw) - (j @ d).min(), 0.0)
    assert np.linalg.norm(d - g0) <= phi * (1 + 1e-9) + 1e-300
    return float(np.sqrt(2 * phi * gap / max(np.linalg.norm(gw), 1e-300)))


def check_cagrad(cp, case: HardCase, c: float) -> None:
    j = case.jacobian
    aggregation, ours = run("cagrad", j, c=c, rescale=0)
    jn = j.numpy()
    if not cagrad_has_unique_primal(jn):
        assert torch.isfinite(ours).all() and ours.norm() <= 2 * j.mean(0).norm() + 1e-12
        return
    reference = reference_cagrad(cp, jn, c)
    w = aggregation.extras["dual_weights"].numpy()
    # the reference's certificate uses the projection of its point's best dual: take ours' w (any w is valid)
    assert_certified(ours, reference, cagrad_distance(jn, c, w, ours.numpy()),
                     cagrad_distance(jn, c, w, reference), row_scale(j), case.id)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cagrad_matches_the_primal_cone_program(cp, case: HardCase):
    """Scale: ``rescale=0`` is the primal maximiser itself (paper Eq. 3)."""
    check_cagrad(cp, case, 0.5)


@pytest.mark.parametrize("case", [c for c in CASES if c.k == 10], ids=[c.id for c in CASES if c.k == 10])
def test_cagrad_large_c(cp, case: HardCase):
    check_cagrad(cp, case, 0.9)


# ---------------------------------------------------------------- Aligned-MTL: SVD of J (scipy)
def reference_aligned(j: np.ndarray) -> np.ndarray:
    """``Jᵀ B 1`` with ``B = σ_min U Σ⁻¹ Uᵀ`` from ``J = U Σ Vᵀ``: ``σ_min V_r U_rᵀ 1`` (paper Alg. 1)."""
    k = j.shape[0]
    u, s, vt = scipy.linalg.svd(j, full_matrices=False)
    if s.max() == 0:
        return j.sum(0)
    kept = s**2 > s.max() ** 2 * k * np.finfo(np.float64).eps
    return s[kept].min() * vt[kept].T @ (u[:, kept].T @ np.ones(k))


@pytest.mark.parametrize("case", SPECTRAL, ids=SPECTRAL_IDS)
def test_aligned_mtl_matches_the_svd_of_the_jacobian(case: HardCase):
    """Scale: LibMTL's (column sums of ``B``, uniform preferences ``w = 1``)."""
    j = case.jacobian
    _, ours = run("aligned-mtl", j)
    assert_same_update(ours, reference_aligned(j.numpy()), row_scale(j), case.id)


# ---------------------------------------------------------------- Nash-MTL: the bargaining system (scipy)
def bargaining_exists(j: np.ndarray) -> bool:
    """A positive solution of ``Mα = 1/α`` exists iff some ``d`` has ``g_k·d > 0`` for every task (LP)."""
    k, p = j.shape
    a = j / (np.linalg.norm(j, axis=1, keepdims=True) + 1e-300)
    # max t s.t. a d >= t, -1 <= d <= 1
    result = scipy.optimize.linprog(
        np.concatenate([np.zeros(p), [-1.0]]),
        A_ub=np.hstack([-a, np.ones((k, 1))]),
        b_ub=np.zeros(k),
        bounds=[(-1, 1)] * p + [(None, 1)],
        method="highs",
    )
    return bool(result.status == 0 and -result.fun > 1e-6) and bool((np.linalg.norm(j, axis=1) > 0).all())


def reference_nash(j: np.ndarray) -> np.ndarray:
    """``α > 0`` with ``(M/‖M‖_F) α = 1/α``: scipy's trust-region Newton on ``½βᵀCβ − Σ log β`` in log-space
    (``β = e^x``, ``C`` the unit-diagonal matrix), then polished by Newton steps on the system."""
    m = j @ j.T
    m = m / np.linalg.norm(m)
    d = 1 / np.sqrt(np.diag(m))
    c = m * d[:, None] * d[None, :]

    def residual(x):
        b = np.exp(x)
        return b * (c @ b) - 1

    def jac(x):
        b = np.exp(x)
        return np.diag(b * (c @ b)) + (b[:, None] * c) * b[None, :]

    def value(x):
        b = np.exp(x)
        return 0.5 * b @ c @ b - x.sum()

    solution = scipy.optimize.minimize(
        value, np.zeros(len(m)), jac=residual, hess=jac, method="trust-exact", options={"gtol": 1e-13}
    )
    x = solution.x
    for _ in range(3):
        x = x - np.linalg.solve(jac(x), residual(x))
    assert np.abs(residual(x)).max() < 1e-10
    return d * np.exp(x)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nash_mtl_solves_the_bargaining_system(case: HardCase):
    """Scale: ``α`` solves ``(M/‖M‖_F) α = 1/α`` (official normalisation); unclipped (``max_norm=0``)."""
    j = case.jacobian
    aggregation, ours = run("nash-mtl", j, max_norm=0.0)
    solvable = bargaining_exists(j.numpy())
    assert bool(aggregation.extras["solved"]) == solvable, case.id
    if not solvable:  # no bargaining solution: bounded weights, and the record says so
        assert torch.isfinite(aggregation.weights).all()
        assert torch.isfinite(ours).all()
        return
    alpha = reference_nash(j.numpy())
    np.testing.assert_allclose(aggregation.weights.numpy(), alpha, rtol=1e-6)
    assert_same_update(ours, alpha @ j.numpy(), row_scale(j), case.id)


def test_sampler_covers_every_kind_and_k_up_to_40():
    assert {c.kind for c in CASES} == set(KINDS)
    assert max(c.k for c in CASES) == 40 and min(c.k for c in CASES) == 1
    spread = [c.jacobian.norm(dim=1) for c in CASES if c.kind == "badly_scaled" and c.k >= 2]
    assert all(float(n.max() / n.min()) >= 1e4 * (1 - 1e-9) for n in spread)
