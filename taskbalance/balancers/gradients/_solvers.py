"""On-device solvers for the small ``k × k`` problems of the gradient-level balancers.

Everything here works on the Gramian ``M = J Jᵀ`` (``k × k``, ``k ≤ 40`` in practice), in float64, on the
Gramian's device, with a fixed number of iterations and no host reads: convergence is tracked with on-device
masks (``torch.where``) and reported as a boolean tensor, never branched on in Python. All functions accept a
leading batch dimension where stated, so several problems are solved in one call.

* :func:`min_norm_weights` — coefficients on the simplex of the min-norm point of the rows' convex hull
  (MGDA, the tensioners' central direction), by a primal active-set method.
* :func:`simplex_qp` — the general ``min ½ wᵀHw + bᵀw`` on the simplex that the former specialises.
* :func:`dual_cone_weights` — the UPGrad/DualProj projection ``min vᵀMv s.t. v ≥ u`` (TorchJD's dual form).
* :func:`cagrad_weights` — CAGrad's dual ``min_{w∈Δ} wᵀM1/k + φ √(wᵀMw)``.
* :func:`nash_weights` — the Nash bargaining system ``M α = 1/α, α > 0`` by damped Newton.

Active-set methods converge in a finite number of steps whenever they stop cycling; for these strictly convex
(regularised) problems they settle in a handful of iterations, far fewer than first-order methods (the tests
check convergence on degenerate inputs: zero, duplicate, collinear rows, norms spread over 1e±6, k = 40).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "min_norm_weights",
    "simplex_qp",
    "dual_cone_weights",
    "cagrad_weights",
    "nash_weights",
    "normalized_gramian",
    "gramian",
]

_REG = 1e-12  # relative ridge added to trace-normalised Gramians so active-set systems stay solvable


def normalized_gramian(gramian: Tensor, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(M / (tr M / k), tr M / k)`` in float64; an all-zero (or ``tr M / k ≤ eps``) Gramian maps to 0."""
    m = gramian.to(torch.float64)
    k = m.shape[-1]
    scale = m.diagonal(dim1=-2, dim2=-1).sum(-1) / k
    safe = torch.where(scale > eps, scale, torch.ones_like(scale))
    normed = torch.where((scale > eps)[..., None, None], m / safe[..., None, None], torch.zeros_like(m))
    return normed, scale


def _finished(converged: Tensor) -> bool:
    """Early exit, on CPU tensors only: reading a CPU tensor costs no device synchronisation.

    On accelerators this returns ``False`` without touching the value, so the fixed iteration count runs and
    the host never waits for the device; the converged problems are frozen by ``torch.where`` masks.
    """
    return converged.device.type == "cpu" and bool(converged.all())


def _eye(k: int, like: Tensor) -> Tensor:
    return torch.eye(k, dtype=like.dtype, device=like.device)


