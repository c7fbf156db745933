"""On-device solvers for the small ``k × k`` problems of the gradient-level balancers.

Everything here works on the Gramian ``M = J Jᵀ`` (``k × k``, ``k ≤ 40`` in practice), in float64, on the
Gramian's device, without host reads on accelerators: each solver **iterates to a stated tolerance** under an
iteration cap. On CPU it stops as soon as every problem has converged (reading a CPU boolean costs no device
synchronisation) and computes only the branch such a read selects (the active-set step of a single problem,
the full Newton step near the Nash solution); on an accelerator it runs the cap as a **fixed budget**
(converged problems are frozen by ``torch.where`` masks, so extra iterations are no-ops) and the host never
waits for the device. On CPU, :func:`simplex_qp` and :func:`min_norm_solve` of one problem and
:func:`dual_cone_weights` run their small vector steps in NumPy on views of the tensors, with the same
iterations and the same LAPACK solves (:mod:`._host_solvers`; our choice, for speed: a NumPy call on a
``k``-vector costs about a microsecond, a tensor op several); :func:`finite_or_nan` is one NumPy check
there. Each solver returns a ``converged`` boolean tensor; :func:`warn_if_capped` turns a CPU ``False``
into one warning per balancer.

* :func:`simplex_qp` — ``min ½ wᵀHw + bᵀw`` on ``{w ≥ 0, aᵀw = 1}`` by a primal active-set method.
* :func:`min_norm_weights` / :func:`min_norm_solve` — the min-norm point of the rows' convex hull (MGDA,
  the tensioners' central direction).
* :func:`dual_cone_weights` — the UPGrad/DualProj projection ``min vᵀMv s.t. v ≥ u`` (TorchJD's dual form).
* :func:`cagrad_weights` — CAGrad's dual ``min_{w∈Δ} wᵀM1/k + φ √(wᵀMw)``, exactly (support-wise closed form).
* :func:`nash_weights` — the Nash bargaining system ``M α = 1/α, α > 0`` by damped Newton on a unit-diagonal
  (Jacobi-scaled) system.

**Conditioning.** Task-gradient norms often span orders of magnitude (raw-unit regression targets). Every
solver here works on the Jacobi-scaled Gramian ``C = S⁻¹ M S⁻¹`` (``S = diag √M_ii``, unit diagonal) and
regularises ``C`` (never ``M``) with a tiny ridge, so a ridge never swamps a small task and the results are
invariant to rescaling a task's gradient wherever the method itself is. Zero rows (``M_ii`` below
``1e-32 · max M_jj``, i.e. a gradient norm 1e-16 of the largest) are scaled as if of the largest norm.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._host_solvers import dual_cone_np, min_norm_np, simplex_qp_np

__all__ = [
    "min_norm_weights",
    "min_norm_solve",
    "simplex_qp",
    "dual_cone_weights",
    "cagrad_weights",
    "nash_weights",
    "NashSolution",
    "CAGradSolution",
    "normalized_gramian",
    "jacobi_scaling",
    "warn_if_capped",
    "finite_or_nan",
    "nan_unless",
    "on_host",
    "host_array",
    "gramian",
]

_REG = 1e-12  # ridge on the unit-diagonal Gramian: keeps active-set systems regular (duplicate/zero rows)
_ZERO_ROW = 1e-32  # a row with M_ii <= _ZERO_ROW * max M_jj is treated as zero (norm ratio 1e-16)


def normalized_gramian(gramian: Tensor, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(M / (tr M / k), tr M / k)`` in float64; an all-zero (or ``tr M / k ≤ eps``) Gramian maps to 0."""
    m = gramian.to(torch.float64)
    k = m.shape[-1]
    scale = m.diagonal(dim1=-2, dim2=-1).sum(-1) / k
    safe = torch.where(scale > eps, scale, torch.ones_like(scale))
    normed = torch.where((scale > eps)[..., None, None], m / safe[..., None, None], torch.zeros_like(m))
    return normed, scale


