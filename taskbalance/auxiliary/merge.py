"""Parameter-space merging of models: convex combinations of ``state_dict`` s and ForkMerge's greedy search.

ForkMerge (Jiang et al., NeurIPS 2023, arXiv:2301.12618) merges branches trained with different task
weights by
``θ = Σ_b Λ_b θ_b`` with ``Λ`` on the simplex; to first order this equals training with the mixed task-weight
vector ``Σ_b Λ_b ν_b`` (paper Eq. 7/13; ``docs/method-notes.md`` §3.2, §3.6). ``Λ`` is chosen by the greedy
search of
the paper's Algorithm 3, which is also what the official code does (§3.3 step 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

__all__ = [
    "DEFAULT_ALPHAS", "SEARCHES", "SearchKind", "merge_state_dicts", "greedy_merge_search",
    "mixture_merge_search", "MergeSearch", "check_alphas",
]

DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
"""The coefficient grid of the paper and the official code."""

_SUM_TOLERANCE = 1e-6


def _is_mergeable(value: Any) -> bool:
    return isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex())


def merge_state_dicts(
    states: Sequence[Mapping[str, Any]],
    coefficients: Sequence[float],
    *,
    include: Callable[[str], bool] | None = None,
    base: int = 0,
) -> dict[str, Any]:
    """The convex combination ``Σ_b c_b · states[b]`` of state dicts, entry by entry.

    * Floating-point (and complex) tensors are combined, in their own dtype, in branch order.
    * Integer and bool tensors (e.g. BatchNorm's ``num_batches_tracked``) and non-tensor entries are taken
      from ``states[base]`` (cloned) — averaging a step counter is meaningless. Our choice; the official code
      averages ``num_batches_tracked`` and writes it back into an integer buffer
      (``docs/method-notes.md`` §3.4, item 3).
    * Keys for which ``include(key)`` is false are also taken from ``states[base]``.

    Args:
        states: state dicts with identical keys, shapes and dtypes.
        coefficients: one non-negative weight per state, summing to 1 (within 1e-6).
        include: which keys to combine (default: all).
        base: the state that supplies the entries that are not combined.

    Raises:
        ValueError: empty input, mismatched lengths, keys or shapes, or coefficients not on the simplex.
    """
    if not states:
        raise ValueError("merge_state_dicts needs at least one state dict")
    weights = [float(c) for c in coefficients]
    if len(weights) != len(states):
        raise ValueError(f"got {len(states)} state dicts but {len(weights)} coefficients")
    if any(not math.isfinite(c) or c < 0 for c in weights):
        raise ValueError(f"merge coefficients must be finite and >= 0, got {weights}")
    if abs(sum(weights) - 1.0) > _SUM_TOLERANCE:
        raise ValueError(f"merge coefficients must sum to 1 (a convex combination), got sum {sum(weights)}")
    if not 0 <= base < len(states):
        raise ValueError(f"base must index one of the {len(states)} states, got {base}")
    keys = list(states[0].keys())
    for b, state in enumerate(states[1:], start=1):
        if set(state.keys()) != set(keys):
            missing = sorted(set(keys) - set(state.keys()))
            extra = sorted(set(state.keys()) - set(keys))
            raise ValueError(
                f"state {b} has different keys than state 0 (missing {missing[:5]}, extra {extra[:5]})"
            )
    merged: dict[str, Any] = {}
    for key in keys:
        reference = states[base][key]
        if _is_mergeable(reference) and (include is None or include(key)):
            total: Tensor | None = None
            for b, state in enumerate(states):
                value = state[key]
                matches = (
                    isinstance(value, Tensor)
                    and value.shape == reference.shape
                    and value.dtype == reference.dtype
                )
                if not matches:
                    raise ValueError(f"entry {key!r} of state {b} does not match state {base} (shape/dtype)")
                term = value * weights[b]
                total = term if total is None else total + term
            merged[key] = total
        else:
            merged[key] = reference.clone() if isinstance(reference, Tensor) else reference
    return merged


def check_alphas(alphas: Sequence[float]) -> tuple[float, ...]:
    """Validate a coefficient grid and return it sorted ascending without duplicates.

    Sorting makes the strict ``>`` comparison of the search send ties to the *smaller* coefficient, as in the
    official code with its ascending default grid.
    """
    values = [float(a) for a in alphas]
    if not values:
        raise ValueError("alphas must contain at least one coefficient")
    if any(not math.isfinite(a) or a < 0 or a > 1 for a in values):
        raise ValueError(f"alphas must lie in [0, 1], got {values}")
    return tuple(sorted(set(values)))


@dataclass
class MergeSearch:
    """The outcome of :func:`greedy_merge_search`.

    Attributes:
        coefficients: ``Λ`` (normalised, on the simplex), one per branch in the given order.
        raw: the unnormalised coefficients ``Λ̃`` (the first-ranked branch has 1).
        order: branch indices in the order they were added (by score, descending; ties by index).
        score: validation score of the merged state.
        state: the merged state dict.
        evaluations: one ``(branch, alpha, score)`` per candidate evaluated, in order.
    """

    coefficients: list[float]
    raw: list[float]
    order: list[int]
    score: float
    state: dict[str, Any]
    evaluations: list[tuple[int, float, float]] = field(default_factory=list)


def _as_comparable(score: float) -> float:
    return -math.inf if math.isnan(score) else score


def greedy_merge_search(
    states: Sequence[Mapping[str, Any]],
    scores: Sequence[float],
    evaluate: Callable[[dict[str, Any]], float],
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    merge: Callable[[Sequence[Mapping[str, Any]], Sequence[float]], dict[str, Any]] = merge_state_dicts,
) -> MergeSearch:
    """ForkMerge's greedy search for merge coefficients (paper Algorithm 3; official ``forkmerge.py``).

    1. Order the branches by ``scores`` (their own validation score), descending; ties keep the lower index.
       Start from ``Λ̃ = e_first``.
    2. For the i-th remaining branch ``b`` (i = 0, 1, …): ``U = (Σ_j Λ̃_j) / (i + 1)``; for each α of the grid,
       try ``Λ̃_b = α U``, evaluate the normalised mixture ``Σ_j Λ̃_j θ_j / ‖Λ̃‖₁`` and keep the α with the
       highest score. Ties keep the earlier (smaller, the grid being sorted ascending) α, as the official
       code's
       strict ``>``; a NaN score counts as −∞. Branch ``b`` therefore gets at most ``1/(i+2)`` of the mass.
    3. Return ``Λ = Λ̃ / ‖Λ̃‖₁``.

    Every candidate is evaluated, including α = 0 (as in the official code); the cost is
    ``(B − 1) · |alphas|`` evaluations (one evaluation when B = 1).

    Args:
        states: one state dict per branch.
        scores: each branch's own validation score (higher is better), for the ordering.
        evaluate: validation score (higher is better) of a merged state dict.
        alphas: the grid, within [0, 1].
        merge: how to combine states (default :func:`merge_state_dicts`).
    """
    grid = check_alphas(alphas)
    count = len(states)
    if count == 0:
        raise ValueError("greedy_merge_search needs at least one branch")
    if len(scores) != count:
        raise ValueError(f"got {count} branch states but {len(scores)} scores")
    order = sorted(range(count), key=lambda b: (-_as_comparable(float(scores[b])), b))
    raw = [0.0] * count
    raw[order[0]] = 1.0
    evaluations: list[tuple[int, float, float]] = []

    def normalised(values: list[float]) -> list[float]:
        total = sum(values)
        return [v / total for v in values]

    if count == 1:
        state = merge(states, [1.0])
        score = float(evaluate(state))
        evaluations.append((order[0], 1.0, score))
        return MergeSearch([1.0], raw, order, score, state, evaluations)

    best_state: dict[str, Any] = {}
    best_score = -math.inf
    for i, branch in enumerate(order[1:]):
        upper = sum(raw) / (i + 1)
        chosen: float | None = None
        chosen_key = -math.inf
        for alpha in grid:
            candidate = list(raw)
            candidate[branch] = alpha * upper
            state = merge(states, normalised(candidate))
            score = float(evaluate(state))
            evaluations.append((branch, alpha, score))
            if chosen is None or _as_comparable(score) > chosen_key:
                chosen, chosen_key = alpha * upper, _as_comparable(score)
                best_state, best_score = state, score
        assert chosen is not None
        raw[branch] = chosen
    return MergeSearch(normalised(raw), raw, order, best_score, best_state, evaluations)


SearchKind = Literal["greedy", "official", "binary"]
SEARCHES: tuple[str, ...] = ("greedy", "official", "binary")


def mixture_merge_search(
    states: Sequence[Mapping[str, Any]],
    scores: Sequence[float],
    evaluate: Callable[[dict[str, Any]], float],
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    binary_steps: int | None = None,
    merge: Callable[[Sequence[Mapping[str, Any]], Sequence[float]], dict[str, Any]] = merge_state_dicts,
) -> MergeSearch:
    """Merge coefficients by adding branches one at a time, each with any share ``λ ∈ [0, 1]``.

    Branches are ordered by ``scores`` (descending; ties keep the lower index), the first gets
    ``Λ = e_first``; for each next branch ``b``, ``Λ ← (1 − λ) Λ + λ e_b`` with the ``λ`` whose merged state
    scores best:

    * ``binary_steps=None``: ``λ`` over the grid ``alphas`` (ties to the smaller ``λ``, NaN = −∞). With two
      branches this is the paper's Algorithm 1 (``λ* = argmax P̂((1−λ) θ⁰ + λ θ¹)`` over {0, .2, …, 1}), so
      the anchor can get any weight, below one half included; with more it generalises the greedy search
      of Algorithm 3, whose bound ``Λ̃_b ≤ U`` (:func:`greedy_merge_search`) caps the i-th added branch at
      ``1/(i+2)`` of the mass — **our choice** for B ≥ 3.
    * ``binary_steps=n``: Algorithm 1's binary-search alternative (its details are not in the sources we could
      read; **our reconstruction**): evaluate ``λ = 0, ½, 1``; then ``n`` times halve the interval around the
      best point so far, evaluating the midpoints of its two halves. ``3 + 2n`` evaluations per added branch;
      exact on unimodal scores up to ``2^-(n+1)``.

    ``MergeSearch.raw`` equals the coefficients here (no unnormalised form).
    """
    if binary_steps is None:
        grid = check_alphas(alphas)
    elif isinstance(binary_steps, bool) or not isinstance(binary_steps, int) or binary_steps < 0:
        raise ValueError(f"binary_steps must be an integer >= 0, got {binary_steps!r}")
    count = len(states)
    if count == 0:
        raise ValueError("the merge search needs at least one branch")
    if len(scores) != count:
        raise ValueError(f"got {count} branch states but {len(scores)} scores")
    order = sorted(range(count), key=lambda b: (-_as_comparable(float(scores[b])), b))
    coefficients = [0.0] * count
    coefficients[order[0]] = 1.0
    evaluations: list[tuple[int, float, float]] = []
    best_state = merge(states, coefficients) if count == 1 else {}
    best_score = float(evaluate(best_state)) if count == 1 else -math.inf
    if count == 1:
        evaluations.append((order[0], 1.0, best_score))
    for branch in order[1:]:
        base = list(coefficients)
        tried: dict[float, tuple[float, dict[str, Any]]] = {}

        def attempt(lam: float, branch: int = branch, base: list[float] = base,
                    tried: dict[float, tuple[float, dict[str, Any]]] = tried) -> float:
            if lam not in tried:
                candidate = [(1.0 - lam) * c for c in base]
                candidate[branch] += lam
                state = merge(states, candidate)
                score = float(evaluate(state))
                evaluations.append((branch, lam, score))
                tried[lam] = (score, state)
            return _as_comparable(tried[lam][0])

        def best_lambda(tried: dict[float, tuple[float, dict[str, Any]]] = tried) -> float:
            return min(tried, key=lambda x: (-_as_comparable(tried[x][0]), x))  # ties: the smaller λ

        if binary_steps is None:
            for lam in grid:
                attempt(lam)
        else:
            for lam in (0.0, 0.5, 1.0):
                attempt(lam)
            centre, half = best_lambda(), 0.5
            for _ in range(binary_steps):
                half /= 2
                for lam in (centre - half, centre + half):
                    if 0.0 <= lam <= 1.0:
                        attempt(lam)
                centre = best_lambda()
        lam = best_lambda()
        best_score, best_state = tried[lam]
        coefficients = [(1.0 - lam) * c for c in base]
        coefficients[branch] += lam
    return MergeSearch(list(coefficients), list(coefficients), order, best_score, best_state, evaluations)