def simplex_qp(
    hessian: Tensor, linear: Tensor | None = None, *, iters: int = 0, reg: float = _REG
) -> tuple[Tensor, Tensor]:
    """Solve ``min_w ½ wᵀ H w + bᵀ w`` subject to ``w ≥ 0, Σ w = 1`` by a primal active-set method.

    Args:
        hessian: ``(..., k, k)`` symmetric positive semi-definite ``H`` (float64 recommended).
        linear: ``(..., k)`` ``b``, or ``None`` for 0.
        iters: number of iterations; ``0`` means ``2k + 4``. Each is one ``(k+1)``-square solve.
        reg: ridge ``reg · mean(diag H)`` added to ``H`` so that the restricted KKT systems are regular when
            rows are duplicated or zero (the minimiser is then the least-norm-coefficient one, up to ``reg``).

    Returns:
        ``(w, converged)``: ``(..., k)`` weights on the simplex and a ``(...)`` bool tensor, true where the
        KKT conditions were verified (every later iteration is then a no-op, masked on device).

    The iterate stays feasible. Starting from the uniform point with every coordinate free, each iteration
    solves the equality-constrained problem on the free set ``F`` (``H_FF y_F − μ 1 = −b_F``, ``1ᵀy_F = 1``).
    If ``y ≥ 0`` it moves there and frees the coordinate with the most negative multiplier
    ``λ = Hy + b − μ`` (or stops if ``λ ≥ 0``); otherwise it moves towards ``y`` until a coordinate hits 0 and
    fixes it. The objective never increases, so the method cannot cycle (Wolfe 1976; Nocedal & Wright §16.5);
    a solution with support ``s`` is reached in at most about ``k − s`` + (number of additions) iterations.
    """
    h = hessian.to(torch.float64)
    k = h.shape[-1]
    batch = h.shape[:-2]
    b = torch.zeros((*batch, k), dtype=h.dtype, device=h.device) if linear is None else linear.to(h.dtype)
    diag_mean = h.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
    h = h + (reg * diag_mean)[..., None, None] * _eye(k, h)
    steps = iters if iters > 0 else 2 * k + 4
    eye = _eye(k + 1, h)
    bordered = torch.cat(
        [torch.cat([h, -torch.ones_like(h[..., :1])], -1), torch.cat([torch.ones_like(h[..., :1, :]),
                                                                    torch.zeros_like(h[..., :1, :1])], -1)],
        -2,
    )
    rhs_full = torch.cat([-b, torch.ones_like(b[..., :1])], -1)
    always = torch.ones((*batch, 1), dtype=torch.bool, device=h.device)
    free = torch.ones((*batch, k), dtype=torch.bool, device=h.device)
    converged = torch.zeros(batch, dtype=torch.bool, device=h.device)
    w = torch.full((*batch, k), 1.0 / k, dtype=h.dtype, device=h.device)
    tol = 1e-12
    for _ in range(steps):
        free_ext = torch.cat([free, always], -1)
        system = torch.where(free_ext[..., :, None], bordered * free_ext[..., None, :], eye)
        solution = torch.linalg.solve(system, rhs_full * free_ext)
        y, mu = solution[..., :k], solution[..., k:]
        feasible = (y >= 0).all(-1)
        # branch 1 (y feasible): move to y, free the most violated coordinate or stop
        multipliers = (h @ y[..., None])[..., 0] + b - mu
        candidates = torch.where(free, torch.full_like(multipliers, float("inf")), multipliers)
        worst = candidates.argmin(-1)
        optimal = candidates.gather(-1, worst[..., None])[..., 0] >= -tol * diag_mean
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
    w = w.clamp_min(0)
    total = w.sum(-1, keepdim=True)
    w = torch.where(total > 0, w / total.clamp_min(1e-300), torch.full_like(w, 1.0 / k))
    return w, converged


def min_norm_weights(gramian: Tensor, iters: int = 0) -> Tensor:
    """Simplex coefficients ``c`` of the min-norm point of the convex hull of the rows of ``J``.

    Solves ``min_{c ∈ Δ} cᵀ M c`` for ``M = J Jᵀ`` (Sener & Koltun 2018, Eq. 3 / Algorithm 2 solve the same
    problem by Frank–Wolfe; this is an exact active-set solve, see :func:`simplex_qp`).

    Args:
        gramian: ``(..., k, k)`` Gramian(s), any float dtype, any device.
        iters: active-set iterations (``0``: ``2k + 4``).

    Returns:
        ``(..., k)`` float64 coefficients, non-negative, summing to 1. The min-norm *point* ``cᵀJ`` is unique;
        with linearly dependent rows ``c`` is the (near) least-norm choice. An all-zero Gramian gives ``1/k``.
    """
    normed, _ = normalized_gramian(gramian)
    weights, _ = simplex_qp(normed, iters=iters)
    return weights