def jacobi_scaling(gramian: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(C, s, zero)``: ``C = M / (s sᵀ)`` with unit diagonal, ``s_i = √M_ii`` (``√max M_jj`` for zero rows,
    1 if ``M = 0``), and the ``(..., k)`` mask of zero rows."""
    m = gramian.to(torch.float64)
    diag = m.diagonal(dim1=-2, dim2=-1).clamp_min(0)
    largest = diag.max(-1, keepdim=True).values
    zero = diag <= _ZERO_ROW * largest
    fallback = torch.where(largest > 0, largest, torch.ones_like(largest)).expand_as(diag)
    s = torch.where(zero, fallback, diag).sqrt()
    c = m / (s[..., :, None] * s[..., None, :])
    return c, s, zero


# Tests set this to False to run the accelerators' branch-free, fixed-budget path on CPU.
_HOST_DECIDES_ON_CPU = True


def _host_decides(t: Tensor) -> bool:
    """Whether the host may read ``t`` to choose a branch: CPU tensors only (reading one costs no device
    synchronisation). Used for early exits and for skipping work that a CPU read shows to be unneeded; on
    accelerators the branch-free path runs (values selected by ``torch.where`` masks)."""
    return _HOST_DECIDES_ON_CPU and t.device.type == "cpu"


def on_host(*tensors: Tensor | None) -> bool:
    """Whether a solve may run in NumPy: CPU tensors that carry no autograd history (``.numpy()`` of such a
    tensor is a view, no copy and no device synchronisation)."""
    return all(
        t is None or (_host_decides(t) and not t.requires_grad) for t in tensors
    )


def host_array(t: Tensor) -> np.ndarray:
    """A float64 NumPy view of a CPU tensor (see :func:`on_host`; a copy only when it is not float64)."""
    return t.detach().to(torch.float64).numpy()


def _finished(converged: Tensor) -> bool:
    """Early exit, on CPU tensors only: reading a CPU tensor costs no device synchronisation.

    On accelerators this returns ``False`` without touching the value, so the fixed iteration count runs and
    the host never waits for the device; the converged problems are frozen by ``torch.where`` masks.
    """
    return _host_decides(converged) and bool(converged.all())


def warn_if_capped(
    owner: object, converged: Tensor | bool, what: str, knob: str, *, finite: Tensor | bool | None = None
) -> None:
    """Warn once per ``owner`` (a balancer) when a CPU solve stopped at its iteration cap. ``finite``: the
    flag of :func:`finite_or_nan`; a solve of the identity stand-in for a non-finite Gramian never warns.
    (Python bools are the flags of a solve run on the host.)

    Accelerator results are not read (that would synchronise); their flag stays in the step record.
    """
    if getattr(owner, "_warned_solver_cap", False):
        return
    if isinstance(converged, Tensor) and converged.device.type != "cpu":
        return
    if finite is not None and not bool(finite):
        return
    if not bool(converged.all() if isinstance(converged, Tensor) else converged):
        object.__setattr__(owner, "_warned_solver_cap", True)
        warnings.warn(
            f"{what} stopped at its iteration cap before reaching its tolerance; the step uses the last "
            f"iterate. Raise {knob} if this recurs (shown once per balancer).",
            RuntimeWarning,
            stacklevel=3,
        )


def finite_or_nan(gramian: Tensor) -> tuple[Tensor, Tensor]:
    """``(safe, finite)``: the Gramian with non-finite entries replaced by the identity (so that LAPACK
    routines never see them) and a 0-d bool, false when any entry was non-finite. Callers return
    ``torch.where(finite, result, nan)`` (or :func:`nan_unless`): NaN propagates as documented, without a host
    read on accelerators. On CPU the check is one NumPy call and a finite Gramian is returned as it is."""
    if on_host(gramian):
        if bool(np.isfinite(host_array(gramian)).all()):
            return gramian, torch.tensor(True)
        return torch.eye(gramian.shape[-1], dtype=gramian.dtype), torch.tensor(False)
    finite = torch.isfinite(gramian).all()
    eye = torch.eye(gramian.shape[-1], dtype=gramian.dtype, device=gramian.device)
    return torch.where(finite, gramian, eye), finite


def nan_unless(finite: Tensor, values: Tensor) -> Tensor:
    """``torch.where(finite, values, nan)``; on CPU a branch on the host (no op when ``finite``)."""
    if _host_decides(finite):
        return values if bool(finite) else torch.full_like(values, float("nan"))
    return torch.where(finite, values, float("nan"))


def _eye(k: int, like: Tensor) -> Tensor:
    return torch.eye(k, dtype=like.dtype, device=like.device)


def simplex_qp(
    hessian: Tensor,
    linear: Tensor | None = None,
    *,
    constraint: Tensor | None = None,
    iters: int = 0,
    reg: float = _REG,
    init_free: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Solve ``min_w ½ wᵀ H w + bᵀ w`` subject to ``w ≥ 0, aᵀ w = 1`` by a primal active-set method.

    Args:
        hessian: ``(..., k, k)`` symmetric positive semi-definite ``H``, best with unit diagonal
            (see :func:`jacobi_scaling`).
        linear: ``(..., k)`` ``b``, or ``None`` for 0.
        constraint: ``(..., k)`` positive ``a`` (default ones: the simplex).
        iters: iteration cap; ``0`` means ``3k + 10`` (each iteration is one ``(k+1)``-square solve).
        reg: ridge ``reg · max(diag H)`` added to ``H`` so that the restricted KKT systems are regular when
            rows are duplicated or zero (the minimiser is then the least-norm-coefficient one, up to ``reg``).
        init_free: ``(..., k)`` bool guess of the support (a warm start); default all coordinates.

    Returns:
        ``(w, converged, free)``: ``(..., k)`` feasible weights, a ``(...)`` bool tensor (true where the KKT
        conditions were verified, to ``1e-12`` relative), and the final free set (the support).

    The iterate stays feasible. Starting from ``w_i = 1 / (|F| a_i)`` on the free set ``F``, each iteration
    solves the equality-constrained problem on ``F`` (``H_FF y_F − μ a_F = −b_F``, ``a_Fᵀy_F = 1``).
    If ``y ≥ 0`` it moves there and frees the coordinate with the most negative multiplier
    ``λ = Hy + b − μa`` (or stops if ``λ ≥ 0``); otherwise it moves towards ``y`` until a coordinate hits 0
    and fixes it. The objective never increases, so the method cannot cycle (Wolfe 1976; Nocedal & Wright
    §16.5);
    from a correct warm start it stops after one iteration.
    """
    if hessian.dim() == 2 and on_host(hessian, linear, constraint, init_free):
        k = hessian.shape[-1]
        w_np, ok, free_np = simplex_qp_np(
            host_array(hessian),
            None if linear is None else host_array(linear).reshape(k),
            None if constraint is None else np.broadcast_to(host_array(constraint), (k,)),
            iters, reg,
            None if init_free is None else init_free.detach().numpy().astype(bool).reshape(k),
        )
        return torch.from_numpy(w_np), torch.tensor(ok), torch.from_numpy(free_np)
    h = hessian.to(torch.float64)
    k = h.shape[-1]
    batch = h.shape[:-2]
    b = torch.zeros((*batch, k), dtype=h.dtype, device=h.device) if linear is None else linear.to(h.dtype)
    a = torch.ones_like(b) if constraint is None else constraint.to(h.dtype).expand_as(b)
    diag_scale = h.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-300)  # exact: the host path's too
    h = h + (reg * diag_scale)[..., None, None] * _eye(k, h)
    steps = iters if iters > 0 else 3 * k + 10
    eye = _eye(k + 1, h)
    bordered = torch.cat(
        [
            torch.cat([h, -a[..., :, None]], -1),
            torch.cat([a[..., None, :], torch.zeros_like(h[..., :1, :1])], -1),
        ],
        -2,
    )
    rhs_full = torch.cat([-b, torch.ones_like(b[..., :1])], -1)
    always = torch.ones((*batch, 1), dtype=torch.bool, device=h.device)
    if init_free is None:
        free = torch.ones((*batch, k), dtype=torch.bool, device=h.device)
    else:
        free = init_free.to(torch.bool).expand(*batch, k)
        free = torch.where(free.any(-1, keepdim=True), free, torch.ones_like(free))
    w = torch.where(free, 1.0 / a, torch.zeros_like(a))
    w = w / (a * w).sum(-1, keepdim=True)
    converged = torch.zeros(batch, dtype=torch.bool, device=h.device)
    threshold = -1e-12 * diag_scale
    single = not batch and _host_decides(h)  # one CPU problem: branch on the host, compute one branch only
    for _ in range(steps):
        free_ext = torch.cat([free, always], -1)
        system = torch.where(free_ext[..., :, None], bordered * free_ext[..., None, :], eye)
        solution = torch.linalg.solve(system, rhs_full * free_ext)
        y, mu = solution[..., :k], solution[..., k:]
        if single:
            if bool((y >= 0).all()):
                multipliers = h @ y + b - mu * a
                smallest, worst = multipliers.masked_fill(free, float("inf")).min(-1)
                w = y
                if bool(smallest >= threshold):
                    converged = torch.ones_like(converged)
                    break
                free = free.index_fill(-1, worst, True)
            else:
                shrinking = free & (y < 0)
                ratios = (w / (w - y).clamp_min(1e-300)).masked_fill(~shrinking, float("inf"))
                theta = ratios.min().clamp(0, 1)
                w = (w + theta * (y - w)).clamp_min(0)
                free = free & ~(shrinking & (ratios <= theta * (1 + 1e-12)))
            continue
        feasible = (y >= 0).all(-1)
        # branch 1 (y feasible): move to y, free the most violated coordinate or stop
        multipliers = (h @ y[..., None])[..., 0] + b - mu * a
        candidates = torch.where(free, torch.full_like(multipliers, float("inf")), multipliers)
        worst = candidates.argmin(-1)
        optimal = candidates.gather(-1, worst[..., None])[..., 0] >= threshold
        added = free | torch.nn.functional.one_hot(worst, k).to(torch.bool)
        # branch 2 (y infeasible): step to the boundary, fix the blocking coordinate(s)
        shrinking = free & (y < 0)
        ratios = torch.where(shrinking, w / (w - y).clamp_min(1e-300), torch.full_like(w, float("inf")))
        theta = ratios.min(-1, keepdim=True).values.clamp(0, 1)
        stepped = (w + theta * (y - w)).clamp_min(0)
        blocked = shrinking & (ratios <= theta * (1 + 1e-12))
        new_w = torch.where(feasible[..., None], y, stepped)
        grown = torch.where(optimal[..., None], free, added)
        new_free = torch.where(feasible[..., None], grown, free & ~blocked)
        done = feasible & optimal
        w = torch.where(converged[..., None], w, new_w)
        free = torch.where(converged[..., None], free, new_free)
        converged = converged | done
        if _finished(converged):
            break
    if reg > 0:  # one refinement step on the final support: the ridge's bias O(reg·κ) becomes O((reg·κ)²)
        free_ext = torch.cat([free, always], -1)
        system = torch.where(free_ext[..., :, None], bordered * free_ext[..., None, :], eye)
        ridge = torch.cat([(reg * diag_scale)[..., None] * w, torch.zeros_like(w[..., :1])], -1)
        refined = torch.linalg.solve(system, (rhs_full + ridge) * free_ext)[..., :k]
        w = torch.where(converged[..., None] & (refined >= 0).all(-1, keepdim=True), refined, w)
    w = torch.where(free, w.clamp_min(0), torch.zeros_like(w))
    total = (a * w).sum(-1, keepdim=True)
    w = torch.where(total > 0, w / total.clamp_min(1e-300), 1.0 / (k * a))
    return w, converged, free


