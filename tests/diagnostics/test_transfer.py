"""Δm, relative changes and transfer verdicts, checked against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from taskbalance.data.tasks import Task
from taskbalance.diagnostics import (
    DELTA_M_CONVENTION,
    compare_study,
    compare_to_baselines,
    delta_m,
    relative_change,
    student_t_sf,
    verdict,
    welch_t_test,
)
from taskbalance.diagnostics.stats import adjust_p_values, paired_t_test, seeds_needed, t_quantile
from taskbalance.diagnostics.transfer import at_trivial_level

MAE = Task("energy", "regression")  # lower is better
ACC = Task("label", "binary")  # higher is better
AUX = Task("helper", "regression", role="auxiliary")


def test_relative_change_is_positive_when_worse_in_either_direction():
    assert relative_change(2.0, 4.0, higher_is_better=False) == -50.0  # error halved: better
    assert relative_change(6.0, 4.0, higher_is_better=False) == 50.0
    assert relative_change(0.7, 0.8, higher_is_better=True) == pytest.approx(12.5)  # accuracy fell: worse
    assert relative_change(0.9, 0.8, higher_is_better=True) == pytest.approx(-12.5)
    assert math.isnan(relative_change(1.0, 0.0, higher_is_better=False))


def test_delta_m_averages_signed_relative_changes_lower_is_better():
    # energy: (2 - 4) / 4 = -50 %; label: -(0.7 - 0.8) / 0.8 = +12.5 %  ->  mean -18.75 %
    value = delta_m({"energy": 2.0, "label": 0.7}, {"energy": 4.0, "label": 0.8}, [MAE, ACC])
    assert value == pytest.approx(-18.75)
    assert "lower is better" in DELTA_M_CONVENTION


def test_auxiliary_tasks_are_left_out_unless_asked():
    metrics = {"energy": 2.0, "helper": 100.0}
    base = {"energy": 4.0, "helper": 1.0}
    assert delta_m(metrics, base, [MAE, AUX]) == pytest.approx(-50.0)
    assert delta_m(metrics, base, [MAE, AUX], targets_only=False) == pytest.approx((-50.0 + 9900.0) / 2)
    with pytest.raises(ValueError, match="every task is auxiliary"):
        delta_m(metrics, base, [AUX])
    with pytest.raises(KeyError, match="energy"):
        delta_m({}, base, [MAE])


def test_student_t_tail_matches_closed_forms():
    for t in (-3.0, -0.5, 0.0, 0.3, 1.0, 4.0, 25.0):
        assert student_t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert student_t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert student_t_sf(1.959963984540054, 1e7) == pytest.approx(0.025, abs=1e-6)  # normal limit
    assert student_t_sf(math.inf, 3) == 0.0


@settings(max_examples=60, deadline=None)
@given(st.floats(-30, 30), st.floats(0.5, 300))
def test_student_t_tail_agrees_with_scipy(t, df):
    assert student_t_sf(t, df) == pytest.approx(float(scipy.stats.t.sf(t, df)), rel=1e-8, abs=1e-13)


def test_welch_statistic_by_hand():
    # means 2 and 5, sample variances 1 and 1, n = 3: se^2 = 2/3, t = -3 / sqrt(2/3),
    # df = (2/3)^2 / (2 (1/3)^2 / 2) = 4
    t, df, p = welch_t_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert t == pytest.approx(-3.0 / math.sqrt(2.0 / 3.0))
    assert df == pytest.approx(4.0)
    assert p == pytest.approx(2 * student_t_sf(abs(t), 4.0))
    reference = scipy.stats.ttest_ind([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], equal_var=False)
    assert p == pytest.approx(float(reference.pvalue), rel=1e-9)


def test_welch_unequal_sizes_and_variances_agree_with_scipy():
    a, b = [0.31, 0.35, 0.29, 0.40], [0.52, 0.61]
    t, df, p = welch_t_test(a, b)
    reference = scipy.stats.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(float(reference.statistic))
    assert p == pytest.approx(float(reference.pvalue), rel=1e-9)


def test_verdicts_follow_the_metric_direction():
    low, high = [1.0, 1.1, 0.9], [2.0, 2.1, 1.9]
    assert verdict(low, high, higher_is_better=False)[0] == "positive transfer"  # smaller error than STL
    assert verdict(high, low, higher_is_better=False)[0] == "negative transfer"
    assert verdict(low, high, higher_is_better=True)[0] == "negative transfer"  # lower accuracy than STL
    assert verdict([1.0, 3.0], [1.5, 2.5], higher_is_better=False)[0] == "no significant difference"
    assert verdict([1.0], [2.0, 2.1], higher_is_better=False)[0] == "insufficient seeds"
    assert verdict([1.0, 1.0], [1.0, 1.0], higher_is_better=False) == ("no significant difference", 1.0)
    with pytest.raises(ValueError, match="alpha"):
        verdict(low, high, False, alpha=1.5)


def test_verdict_threshold_is_the_95_percent_level():
    # Two seeds each, baseline fixed; shift the method until p crosses 0.05.
    base = [1.0, 1.2]
    shifts = [x / 100 for x in range(1, 200)]
    verdicts = [verdict([1.0 + s, 1.2 + s], base, False) for s in shifts]
    for decision, p in verdicts:
        assert (decision == "negative transfer") == (p < 0.05)
    assert {d for d, _ in verdicts} == {"no significant difference", "negative transfer"}


def test_compare_to_baselines_gives_delta_m_over_seeds_and_verdicts():
    runs = [{"energy": 2.0, "label": 0.8, "helper": 5.0}, {"energy": 3.0, "label": 0.8, "helper": 5.0}]
    baselines = {"energy": [4.0, 4.0], "label": [0.8, 0.8], "helper": [1.0, 1.0]}
    summary = compare_to_baselines(runs, baselines, [MAE, ACC, AUX])
    # seed 1: (-50 + 0) / 2 = -25; seed 2: (-25 + 0) / 2 = -12.5
    assert summary.delta_m == pytest.approx(-18.75)
    assert summary.delta_m_std == pytest.approx(math.sqrt(2 * 6.25**2))
    energy = summary.tasks["energy"]
    assert energy.mean == 2.5 and energy.relative_change == pytest.approx(-37.5)
    assert energy.verdict == "no significant difference"  # 2 and 3 vs 4 and 4: t = -3, df = 1
    assert summary.tasks["label"].verdict == "no significant difference"
    assert summary.tasks["helper"].verdict is None and summary.tasks["helper"].relative_change == 400.0
    assert summary.verdict_counts() == {"no significant difference": 2}
    with pytest.raises(KeyError, match="label"):
        compare_to_baselines(runs, {"energy": [4.0]}, [MAE, ACC])


def test_one_seed_gives_a_delta_m_without_spread_and_no_verdict():
    summary = compare_to_baselines([{"energy": 3.0}], {"energy": [4.0]}, [MAE])
    assert summary.delta_m == pytest.approx(-25.0)
    assert math.isnan(summary.delta_m_std)
    assert summary.tasks["energy"].verdict == "insufficient seeds"


# ---------------------------------------------------------------------------------------------- rules
def test_zero_variance_samples_are_never_significant():
    # The case: every run predicts the majority class, 0.8091 ± 0 vs 0.8133 ± 0 was called NEG.
    decision, p = verdict([0.8091] * 5, [0.8133] * 5, higher_is_better=True)
    assert decision == "no significant difference" and math.isnan(p)
    # paired, every seed worse by exactly the same amount: no spread, no test
    decision, p = verdict([1.0, 2.0, 3.0], [1.5, 2.5, 3.5], higher_is_better=False, paired=True)
    assert decision == "no significant difference" and math.isnan(p)


def test_identical_samples_are_an_exact_tie():
    assert verdict([0.7, 0.8, 0.9], [0.7, 0.8, 0.9], True, paired=True) == ("no significant difference", 1.0)
    assert verdict([1.0, 1.0], [1.0, 1.0], higher_is_better=False) == ("no significant difference", 1.0)
    summary = compare_to_baselines({0: {"label": 0.5}, 1: {"label": 0.5}}, {"label": {0: 0.5, 1: 0.5}}, [ACC])
    assert summary.tasks["label"].test == "exact tie" and summary.tasks["label"].p_adjusted == 1.0


def test_paired_t_test_agrees_with_scipy():
    a, b = [0.31, 0.35, 0.29, 0.40, 0.33], [0.30, 0.31, 0.30, 0.36, 0.29]
    t, df, p = paired_t_test(a, b)
    reference = scipy.stats.ttest_rel(a, b)
    assert t == pytest.approx(float(reference.statistic)) and df == 4
    assert p == pytest.approx(float(reference.pvalue), rel=1e-9)


def test_holm_and_benjamini_hochberg_by_hand():
    p = [0.01, 0.04, 0.03, math.nan, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 (m = 4) -> 0.02, 0.03, max(0.03, 0.06), max(0.06, 0.04)
    assert adjust_p_values(p, "holm")[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert adjust_p_values(p, "holm")[4] == pytest.approx(0.02) and math.isnan(adjust_p_values(p, "holm")[3])
    # BH: m p / rank = 0.02, 0.02, 0.04, 0.04 -> running minimum from the top
    assert adjust_p_values(p, "bh")[:3] == pytest.approx([0.02, 0.04, 0.04])
    assert adjust_p_values(p, "none")[:3] == p[:3]
    with pytest.raises(ValueError, match="holm"):
        adjust_p_values(p, "bonferroni")  # type: ignore[arg-type]


def _noisy(offset: float, seeds: range) -> dict[int, float]:
    jitter = [0.0, 0.03, -0.02, 0.01, -0.015, 0.02, -0.01, 0.005, -0.025, 0.012]
    return {s: 3.0 + offset + jitter[s % 10] + 0.004 * (s % 3) for s in seeds}


def test_the_correction_over_methods_and_tasks_is_applied_and_named():
    seeds = range(4)
    base = _noisy(0.0, seeds)
    worse = {s: {"energy": v + 0.05 + 0.01 * (s % 2)} for s, v in base.items()}  # p ≈ 0.0004 uncorrected
    single = compare_study({"m": worse}, {"energy": base}, [MAE], correction="none")
    assert single.methods["m"].tasks["energy"].verdict == "negative transfer"
    p = single.methods["m"].tasks["energy"].p_value
    many = {
        f"m{i}": worse if i == 0 else {s: {"energy": v + 0.02 * (-1) ** (s + i)} for s, v in base.items()}
        for i in range(40)
    }
    corrected = compare_study(many, {"energy": base}, [MAE], correction="holm")
    entry = corrected.methods["m0"].tasks["energy"]
    assert entry.p_value == pytest.approx(p) and entry.p_adjusted == pytest.approx(min(1.0, 40 * p))
    assert corrected.family_size == 40
    assert "Holm" in corrected.correction_text and "40 test(s)" in corrected.correction_text
    bh = compare_study(many, {"energy": base}, [MAE], correction="bh")
    assert "Benjamini–Hochberg" in bh.correction_text
    assert bh.methods["m0"].tasks["energy"].p_adjusted <= entry.p_adjusted


def test_adding_baseline_seeds_never_changes_a_verdict_silently():
    base = _noisy(0.0, range(5))
    method = {s: {"energy": base[s] + 0.04 + 0.004 * s} for s in (0, 1)}
    few = compare_to_baselines(method, {"energy": {s: base[s] for s in (0, 1)}}, [MAE])
    more = compare_to_baselines(method, {"energy": base}, [MAE])
    assert more.tasks["energy"].verdict == few.tasks["energy"].verdict
    assert more.tasks["energy"].p_value == pytest.approx(few.tasks["energy"].p_value)
    assert more.delta_m == pytest.approx(few.delta_m)
    assert few.seed_note == "" and more.paired and more.matched_seeds == [0, 1]
    assert "baseline seeds {2, 3, 4}" in more.seed_note and "matched seeds {0, 1}" in more.seed_note


def test_a_task_without_a_finite_baseline_does_not_unpair_the_other_tasks():
    auroc = Task("rare", "binary", metric="auroc")  # AUROC is nan when the test split holds one class
    nan = float("nan")
    method = {s: {"rare": nan, "energy": 1.0 + 0.01 * s} for s in range(3)}
    baselines = {"rare": {s: nan for s in range(3)}, "energy": {s: 1.2 + 0.012 * s for s in range(3)}}
    summary = compare_to_baselines(method, baselines, [auroc, MAE])
    assert summary.paired and summary.matched_seeds == [0, 1, 2]
    assert summary.tasks["energy"].test == "paired t"
    assert summary.tasks["rare"].verdict == "insufficient seeds"
    assert "no finite single-task value for rare" in summary.seed_note
    assert "no seed in common" not in summary.seed_note


def test_no_common_seed_falls_back_to_welch_with_a_note():
    summary = compare_to_baselines(
        {10: {"energy": 2.0}, 11: {"energy": 2.2}}, {"energy": {0: 4.0, 1: 4.1}}, [MAE], correction="none"
    )
    assert not summary.paired and summary.tasks["energy"].test == "Welch t"
    assert "no seed in common" in summary.seed_note
    unseeded = compare_to_baselines([{"energy": 2.0}, {"energy": 2.2}], {"energy": [4.0, 4.1]}, [MAE])
    assert "seeds not given" in unseeded.seed_note


def test_a_run_at_the_trivial_level_is_flagged_never_positive_transfer():
    auroc = Task("label", "binary", metric="auroc")
    assert at_trivial_level(0.503, 0.5, True) and not at_trivial_level(0.52, 0.5, True)
    assert at_trivial_level(0.995, 1.0, False) and not at_trivial_level(
        0.9, 1.0, False
    )  # MAE vs mean predictor
    # The baseline is worse than chance; the collapsed method sits at 0.5 and would be "positive transfer".
    method = {s: {"label": 0.5 + 0.001 * s} for s in range(4)}
    base = {s: 0.40 + 0.01 * s for s in range(4)}
    plain = compare_to_baselines(method, {"label": base}, [auroc])
    assert plain.tasks["label"].verdict == "positive transfer"
    flagged = compare_to_baselines(method, {"label": base}, [auroc], trivial={"label": 0.5})
    assert flagged.tasks["label"].verdict == "at trivial level" and flagged.tasks["label"].at_trivial_level
    assert flagged.verdict_counts() == {"at trivial level": 1}


def test_seeds_needed_reaches_significance_at_the_observed_effect():
    n = seeds_needed(1.0, 0.05)
    assert n is not None and 1.0 * math.sqrt(n) > t_quantile(0.975, n - 1)
    assert 1.0 * math.sqrt(n - 1) <= t_quantile(0.975, n - 2)
    assert seeds_needed(0.0, 0.05) is None and seeds_needed(0.01, 0.05) is None  # would need > 50
    base = _noisy(0.0, range(3))
    method = {s: {"energy": base[s] + 0.01 + 0.01 * (s == 1)} for s in range(3)}
    entry = compare_to_baselines(method, {"energy": base}, [MAE]).tasks["energy"]
    # differences 0.01, 0.02, 0.01: d_z = 2.31, t = 4.0 with 2 df (p = 0.057); 4 pairs give t = 4.6 > 3.18
    assert entry.verdict == "no significant difference" and entry.seeds_needed == 4
