"""The CPU paths of the small ``k × k`` solvers of :mod:`._solvers`, in NumPy.

On CPU a solver's cheap steps run here, on NumPy views of the CPU tensors (no copy, no device
synchronisation): a NumPy call on a ``k``-vector costs one to three microseconds, a tensor op four to ten
(our choice, for speed; the iterations are those of the tensor path, which accelerators run branch-free).

Bit-for-bit agreement with the tensor path matters where a problem is degenerate: with duplicate rows the
active-set systems have a condition number of about ``1 / reg = 1e12``, so a one-ulp difference in a
system's entries moves the coefficients by about 1e-4. Every entry of a system is therefore formed here by the
same correctly rounded elementwise operations as on the tensor path (the ridge's scale is the largest diagonal
entry: a maximum is exact in any order), and the systems are solved by the same ``torch.linalg.solve``
(LAPACK ``gesv``).
Only the branch decisions (signs of multipliers, against tolerances of 1e-12) read NumPy products.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["jacobi_scaling_np", "simplex_qp_np", "min_norm_np", "dual_cone_np"]

_ZERO_ROW = 1e-32  # as in ._solvers: a row with M_ii <= _ZERO_ROW * max M_jj is treated as zero


def jacobi_scaling_np(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(C, s)`` of :func:`._solvers.jacobi_scaling` for one float64 ``(k, k)`` array (same operations)."""
    diag = np.maximum(np.diagonal(m), 0.0)
    largest = diag.max()
    zero = diag <= _ZERO_ROW * largest
    s = np.sqrt(np.where(zero, largest if largest > 0 else 1.0, diag))
    return m / (s[:, None] * s[None, :]), s


_IDENTITIES: dict[int, np.ndarray] = {}


def _identity(k: int) -> np.ndarray:
    """A read-only ``k × k`` identity, made once per ``k``."""
    eye = _IDENTITIES.get(k)
    if eye is None:
        eye = np.eye(k)
        eye.setflags(write=False)
        _IDENTITIES[k] = eye
    return eye


def _solve(system: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``system⁻¹ rhs`` by the tensor path's own call, on views of the arrays: the same LAPACK solve, and the
    same error on a singular system (never a silent non-finite solution)."""
    return torch.linalg.solve(torch.from_numpy(system), torch.from_numpy(rhs)).numpy()


def simplex_qp_np(
    h: np.ndarray,
    b: np.ndarray | None,
    a: np.ndarray | None,
    iters: int,
    reg: float,
    init_free: np.ndarray | None,
) -> tuple[np.ndarray, bool, np.ndarray]:
    """:func:`._solvers.simplex_qp` of one problem: ``(w, converged, free)`` as arrays and a bool.

    ``b = None`` is 0 and ``a = None`` is ones (the simplex), as there."""
    k = h.shape[0]
    diag_scale = max(float(np.diagonal(h).max()), 1e-300)  # the tensor path's (a max is exact)
    if reg > 0:
        h = h + (reg * diag_scale) * _identity(k)
    ones = np.ones(k)
    a = ones if a is None else a
    bordered = np.zeros((k + 1, k + 1))
    bordered[:k, :k] = h
    bordered[:k, k] = -a
    bordered[k, :k] = a
    rhs_full = np.zeros(k + 1)
    if b is not None:
        rhs_full[:k] = -b
    rhs_full[k] = 1.0
    free_ext = np.ones(k + 1, dtype=bool)
    if init_free is not None and init_free.any():
        free_ext[:k] = init_free
    free = free_ext[:k]  # a view: updating free_ext updates it
    eye = _identity(k + 1)

    def solve(rhs: np.ndarray) -> np.ndarray:
        if free_ext.all():  # bordered * 1 and rhs * 1 are the tensor path's entries exactly
            return _solve(bordered, rhs)
        system = np.where(free_ext[:, None], bordered * free_ext[None, :], eye)
        return _solve(system, rhs * free_ext)

    w = np.where(free, 1.0 / a, 0.0)
    w = w / (a * w).sum()
    converged = False
    threshold = -1e-12 * diag_scale
    for _ in range(iters if iters > 0 else 3 * k + 10):
        solution = solve(rhs_full)
        y, mu = solution[:k], solution[k]
        if y.min() >= 0:
            if free_ext.all():  # every multiplier off the free set is vacuous: the KKT conditions hold
                w, converged = y, True
                break
            hy = h @ y
            if b is not None:
                hy += b
            multipliers = hy - mu * a  # the order of the tensor path's (h y + b) − μ a
            multipliers[free] = np.inf
            worst = int(multipliers.argmin())
            w = y
            if multipliers[worst] >= threshold:
                converged = True
                break
            free_ext[worst] = True
        else:
            shrinking = free & (y < 0)
            ratios = np.full(k, np.inf)
            ratios[shrinking] = w[shrinking] / np.maximum(w[shrinking] - y[shrinking], 1e-300)
            theta = min(max(float(ratios.min()), 0.0), 1.0)
            w = np.maximum(w + theta * (y - w), 0.0)
            free_ext[:k] = free & ~(shrinking & (ratios <= theta * (1 + 1e-12)))
    if reg > 0:  # the tensor path's refinement on the final support
        ridge = np.zeros(k + 1)
        ridge[:k] = (reg * diag_scale) * w
        refined = solve(rhs_full + ridge)[:k]
        if converged and refined.min() >= 0:
            w = refined
    w = np.where(free, np.maximum(w, 0.0), 0.0)
    total = float((a * w).sum())
    w = w / max(total, 1e-300) if total > 0 else 1.0 / (k * a)
    return w, converged, free.copy()


def min_norm_np(m: np.ndarray, iters: int) -> tuple[np.ndarray, bool]:
    """:func:`._solvers.min_norm_solve` of one float64 ``(k, k)`` Gramian: ``(c, converged)``."""
    c, s = jacobi_scaling_np(m)
    e, converged, _ = simplex_qp_np(c, None, 1.0 / s, iters, 1e-12, None)
    weights = e / s
    return weights / weights.sum(), converged


def dual_cone_np(
    m: np.ndarray, u: np.ndarray, iters: int, norm_eps: float, reg_eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`._solvers.dual_cone_weights` of one float64 Gramian and ``(..., k)`` preferences: ``(v,
    converged)``, every preference vector solved in one batched call."""
    k = m.shape[-1]
    trace = float(np.trace(m))
    eye = _identity(k)
    m = (np.zeros_like(m) if trace < norm_eps else m / trace) + reg_eps * eye
    at_bound = np.ones(u.shape, dtype=bool)
    v = u
    converged = np.zeros(u.shape[:-1], dtype=bool)
    for _ in range(iters if iters > 0 else 2 * k + 10):
        if at_bound.all():  # every system is the identity: its LAPACK solution is u, exactly
            v_new = u
        else:
            system = np.where(at_bound[..., :, None], eye, m)
            v_new = np.linalg.solve(system, np.where(at_bound, u, 0.0)[..., None])[..., 0]
        new_bound = (m @ v_new[..., None])[..., 0] >= (v_new - u)
        stable = (new_bound == at_bound).all(-1)
        if not converged.any():  # the usual case: every problem still running
            v, at_bound = v_new, new_bound
        else:
            v = np.where(converged[..., None], v, v_new)
            at_bound = np.where(converged[..., None], at_bound, new_bound)
        converged = converged | stable
        if converged.all():
            break
    return np.maximum(v, u), converged