def min_norm_solve(gramian: Tensor, iters: int = 0) -> tuple[Tensor, Tensor]:
    """``(c, converged)``: simplex coefficients of the min-norm point of the rows' convex hull.

    Solves ``min_{c ∈ Δ} cᵀ M c`` for ``M = J Jᵀ`` (Sener & Koltun 2018, Eq. 3; their Algorithm 2 solves the
    same problem by Frank–Wolfe; this is an exact active-set solve, see :func:`simplex_qp`) in the scaled
    variables ``e = S c`` (``S = diag √M_ii``), where the problem reads ``min eᵀCe`` s.t. ``Σ e_i / s_i = 1``
    with ``C`` of unit diagonal: exact on norms spanning many orders of magnitude.
    """
    if gramian.dim() == 2 and on_host(gramian):
        weights_np, converged_np = min_norm_np(host_array(gramian), iters)
        return torch.from_numpy(weights_np), torch.tensor(converged_np)
    c, s, _ = jacobi_scaling(gramian)
    e, converged, _ = simplex_qp(c, constraint=1.0 / s, iters=iters)
    weights = e / s
    return weights / weights.sum(-1, keepdim=True), converged


def min_norm_weights(gramian: Tensor, iters: int = 0) -> Tensor:
    """Simplex coefficients ``c`` of the min-norm point of the convex hull of the rows of ``J``.

    Args:
        gramian: ``(..., k, k)`` Gramian(s), any float dtype, any device.
        iters: active-set iteration cap (``0``: ``3k + 10``).

    Returns:
        ``(..., k)`` float64 coefficients, non-negative, summing to 1. The min-norm *point* ``cᵀJ`` is unique;
        with linearly dependent rows ``c`` is the (near) least-norm choice. An all-zero Gramian gives ``1/k``.
        See :func:`min_norm_solve` for the convergence flag.
    """
    return min_norm_solve(gramian, iters)[0]


