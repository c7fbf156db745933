"""The statistics behind transfer verdicts: Student's t, paired and Welch t-tests with an exact-tie rule,
multiple-comparison corrections (Holm, Benjamini–Hochberg) and a "how many seeds would be needed" estimate.

Pure Python (no scipy at run time): the Student-t tail is the regularised incomplete beta function
(continued fraction, modified Lentz's method; Numerical Recipes §6.4), its quantile a bisection on the tail.

**Degenerate samples never make significance (our choice).** A t statistic divides by the sample spread; with
zero spread it is ``±inf`` and any two constant samples (e.g. every run predicting the majority class) would
be "significant". Here:

* *exact tie* — identical values on both sides (paired: every difference is 0) → ``p = 1``;
* *zero variance* — the paired differences are all equal (but not 0), or both unpaired samples are constant
  → no test is possible: ``p = nan`` and the verdict is "no significant difference" with the reason
  ``"zero variance"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Correction",
    "CORRECTIONS",
    "TestResult",
    "student_t_sf",
    "t_quantile",
    "welch_t_test",
    "paired_t_test",
    "two_sample_test",
    "adjust_p_values",
    "seeds_needed",
    "confidence_interval",
    "mean",
    "sample_std",
]

Correction = Literal["holm", "bh", "none"]
CORRECTIONS: dict[str, str] = {
    "holm": "Holm–Bonferroni (family-wise error rate)",
    "bh": "Benjamini–Hochberg (false discovery rate)",
    "none": "no multiple-comparison correction",
}


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; nan when empty."""
    return sum(values) / len(values) if values else math.nan


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (n − 1); nan for fewer than 2 values."""
    if len(values) < 2:
        return math.nan
    centre = mean(values)
    return math.sqrt(sum((v - centre) ** 2 for v in values) / (len(values) - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
            -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return result


def _incomplete_beta(a: float, b: float, x: float, y: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)``, given ``x`` and ``y = 1 − x`` each computed accurately."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_x = math.log1p(-y) if x > 0.5 else math.log(x)
    log_y = math.log1p(-x) if y > 0.5 else math.log(y)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * log_x + b * log_y
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def student_t_sf(t: float, df: float) -> float:
    """Upper tail ``P(T > t)`` of Student's t with ``df`` (real, > 0) degrees of freedom."""
    if df <= 0 or math.isnan(t):
        raise ValueError(f"need df > 0 and a number t, got t={t}, df={df}")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_quantile(probability: float, df: float) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom (bisection on the tail).

    Accurate to ~1e-12 relative; ``probability`` in (0, 1), ``df > 0``.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    if probability < 0.5:
        return -t_quantile(1.0 - probability, df)
    tail = 1.0 - probability
    low, high = 0.0, 1.0
    while student_t_sf(high, df) > tail:  # bracket: the tail falls below the target somewhere
        low, high = high, high * 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if student_t_sf(mid, df) > tail:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


def _constant(values: Sequence[float]) -> bool:
    """All values equal up to rounding (``max − min ≤ 1e-12 · max |v|``): a sample with zero variance."""
    low, high = min(values), max(values)
    return high - low <= 1e-12 * max(abs(low), abs(high))


