"""Defining properties of the on-device solvers and of the methods built on them, over sampled Jacobians,
including degenerate ones (zero, duplicate, collinear rows, norms over 1e±6, k = 1 and k = 40)."""

import numpy as np
import pytest
import quadprog
import torch
from hard_jacobians import hard_jacobian

import taskbalance as tb
from taskbalance import GradientStep
from taskbalance.balancers.gradients._solvers import dual_cone_weights, min_norm_weights, nash_weights

KINDS = ["random", "spread_norms", "duplicates", "zero_row", "collinear", "low_rank", "aligned"]


def jacobian(kind: str, k: int, seed: int, p: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    j = torch.randn(k, p, generator=g, dtype=torch.float64)
    if kind == "spread_norms":
        j = j * torch.logspace(-6, 6, k, dtype=torch.float64)[:, None]
    elif kind == "duplicates" and k >= 3:
        j[1] = j[0]
        j[2] = j[0]
    elif kind == "zero_row":
        j[0] = 0
    elif kind == "collinear" and k >= 3:
        j[1] = -3 * j[0]
        j[2] = 2 * j[0]
    elif kind == "low_rank":
        basis = torch.randn(2, p, generator=g, dtype=torch.float64)
        j = torch.randn(k, 2, generator=g, dtype=torch.float64) @ basis
    elif kind == "aligned":
        j = j + 4 * torch.randn(1, p, generator=g, dtype=torch.float64)
    return j


CASES = [(kind, k, seed) for kind in KINDS for k in (1, 2, 3, 7, 40) for seed in range(3)]


def brute_force_min_norm(m: np.ndarray) -> np.ndarray:
    k = m.shape[0]
    scale = np.trace(m) / k if np.trace(m) > 0 else 1.0
    constraints = np.hstack([np.ones((k, 1)), np.eye(k)])
    bounds = np.hstack([[1.0], np.zeros(k)])
    return quadprog.solve_qp(m / scale + 1e-9 * np.eye(k), np.zeros(k), constraints, bounds, meq=1)[0]


@pytest.mark.parametrize("kind,k,seed", CASES)
def test_min_norm_point_is_in_the_hull_and_minimal(kind, k, seed):
    j = jacobian(kind, k, seed)
    c = min_norm_weights(j @ j.T)
    assert (c >= 0).all() and torch.isclose(c.sum(), torch.tensor(1.0, dtype=c.dtype))
    ours = (c @ j).norm()
    reference = (torch.from_numpy(brute_force_min_norm((j @ j.T).numpy())) @ j).norm()
    scale = j.norm(dim=1).max().clamp_min(1e-300)
    assert ours <= reference + 1e-6 * scale


def test_min_norm_batched_equals_one_by_one():
    js = [jacobian("random", 5, s) for s in range(4)]
    grams = torch.stack([j @ j.T for j in js])
    torch.testing.assert_close(min_norm_weights(grams), torch.stack([min_norm_weights(g) for g in grams]))


def brute_force_dual_cone(m: np.ndarray, u: np.ndarray) -> np.ndarray:
    trace = np.trace(m)
    m = (m / trace if trace >= 1e-4 else np.zeros_like(m)) + 1e-4 * np.eye(len(u))
    return quadprog.solve_qp(m, np.zeros(len(u)), np.eye(len(u)), u)[0]


@pytest.mark.parametrize("kind,k,seed", CASES)
def test_dual_cone_projection_matches_quadprog(kind, k, seed):
    j = jacobian(kind, k, seed)
    u = torch.eye(k, dtype=torch.float64) / k
    v, converged = dual_cone_weights(j @ j.T, u)
    assert converged.all()
    for row, vec in zip(u, v, strict=True):
        expected = brute_force_dual_cone((j @ j.T).numpy(), row.numpy())
        np.testing.assert_allclose(vec.numpy(), expected, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize(
    "kind,k,seed", [c for c in CASES if c[0] != "collinear" and not (c[0] == "low_rank" and c[1] > 2)]
)
def test_nash_solution_satisfies_bargaining_system(kind, k, seed):
    j = jacobian(kind, k, seed)
    # (opposite or rank-deficient conflicting rows have no positive solution: left out)
    if (j.norm(dim=1) == 0).any():  # a zero gradient has no bargaining solution
        j[0] = 1e-3
    m = j @ j.T
    m = m / torch.linalg.matrix_norm(m)
    solution = nash_weights(m, iters=60)
    alpha = solution.alpha
    assert (alpha > 0).all() and bool(solution.converged) and bool(solution.solved)
    torch.testing.assert_close(alpha * (m @ alpha), torch.ones_like(alpha), rtol=1e-6, atol=1e-6)
    assert solution.residual < 1e-6


def aggregate(name: str, j: torch.Tensor, **kwargs) -> torch.Tensor:
    tasks = [f"t{i}" for i in range(j.shape[0])]
    balancer = tb.make(name, tasks, **kwargs)
    result = balancer.aggregate(GradientStep.of(j))
    return result.shared_update(j)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@pytest.mark.parametrize("kind,k,seed", CASES)
def test_dual_cone_methods_conflict_with_no_task(name, kind, k, seed):
    j = jacobian(kind, k, seed)
    balancer = tb.make(name, [f"t{i}" for i in range(k)])
    weights = balancer.aggregate(GradientStep.of(j)).weights
    inner = j @ (weights @ j)
    # KKT of the conditioned problem: (M/tr M + reg_eps I) v >= 0, so g_i·update >= -reg_eps tr(M) v_i
    tolerance = 1.01e-4 * (j * j).sum() * weights.abs() + 1e-12
    assert (inner >= -tolerance).all()


@pytest.mark.parametrize("kind,k,seed", [c for c in CASES if c[0] in ("random", "aligned", "spread_norms")])
def test_imtl_g_has_equal_projections_on_unit_gradients(kind, k, seed):
    j = jacobian(kind, k, seed)
    if kind == "spread_norms":
        j = j / j.norm(dim=1, keepdim=True) * torch.logspace(-2, 2, k, dtype=torch.float64)[:, None]
    update = aggregate("imtl-g", j)
    projections = (j / j.norm(dim=1, keepdim=True)) @ update
    torch.testing.assert_close(projections, projections.mean().expand(k), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind,k,seed", CASES)
def test_cagrad_with_c_zero_is_the_mean(kind, k, seed):
    j = jacobian(kind, k, seed)
    torch.testing.assert_close(aggregate("cagrad", j, c=0.0), j.mean(0))


@pytest.mark.parametrize("kind,k,seed", [c for c in CASES if c[0] in ("random", "aligned") and c[1] > 1])
def test_cagrad_stays_in_the_ball_and_improves_the_worst_task(kind, k, seed):
    j = jacobian(kind, k, seed)
    c = 0.5
    update = aggregate("cagrad", j, c=c, rescale=0)
    g0 = j.mean(0)
    assert (update - g0).norm() <= c * g0.norm() * (1 + 1e-6)
    assert (j @ update).min() >= (j @ g0).min() - 1e-9 * g0.norm() ** 2


@pytest.mark.parametrize("kind,k,seed", [c for c in CASES if c[0] in ("random", "aligned", "spread_norms")])
def test_aligned_mtl_equalises_principal_components(kind, k, seed):
    j = jacobian(kind, k, seed)
    if kind == "spread_norms":  # 1e±6 makes λ span 1e24, beyond what eigh resolves: use 1e±2
        j = j / j.norm(dim=1, keepdim=True) * torch.logspace(-2, 2, k, dtype=torch.float64)[:, None]
    update = aggregate("aligned-mtl", j)
    eigenvalues, vectors = torch.linalg.eigh(j @ j.T)
    kept = eigenvalues > eigenvalues.max() * k * torch.finfo(torch.float64).eps
    # unit principal directions in parameter space p_i = Jᵀv_i/√λ_i: the raw mean would have components
    # √λ_i (v_i·1)/k, dominated by the strong directions; Aligned-MTL's are √λ_min (v_i·1): every
    # direction gets the same gain √λ_min, whatever its eigenvalue
    directions = (vectors[:, kept].T @ j) / eigenvalues[kept].sqrt()[:, None]
    components = directions @ update
    expected = eigenvalues[kept].min().sqrt() * vectors[:, kept].sum(0)
    scale = eigenvalues[kept].min().sqrt() * k**0.5
    torch.testing.assert_close(components, expected, rtol=1e-6, atol=1e-8 * scale)


@pytest.mark.parametrize(
    "name,kwargs,message",
    [
        ("mgda", {"mgda_gn": "l3"}, "mgda_gn"),
        ("cagrad", {"c": -1.0}, "c must"),
        ("cagrad", {"rescale": 3}, "rescale"),
        ("nash-mtl", {"max_norm": -1.0}, "max_norm"),
        ("nash-mtl", {"update_weights_every": 0}, "update_weights_every"),
        ("upgrad", {"reg_eps": -1.0}, "reg_eps"),
        ("aligned-mtl", {"scale_mode": "max"}, "scale_mode"),
        ("tensioners", {"alpha": 1.5}, "alpha"),
        ("tensioners", {"window": 0}, "window"),
        ("tensioners", {"tension_scale": "huge"}, "tension_scale"),
    ],
)
def test_bad_hyperparameters_raise_clear_errors(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tb.make(name, ["a", "b"], **kwargs)


SOLVER_METHODS = ["mgda", "upgrad", "dualproj", "imtl-g", "imtl", "cagrad", "aligned-mtl", "nash-mtl"]


@pytest.mark.parametrize("name", SOLVER_METHODS)
def test_non_finite_gradients_propagate_as_nan_not_a_linalg_error(name):
    """on_nonfinite="propagate": NaN flows, never a raw torch._LinAlgError (aligned-mtl, imtl, imtl-g
    raised one before)."""
    j = torch.randn(3, 16, dtype=torch.float64)
    j[1, 4] = float("nan")
    balancer = tb.make(name, ["a", "b", "c"], on_nonfinite="propagate")
    aggregation = balancer.aggregate(GradientStep.of(j))
    assert not torch.isfinite(aggregation.shared_update(j)).all()
    for buffer in balancer.buffers():
        assert torch.isfinite(buffer).all(), f"{name} wrote a non-finite value into its state"


@pytest.mark.parametrize("name", SOLVER_METHODS)
def test_float32_gradients_of_huge_losses_do_not_overflow(name):
    """Losses of 1e20 give float32 gradients of ~1e20: the float64 Gramian holds their squares, and the
    weights (scale-free) keep the float32 update finite and equal in direction to the float64 one."""
    j = torch.randn(3, 16, dtype=torch.float64) * 1e20
    wide = tb.make(name, ["a", "b", "c"]).aggregate(GradientStep.of(j)).shared_update(j)
    narrow_j = j.to(torch.float32)
    narrow = tb.make(name, ["a", "b", "c"]).aggregate(GradientStep.of(narrow_j)).shared_update(narrow_j)
    assert torch.isfinite(narrow).all()
    cosine = torch.nn.functional.cosine_similarity(narrow.double(), wide, dim=0)
    assert cosine >= 1 - 1e-5


def test_nash_mtl_on_an_ill_conditioned_gramian_solves_the_bargaining_system():
    """The defect: norms spread over 4 orders left α_k (Mα)_k varying by 10³ after 20 fixed iterations."""
    g = torch.Generator().manual_seed(3)
    norms = torch.logspace(-2, 2, 6, dtype=torch.float64)[:, None]
    j = torch.randn(6, 32, generator=g, dtype=torch.float64) * norms
    j = j + 0.5 * torch.randn(1, 32, generator=g, dtype=torch.float64) * j.norm(dim=1, keepdim=True)
    aggregation = tb.make("nash-mtl", [f"t{i}" for i in range(6)]).aggregate(GradientStep.of(j))
    m = j @ j.T
    m = m / torch.linalg.matrix_norm(m)
    alpha = aggregation.weights
    torch.testing.assert_close(alpha * (m @ alpha), torch.ones(6, dtype=torch.float64), rtol=1e-8, atol=1e-8)
    assert bool(aggregation.extras["solved"]) and bool(aggregation.extras["solver_converged"])


def test_nash_mtl_without_a_solution_is_bounded_and_says_so():
    j = torch.randn(3, 16, dtype=torch.float64)
    j[1] = -j[0]
    aggregation = tb.make("nash-mtl", ["a", "b", "c"], max_norm=0.0).aggregate(GradientStep.of(j))
    assert not bool(aggregation.extras["solved"])
    assert torch.isfinite(aggregation.weights).all()
    assert aggregation.weights.max() * j.norm(dim=1).max() <= 1e3  # β below ~1/√1e-4
    assert aggregation.shared_update(j).norm() <= 3**0.5 * 100 * j.norm(dim=1).max()


def test_a_solver_that_hits_its_cap_warns_once_per_balancer():
    j = hard_jacobian("badly_scaled", 10, 0)  # support of the min-norm point: not all 10 rows
    balancer = tb.make("mgda", [f"t{i}" for i in range(10)], iters=1)
    with pytest.warns(RuntimeWarning, match="iteration cap"):
        record = balancer.aggregate(GradientStep.of(j))
    assert not bool(record.extras["solver_converged"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        balancer.aggregate(GradientStep.of(j))  # the same balancer stays quiet
    with pytest.warns(RuntimeWarning, match="iteration cap"):
        tb.make("nash-mtl", [f"t{i}" for i in range(10)], optim_niter=1).aggregate(GradientStep.of(j * 1e3))


@pytest.mark.parametrize("kind", ["random", "duplicate", "opposed", "zero", "badly_scaled", "mixed"])
def test_accelerator_fixed_budget_path_agrees_with_the_cpu_early_exits(monkeypatch, kind):
    """On CPU the solvers branch on host reads (early exit, one active-set branch, full Newton steps near the
    solution); accelerators run the branch-free, fixed-budget path. Both must give the same answer."""
    from taskbalance.balancers.gradients import _solvers

    for k in (3, 10):
        gram = (lambda j: j @ j.T)(hard_jacobian(kind, k, seed=0))
        nash_gram = gram / torch.linalg.matrix_norm(gram)

        def solve(gram=gram, nash_gram=nash_gram):
            cagrad = _solvers.cagrad_weights(gram, 0.5).weights
            return min_norm_weights(gram), cagrad, nash_weights(nash_gram).alpha

        cpu = solve()
        monkeypatch.setattr(_solvers, "_HOST_DECIDES_ON_CPU", False)
        budget = solve()
        monkeypatch.setattr(_solvers, "_HOST_DECIDES_ON_CPU", True)
        for ours, fixed, what in zip(cpu, budget, ("min-norm", "cagrad", "nash"), strict=True):
            torch.testing.assert_close(ours, fixed, rtol=1e-7, atol=1e-9, msg=f"{what} k={k}")