def dual_cone_weights(
    gramian: Tensor, preferences: Tensor, *, iters: int = 0, norm_eps: float = 1e-4, reg_eps: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """Weights ``v`` of the projection of ``Jᵀu`` onto the dual cone of the rows of ``J``.

    TorchJD's dual form (Quinton & Rey 2024, Prop. 1): ``min_v vᵀ M v`` s.t. ``v ≥ u``, with TorchJD's
    conditioning of ``M``: divided by its trace (all zeros if the trace is below ``norm_eps``), plus
    ``reg_eps · I``. Solved by primal–dual active sets (``A`` = coordinates at their bound ``v_i = u_i``,
    ``(M v)_i = 0`` on the others; ``A ← {i : (Mv)_i ≥ v_i − u_i}``).

    Args:
        gramian: ``(k, k)`` Gramian.
        preferences: ``(..., k)`` vectors ``u`` (e.g. the rows of ``diag(1/k)`` for UPGrad, one ``1/k`` vector
            for DualProj); all are solved in one batched call.
        iters: iterations (``0``: ``k + 8``).

    Returns:
        ``(v, converged)`` of shapes ``(..., k)`` and ``(...)``, float64.
    """
    m = gramian.to(torch.float64)
    k = m.shape[-1]
    trace = m.diagonal(dim1=-2, dim2=-1).sum(-1)
    small = trace < norm_eps
    m = torch.where(small, torch.zeros_like(m), m / torch.where(small, torch.ones_like(trace), trace))
    m = m + reg_eps * _eye(k, m)
    u = preferences.to(torch.float64)
    m = m.expand(*u.shape[:-1], k, k)
    eye = _eye(k, m)
    steps = iters if iters > 0 else k + 8
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


def cagrad_weights(
    gramian: Tensor, c: float, *, outer: int = 12, iters: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """CAGrad's dual (Liu et al. 2021, Eq. 5 / official ``cagrad``): ``min_{w∈Δ} wᵀ M 1/k + φ √(wᵀ M w)``.

    ``φ = c ‖g₀‖`` with ``g₀`` the mean gradient. Uses ``√x = min_t (x/t + t)/2``: alternately solves the
    simplex QP ``min wᵀ M1/k + φ wᵀMw / (2t)`` exactly (:func:`simplex_qp`) and sets ``t = √(wᵀMw)``; block
    coordinate descent on a jointly convex function, ``outer`` rounds, each warm-free and exact.

    Returns:
        ``(w, gw_norm, g0_norm)`` on the trace-normalised scale (the final CAGrad weights are scale-free):
        the dual minimiser, ``‖Σ w_k g_k‖`` and ``‖g₀‖``.
    """
    normed, _ = normalized_gramian(gramian)
    k = normed.shape[-1]
    ones = torch.full((k,), 1.0 / k, dtype=normed.dtype, device=normed.device)
    linear = normed @ ones
    g0_norm = (ones @ linear).clamp_min(0).sqrt()
    phi = c * g0_norm
    w = ones
    t = (w @ normed @ w).clamp_min(0).sqrt()
    floor = torch.tensor(1e-9, dtype=normed.dtype, device=normed.device)
    for _ in range(outer):
        scale = phi / torch.maximum(t, floor)
        w, _ = simplex_qp(scale * normed, linear, iters=iters)
        t = (w @ normed @ w).clamp_min(0).sqrt()
    return w, t, g0_norm


def nash_weights(
    gramian: Tensor, init: Tensor | None = None, *, iters: int = 20, reg: float = 1e-10
) -> tuple[Tensor, Tensor]:
    """Solve the Nash bargaining system ``M α = 1/α``, ``α > 0`` (Navon et al. 2022, Eq. 4).

    It is the stationarity condition of the strictly convex, self-concordant ``f(α) = ½ αᵀMα − Σ log α_i``,
    so damped Newton (``α ← α − Δ/(1+λ)``, ``Δ = (M + diag(α⁻²))⁻¹ ∇f``, ``λ² = ∇fᵀΔ``) stays in ``α > 0``
    without a line search and converges quadratically near the solution. ``M`` gets a ridge ``reg · tr M / k``
    so a solution exists even when the gradients conflict completely (then ``α`` is large and ``Jᵀα ≈ 0``).

    Args:
        gramian: ``(k, k)`` Gramian, already normalised as the caller wants (Nash-MTL divides by ``‖M‖_F``).
        init: starting point (e.g. the previous step's ``α``); default ``1/√diag M`` (exact for orthogonal
            rows).
        iters: Newton iterations.

    Returns:
        ``(α, residual)``: float64 ``α`` and ``‖Mα − 1/α‖`` (documented tolerance: ``< 1e-3``, the official
        stopping rule; in practice ~1e-10 after 20 iterations from a warm start).
    """
    m = gramian.to(torch.float64)
    k = m.shape[-1]
    diag = m.diagonal()
    m = m + (reg * diag.mean().clamp_min(1e-300)) * _eye(k, m)
    if init is None:
        alpha = m.diagonal().rsqrt()
    else:
        alpha = init.to(torch.float64).clamp_min(1e-12)
    for _ in range(iters):
        gradient = m @ alpha - 1.0 / alpha
        hessian = m + torch.diag(alpha.pow(-2))
        step = torch.linalg.solve(hessian, gradient)
        decrement = (gradient @ step).clamp_min(0).sqrt()
        alpha = alpha - step / (1.0 + decrement)
    residual = torch.linalg.vector_norm(m @ alpha - 1.0 / alpha)
    return alpha, residual


def gramian(jacobian: Tensor) -> Tensor:
    """``J Jᵀ`` in float64 (the product is formed in the Jacobian's dtype, then widened)."""
    return (jacobian @ jacobian.T).to(torch.float64)