def dual_cone_weights(
    gramian: Tensor, preferences: Tensor, *, iters: int = 0, norm_eps: float = 1e-4, reg_eps: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """Weights ``v`` of the projection of ``Jᵀu`` onto the dual cone of the rows of ``J``.

    TorchJD's dual form (Quinton & Rey 2024, Prop. 1): ``min_v vᵀ M v`` s.t. ``v ≥ u``, with TorchJD's
    conditioning of ``M``: divided by its trace (all zeros if the trace is below ``norm_eps``), plus
    ``reg_eps · I``. Solved by primal–dual active sets (``A`` = coordinates at their bound ``v_i = u_i``,
    ``(M v)_i = 0`` on the others; ``A ← {i : (Mv)_i ≥ v_i − u_i}``), which stops when ``A`` repeats: the
    KKT conditions then hold exactly (to the linear solve's rounding).

    Args:
        gramian: ``(k, k)`` Gramian.
        preferences: ``(..., k)`` vectors ``u`` (e.g. the rows of ``diag(1/k)`` for UPGrad, one ``1/k`` vector
            for DualProj); all are solved in one batched call.
        iters: iteration cap (``0``: ``2k + 10``).

    Returns:
        ``(v, converged)`` of shapes ``(..., k)`` and ``(...)``, float64.
    """
    if gramian.dim() == 2 and on_host(gramian, preferences):
        v_np, ok = dual_cone_np(host_array(gramian), host_array(preferences), iters, norm_eps, reg_eps)
        return torch.from_numpy(np.ascontiguousarray(v_np)), torch.from_numpy(np.asarray(ok))
    m = gramian.to(torch.float64)
    k = m.shape[-1]
    trace = m.diagonal(dim1=-2, dim2=-1).sum(-1)
    small = trace < norm_eps
    m = torch.where(small, torch.zeros_like(m), m / torch.where(small, torch.ones_like(trace), trace))
    m = m + reg_eps * _eye(k, m)
    u = preferences.to(torch.float64)
    m = m.expand(*u.shape[:-1], k, k)
    eye = _eye(k, m)
    steps = iters if iters > 0 else 2 * k + 10
    at_bound = torch.ones_like(u, dtype=torch.bool)
    v = u.clone()
    converged = torch.zeros(u.shape[:-1], dtype=torch.bool, device=u.device)
    for _ in range(steps):
        system = torch.where(at_bound[..., :, None], eye, m)
        rhs = torch.where(at_bound, u, torch.zeros_like(u))
        v_new = torch.linalg.solve(system, rhs)
        multipliers = (m @ v_new[..., None])[..., 0]
        new_bound = multipliers >= (v_new - u)
        stable = (new_bound == at_bound).all(-1)
        v = torch.where(converged[..., None], v, v_new)
        converged = converged | stable
        at_bound = torch.where(converged[..., None], at_bound, new_bound)
        if _finished(converged):
            break
    return torch.maximum(v, u), converged


class CAGradSolution(NamedTuple):
    """CAGrad's dual solution on the scale where the largest task gradient has norm 1."""

    weights: Tensor  # (k,) dual minimiser w on the simplex
    gw_norm: Tensor  # ‖Σ w_k g_k‖
    g0_norm: Tensor  # ‖g₀‖, g₀ the mean gradient
    converged: Tensor  # 0-d bool: KKT verified (or ‖g_w‖ → 0: 0 is in the rows' hull and optimal)


def cagrad_weights(gramian: Tensor, c: float, *, outer: int = 30, iters: int = 0) -> CAGradSolution:
    """CAGrad's dual (Liu et al. 2021, Eq. 5 / official ``cagrad``): ``min_{w∈Δ} wᵀM1/k + φ √(wᵀMw)``.

    ``φ = c ‖g₀‖``, ``g₀`` the mean gradient. Solved exactly (**our choice**, instead of SLSQP): on a
    candidate support ``S`` the KKT system ``b_S + φ M_SS w_S / √(wᵀMw) = μ 1_S``, ``Σ w = 1`` has the closed
    form ``w_S = (μ y − z) / √Δ``, ``√(wᵀMw) = φ / √Δ`` with ``y = M_SS⁻¹ 1``, ``z = M_SS⁻¹ b_S``,
    ``A = 1ᵀy``, ``B = 1ᵀz``, ``Δ = B² − A(b_Sᵀz − φ²)``, ``μ = (B + √Δ)/A``; it is the answer when
    ``w_S ≥ 0`` and every multiplier off ``S`` is ``≥ 0`` (checked to 1e-12). Candidate supports come from the
    simplex QPs ``min wᵀb + φ wᵀMw / (2t)`` (:func:`simplex_qp`, warm-started), which give the dual's value
    through ``√x = min_t (x/t + t)/2``; ``t`` is updated to the closed-form root of the current support and
    safeguarded by a bracket on ``t* = √(w*ᵀMw*)`` (bisection in log-scale), so no step can go astray. In
    practice 1–3 rounds; ``outer`` caps them (the fixed budget on accelerators). When the bracket shrinks
    below ``1e-10`` the dual optimum has ``g_w = 0``: 0 lies in the rows' hull and the point is
    Pareto-stationary (``gw_norm`` is then 0).

    Works on ``M / max_i M_ii`` (scale-free) in the Jacobi-scaled variables of :func:`jacobi_scaling`.
    """
    m = gramian.to(torch.float64)
    k = m.shape[-1]
    largest = m.diagonal().max().clamp_min(1e-300)
    m = m / largest
    plain, s, _ = jacobi_scaling(m)
    cmat = plain + _REG * _eye(k, plain)
    a = 1.0 / s
    mean = torch.full((k,), 1.0 / k, dtype=m.dtype, device=m.device)
    b = (m @ mean) / s  # e-space linear term (e = s ∘ w)
    g0_norm = (mean @ m @ mean).clamp_min(0).sqrt()
    phi = (c * g0_norm).clamp_min(1e-300)
    t = g0_norm.clamp_min(1e-12)
    lo = torch.zeros_like(t)
    hi = torch.ones_like(t)
    free = torch.ones(k, dtype=torch.bool, device=m.device)
    e = a / (a * a).sum()
    e_best = e
    converged = g0_norm <= 1e-12  # g₀ = 0: φ = 0 and the update is g₀ = 0 whatever w
    eye = _eye(k, cmat)
    for _ in range(outer):
        e_qp, _, free_qp = simplex_qp((phi / t) * cmat, b, constraint=a, iters=iters, reg=0.0, init_free=free)
        # closed form on the QP's support
        system = torch.where(free_qp[:, None], cmat * free_qp[None, :], eye)
        rhs = torch.stack([a * free_qp, b * free_qp], -1)
        yz = torch.linalg.solve(system, rhs)
        for _ in range(2):  # iterative refinement: removes the ridge's O(_REG) bias
            yz = torch.linalg.solve(system, rhs + _REG * yz * free_qp[:, None])
        y, z = yz[:, 0], yz[:, 1]
        big_a, big_b = a @ y, a @ z
        disc = big_b**2 - big_a * (b @ z) + big_a * phi**2
        valid = disc > 0
        root = torch.where(valid, disc, torch.ones_like(disc)).sqrt()
        mu = (big_b + root) / big_a
        e_closed = torch.where(free_qp, (mu * y - z) / root, torch.zeros_like(y))
        multipliers = b + root * (cmat @ e_closed) - mu * a
        optimal = valid & (e_closed >= -1e-14).all() & (multipliers >= -1e-12 * (1 + mu.abs())).all()
        # bracket t* with the QP's solution: q(t) >= t² ⟺ t <= t*
        q = (e_qp @ plain @ e_qp).clamp_min(0)  # the true ‖g_w‖², without the ridge
        below = q >= t * t
        lo = torch.where(below, torch.maximum(lo, t), lo)
        hi = torch.where(below, hi, torch.minimum(hi, t))
        t_root = phi / root
        inside = valid & (t_root > lo) & (t_root < hi)
        bisect = torch.where(lo > 0, (lo * hi).sqrt(), hi / 16)
        stationary = hi <= 1e-10  # t* = 0: g_w = 0 at the optimum
        e_step = torch.where(optimal, e_closed.clamp_min(0), e_qp)
        e_best = torch.where(converged, e_best, e_step)
        t = torch.where(converged, t, torch.where(inside, t_root, bisect))
        free = torch.where(converged, free, free_qp)
        converged = converged | optimal | stationary
        if _finished(converged):
            break
    w = e_best / s
    w = w / w.sum()
    gw_norm = (w @ m @ w).clamp_min(0).sqrt()
    return CAGradSolution(w, gw_norm, g0_norm, converged)


class NashSolution(NamedTuple):
    """Result of :func:`nash_weights`."""

    alpha: Tensor  # (k,) float64 weights α > 0
    residual: Tensor  # 0-d max_i |α_i (Mα)_i − 1| over the non-zero rows (0 at the exact solution)
    converged: Tensor  # 0-d bool: Newton decrement below tolerance
    solved: Tensor  # 0-d bool: a bargaining solution exists and was found (see nash_weights)


def _barrier(c: Tensor, beta: Tensor) -> Tensor:
    return 0.5 * beta @ c @ beta - beta.log().sum()


def nash_weights(
    gramian: Tensor,
    init: Tensor | None = None,
    *,
    iters: int = 40,
    tol: float = 1e-10,
    reg: float = 1e-12,
    beta_cap: float = 1e4,
    fallback_reg: float = 1e-4,
) -> NashSolution:
    """Solve the Nash bargaining system ``M α = 1/α``, ``α > 0`` (Navon et al. 2022, Eq. 4).

    With ``α = S⁻¹β`` (``S = diag √M_ii``) the system reads ``C β = 1/β`` for the unit-diagonal
    ``C = S⁻¹MS⁻¹``: the stationarity condition of the strictly convex, self-concordant
    ``f(β) = ½ βᵀCβ − Σ log β_i``. Damped Newton (``β ← β − Δ/(1+λ)``, ``Δ = (C + diag β⁻²)⁻¹ ∇f``,
    ``λ² = ∇fᵀΔ``) stays in ``β > 0`` without a line search and converges quadratically; it stops when
    ``λ ≤ tol`` (then ``β`` is exact to about ``λ`` relative). Newton is affine-invariant, so the scaling only
    matters for the starting point: ``β = 1`` is exact for orthogonal gradients whatever their norms, and a
    warm start ``init`` (the previous ``α``) is used only where it has the lower ``f``. ``C`` carries a ridge
    ``reg · I`` (1e-12: a relative perturbation ``reg · β²``). ``α_i (Mα)_i = β_i (Cβ)_i``, so
    ``residual = max |α_i (Mα)_i − 1|`` is scale-free.

    **No solution** (our choice): a positive solution exists iff some direction improves every task (Gordan:
    no convex combination of the unit gradients vanishes, and no gradient is zero). Every iterate gives a
    certificate: with ``p = β / Σβ``, any solution has ``max β* ≥ 1 / √(k pᵀCp)``. When that bound exceeds
    ``beta_cap`` (1e4: a gain 10⁴ over orthogonal gradients), when the solution found exceeds it, or when a
    row is zero, ``solved`` is false and ``α`` is instead the bargaining solution of the regularised game
    in which every task also owns a private direction of relative size ``√fallback_reg`` (ridge
    ``fallback_reg = 1e-4`` on ``C``): it always exists, is bounded (``β`` of order ``1/√fallback_reg`` at
    most in practice), and still favours the tasks that conflict least. Zero rows get ``β_i = 1`` (an
    orthogonal gradient of the largest norm). On CPU the fallback is solved only when needed; on accelerators
    both are solved (fixed budget).

    Args:
        gramian: ``(k, k)`` Gramian, already normalised as the caller wants (Nash-MTL divides by ``‖M‖_F``).
        init: warm start (e.g. the previous step's ``α``); ignored where non-finite or worse than ``β = 1``.
        iters: Newton iteration cap per solve (the fixed budget on accelerators).
        tol: tolerance on the Newton decrement ``λ``.
    """
    m = gramian.to(torch.float64)
    k = m.shape[-1]
    c, s, zero = jacobi_scaling(m)
    eye = _eye(k, c)
    c = torch.where(zero[:, None] | zero[None, :], eye, c)
    ones = _best_multiple(c + reg * eye, torch.ones(k, dtype=c.dtype, device=c.device))
    start = ones
    if init is not None:
        warm = (init.to(torch.float64) * s).clamp(1e-8, 1e8)
        warm = _best_multiple(c + reg * eye, torch.where(torch.isfinite(warm), warm, ones))
        start = torch.where(_barrier(c, warm) < _barrier(c, ones), warm, ones)
    certificate = 1.0 / (k * beta_cap**2)
    beta, converged, hopeless = _nash_newton(c + reg * eye, c, start, iters, tol, certificate)
    solved = ~hopeless & (beta.max() <= beta_cap) & ~zero.any()
    if not _finished(solved):
        ridged = c + fallback_reg * eye
        fallback_start = _best_multiple(ridged, ones)
        fallback, fallback_converged, _ = _nash_newton(ridged, c, fallback_start, iters, tol, 0.0)
        beta = torch.where(solved, beta, fallback)
        converged = torch.where(solved, converged, fallback_converged)
    residual = torch.where(zero, torch.zeros_like(beta), beta * (c @ beta) - 1.0).abs().max()
    return NashSolution(beta / s, residual, converged, solved)


_STEP_SIZES = torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=torch.float64)