@dataclass(frozen=True)
class TestResult:
    """One two-sample comparison.

    Attributes:
        test: ``"paired t"``, ``"Welch t"``, ``"exact tie"`` or ``"zero variance"`` (no test possible).
        statistic: the t statistic of ``a − b`` (0 for a tie, nan when no test was possible).
        df: degrees of freedom (nan when no t-test was run).
        p_value: two-sided p-value (1 for an exact tie, nan when no test was possible).
        difference: mean of ``a`` minus mean of ``b`` (paired: mean difference).
        effect_size: standardised effect, ``difference / sd`` (paired: Cohen's d_z; Welch: over the pooled
            root-mean variance); nan when undefined.
        n: number of pairs (paired) or ``min(len(a), len(b))`` (Welch).
    """

    test: str
    statistic: float
    df: float
    p_value: float
    difference: float
    effect_size: float
    n: int


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch's two-sample t-test. Returns ``(t, df, two-sided p)``; needs ≥ 2 values on each side.

    Degenerate samples (both variances zero): ``t = 0, p = 1`` when the means are equal (an exact tie),
    ``t = nan, p = nan`` otherwise (zero variance: no test; see the module docstring).
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's t-test needs at least 2 values per group, got {len(a)} and {len(b)}")
    mean_a, mean_b = mean(a), mean(b)
    if _constant(a) and _constant(b):
        return (0.0, math.nan, 1.0) if _constant([*a, *b]) else (math.nan, math.nan, math.nan)
    var_a, var_b = sample_std(a) ** 2 / len(a), sample_std(b) ** 2 / len(b)
    se2 = var_a + var_b
    t = (mean_a - mean_b) / math.sqrt(se2)
    df = se2**2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    return t, df, min(1.0, 2.0 * student_t_sf(abs(t), df))


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Paired t-test of ``a[i] − b[i]``. Returns ``(t, df, two-sided p)``; needs ≥ 2 pairs.

    All differences 0: ``(0, nan, 1)`` (exact tie); all differences equal but not 0: ``(nan, nan, nan)``.
    """
    if len(a) != len(b):
        raise ValueError(f"a paired test needs samples of equal length, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {len(a)}")
    if all(x == y for x, y in zip(a, b, strict=True)):
        return 0.0, math.nan, 1.0
    differences = [x - y for x, y in zip(a, b, strict=True)]
    scale = max(abs(v) for v in [*a, *b])
    if max(differences) - min(differences) <= 1e-12 * scale:
        return math.nan, math.nan, math.nan
    spread = sample_std(differences)
    centre = mean(differences)
    df = len(differences) - 1
    t = centre / (spread / math.sqrt(len(differences)))
    return t, float(df), min(1.0, 2.0 * student_t_sf(abs(t), df))


def two_sample_test(a: Sequence[float], b: Sequence[float], *, paired: bool) -> TestResult:
    """The paired (``a[i]`` with ``b[i]``) or the Welch test, named, and safe on degenerate samples."""
    if paired:
        t, df, p = paired_t_test(a, b)
        differences = [x - y for x, y in zip(a, b, strict=True)]
        difference, spread = mean(differences), sample_std(differences)
        n = len(differences)
        name = "paired t"
    else:
        t, df, p = welch_t_test(a, b)
        difference = mean(a) - mean(b)
        spread = math.sqrt((sample_std(a) ** 2 + sample_std(b) ** 2) / 2.0)
        n = min(len(a), len(b))
        name = "Welch t"
    if math.isnan(p):
        name = "zero variance"
    elif p == 1.0 and t == 0.0 and math.isnan(df):
        name = "exact tie"
    effect = difference / spread if spread > 0 else math.nan
    return TestResult(name, t, df, p, difference, effect, n)


def adjust_p_values(p_values: Sequence[float], correction: Correction) -> list[float]:
    """Adjusted p-values of one family of tests; nan entries (no test) stay nan and are not counted.

    ``"holm"``: Holm (1979) step-down, ``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j))``, controls the
    family-wise error rate. ``"bh"``: Benjamini & Hochberg (1995) step-up,
    ``p̃_(i) = min_{j ≥ i} min(1, m p_(j) / j)``, controls the false discovery rate. ``"none"``: unchanged.
    ``m`` is the number of finite p-values. Reject where ``p̃ < alpha``.
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {sorted(CORRECTIONS)}, got {correction!r}")
    out = [math.nan] * len(p_values)
    finite = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m = len(finite)
    if correction == "none":
        for p, i in finite:
            out[i] = p
    elif correction == "holm":
        running = 0.0
        for rank, (p, i) in enumerate(finite):
            running = max(running, min(1.0, (m - rank) * p))
            out[i] = running
    else:
        running = 1.0
        for rank in range(m - 1, -1, -1):
            p, i = finite[rank]
            running = min(running, min(1.0, m * p / (rank + 1)))
            out[i] = running
    return out


def seeds_needed(effect_size: float, alpha: float, *, limit: int = 50) -> int | None:
    """Pairs needed for a paired t-test to reach ``p < alpha`` if the observed effect were the true one.

    The smallest ``n ≥ 2`` with ``|d_z| √n > t_{1 − alpha/2, n − 1}`` (the test at the observed standardised
    effect ``d_z``; about 50 % power, so a lower bound — our rule of thumb). ``None`` when the effect is 0 or
    undefined, or more than ``limit`` seeds would be needed (the effect is too small to chase with seeds).
    """
    if not math.isfinite(effect_size) or effect_size == 0.0:
        return None
    size = abs(effect_size)
    for n in range(2, limit + 1):
        if size * math.sqrt(n) > t_quantile(1.0 - alpha / 2.0, n - 1):
            return n
    return None


def confidence_interval(centre: float, std: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided Student-t interval of a mean over ``n`` seeds: ``centre ± t_{(1+level)/2, n−1} · std / √n``.

    ``(nan, nan)`` with fewer than 2 seeds or a non-finite mean/std (no interval can be given).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n < 2 or not math.isfinite(centre) or not math.isfinite(std):
        return math.nan, math.nan
    half = t_quantile(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)
    return centre - half, centre + half