def _best_multiple(c: Tensor, v: Tensor) -> Tensor:
    """``σ v`` with the ``σ > 0`` minimising ``½σ²vᵀCv − k log σ`` (an exact line search along the ray)."""
    return v * (v.shape[-1] / (v @ c @ v).clamp_min(1e-300)).sqrt()


def _nash_newton(
    ridged: Tensor, plain: Tensor, beta: Tensor, iters: int, tol: float, certificate: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Damped Newton on ``½βᵀ(ridged)β − Σ log β`` (each step takes the best of the damped step
    ``1/(1+λ)`` and the sizes 1, ½, ¼, ⅛, evaluated in one batch: never worse than damped Newton);
    stops at ``λ ≤ tol`` or, when ``certificate > 0``, as
    soon as ``p = β/Σβ`` has ``pᵀ(plain)p < certificate`` (then ``hopeless`` is true)."""
    converged = torch.zeros((), dtype=torch.bool, device=beta.device)
    hopeless = torch.zeros((), dtype=torch.bool, device=beta.device)
    host = _host_decides(beta)
    for _ in range(iters):
        inverse = beta.reciprocal()
        gradient = ridged @ beta - inverse
        hessian = ridged + torch.diag(inverse * inverse)
        step = torch.linalg.solve(hessian, gradient)
        decrement_sq = (gradient @ step).clamp_min(0)
        if host and bool(decrement_sq <= 0.0625):
            # λ ≤ ¼, on CPU: the full Newton step stays in β > 0 (λ < 1), decreases f and converges
            # quadratically (self-concordance; Nesterov 2004 §4.1.5), so the size batch and the certificate
            # (the iterate approaches a finite solution) are skipped.
            beta = beta - step
            if bool(decrement_sq <= tol * tol):
                return beta, torch.ones_like(converged), hopeless
            continue
        # the damped step 1/(1+λ) (always decreasing: self-concordance) or a longer one if lower
        sizes = torch.cat([_STEP_SIZES.to(beta.device), (1.0 / (1.0 + decrement_sq.sqrt()))[None]])
        trials = beta - sizes[:, None] * step
        positive = (trials > 0).all(-1)
        logs = torch.where(trials > 0, trials, torch.ones_like(trials)).log().sum(-1)
        values = 0.5 * ((trials @ ridged) * trials).sum(-1) - logs
        values = torch.where(positive, values, torch.full_like(values, float("inf")))
        new_beta = trials[values.argmin()]
        done = converged | hopeless
        beta = torch.where(done, beta, new_beta)
        converged = converged | (decrement_sq <= tol * tol)
        if certificate > 0:
            p = beta / beta.sum()
            hopeless = hopeless | ((p @ plain @ p) < certificate)
        if _finished(converged | hopeless):
            break
    return beta, converged, hopeless


def gramian(jacobian: Tensor) -> Tensor:
    """``J Jᵀ`` in float64 (the Jacobian is widened first, so the product is exact to float64 rounding)."""
    wide = jacobian.to(torch.float64)
    return wide @ wide.T
