"""The seeds suite's verdict rule and tables, on fabricated measurements (no training here)."""

from __future__ import annotations

import math

import pytest

from taskbalance.bench.claims import (
    FAILED,
    HOLDS,
    MIXED,
    NOT_HOLDS,
    NOT_SHOWN,
    SINGLE_TASK,
    Claim,
    GroupMeasure,
    Interval,
    claim_rows,
    claims_table,
    format_interval,
    group_table,
    judge,
    paired_interval,
    summarise_claim,
    summary_table,
)
from taskbalance.bench.seeds import GROUPS, QUICK, parse_suite_name


def ci(low: float, high: float, n: int = 3) -> Interval:
    return Interval((low + high) / 2, low, high, n)


# ---------------------------------------------------------------------------------------------- the rule
def test_a_better_claim_holds_only_when_the_whole_interval_is_below_zero():
    assert judge("better", ci(-5.0, -0.1)) == HOLDS
    assert judge("better", ci(-5.0, 0.0)) == NOT_SHOWN  # touching zero is not "better"
    assert judge("better", ci(-5.0, 3.0)) == NOT_SHOWN
    assert judge("better", ci(0.2, 3.0)) == NOT_HOLDS


def test_a_no_worse_claim_holds_within_the_margin_and_fails_only_when_shown_worse():
    assert judge("no_worse", ci(-1.0, 1.9), margin=2.0) == HOLDS  # non-inferior within 2 points
    assert judge("no_worse", ci(0.5, 1.9), margin=2.0) == HOLDS  # worse, but by less than the margin
    assert judge("no_worse", ci(-1.0, 2.5), margin=2.0) == NOT_SHOWN
    assert judge("no_worse", ci(0.1, 8.0), margin=2.0) == NOT_HOLDS
    assert judge("no_worse", ci(-1.0, 0.5), margin=0.0) == NOT_SHOWN


def test_no_interval_means_not_shown_whatever_the_mean():
    assert judge("better", Interval(-50.0, math.nan, math.nan, 1)) == NOT_SHOWN
    assert judge("no_worse", Interval(math.nan, math.nan, math.nan, 0)) == NOT_SHOWN


def test_a_claim_rejects_unknown_kinds_and_empty_sides():
    with pytest.raises(ValueError, match="kind"):
        Claim("X", "s", "equal", ("a",), ("b",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        Claim("X", "s", "better", (), ("b",))
    with pytest.raises(ValueError, match="margin"):
        Claim("X", "s", "no_worse", ("a",), ("b",), margin=-1.0)


# ---------------------------------------------------------------------------------------------- intervals
def test_the_paired_interval_uses_the_seeds_both_sides_have_and_student_t():
    mine = {0: 3.0, 1: 4.0, 2: 5.0, 7: 100.0}
    theirs = {0: 2.0, 1: 2.0, 2: 2.0}
    interval = paired_interval(mine, theirs)  # differences 1, 2, 3: mean 2, std 1, t(0.975, 2) = 4.303
    assert interval.n == 3 and interval.mean == pytest.approx(2.0)
    assert interval.low == pytest.approx(2.0 - 4.3027 / math.sqrt(3), abs=1e-3)
    assert interval.high == pytest.approx(2.0 + 4.3027 / math.sqrt(3), abs=1e-3)


def test_against_single_task_the_paired_difference_is_the_delta_m_itself():
    interval = paired_interval({0: -1.0, 1: -3.0}, None)
    assert interval.mean == pytest.approx(-2.0) and interval.n == 2


def test_non_finite_values_are_left_out_and_one_value_has_no_interval():
    interval = paired_interval({0: 1.0, 1: math.nan}, {0: 0.0, 1: 0.0})
    assert interval.n == 1 and not interval.has_ci
    assert format_interval(interval) == "+1.0 (1 seed)"
    assert format_interval(paired_interval({}, None)) == "n/a"


# ---------------------------------------------------------------------------------------------- rows
BETTER = Claim("M", "beats EW", "better", ("m good", "m bad", "m noisy", "m broken"), ("ew",))
NO_WORSE = Claim("M", "no worse than single-task", "no_worse", ("m good",), (SINGLE_TASK,), margin=2.0)


def measure() -> GroupMeasure:
    ew = {0: 10.0, 1: 12.0, 2: 11.0}
    return GroupMeasure(
        "g", "fabricated", ["ew", "m good", "m bad", "m noisy", "m broken"],
        {
            "ew": ew,
            "m good": {s: v - 5.0 + 0.1 * s for s, v in ew.items()},
            "m bad": {s: v + 5.0 + 0.1 * s for s, v in ew.items()},
            "m noisy": {0: 0.0, 1: 25.0, 2: 8.0},
        },
        failed={"m broken": 3},
        claims=(BETTER, NO_WORSE),
    )


def test_claim_rows_judge_each_variant_against_each_comparator():
    rows = claim_rows(measure())
    verdicts = {(r.claim.statement, r.variant, r.comparator): r.verdict for r in rows}
    assert verdicts == {
        ("beats EW", "m good", "ew"): HOLDS,
        ("beats EW", "m bad", "ew"): NOT_HOLDS,
        ("beats EW", "m noisy", "ew"): NOT_SHOWN,
        ("beats EW", "m broken", "ew"): FAILED,
        # m good's Δm is +5 to +7 against single-task: shown worse, beyond the margin
        ("no worse than single-task", "m good", SINGLE_TASK): NOT_HOLDS,
    }
    good = next(r for r in rows if r.variant == "m good" and r.comparator == "ew")
    assert good.paired.mean == pytest.approx(-4.9) and good.delta_m.mean == pytest.approx(6.1)


def test_a_claim_naming_a_variant_the_group_lacks_is_an_error():
    bad = GroupMeasure("g", "t", ["ew"], {"ew": {0: 1.0}}, claims=(BETTER,))
    with pytest.raises(KeyError, match="m good"):
        claim_rows(bad)


def test_summarising_a_claim_over_rows():
    assert summarise_claim([HOLDS, NOT_SHOWN]) == HOLDS
    assert summarise_claim([NOT_HOLDS, NOT_SHOWN]) == NOT_HOLDS
    assert summarise_claim([FAILED, NOT_SHOWN]) == NOT_HOLDS
    assert summarise_claim([HOLDS, NOT_HOLDS]) == MIXED
    assert summarise_claim([NOT_SHOWN, NOT_SHOWN]) == NOT_SHOWN
    assert summarise_claim([]) == NOT_SHOWN


# ---------------------------------------------------------------------------------------------- tables
def test_the_tables_state_delta_m_the_paired_interval_and_the_verdict():
    rows = claim_rows(measure())
    table = claims_table(rows)
    good = next(line for line in table if "| m good | ew |" in line)
    assert "+6.1 [" in good and "-4.9 [" in good and "**holds**" in good
    broken = next(line for line in table if "| m broken |" in line)
    assert "n/a (3 failed)" in broken and f"**{FAILED}**" in broken
    summary = summary_table(rows)
    assert len(summary) == 4  # header, rule, two claims
    counts = "1 holds, 1 not shown, 1 does not hold, 1 runs failed"
    assert f"| M | beats EW | **{MIXED}** | {counts} | g |" in summary
    assert f"**{NOT_HOLDS}**" in summary[3]


def test_the_group_table_lists_every_variant_in_order_with_failures():
    lines = group_table(measure())
    assert lines[0].startswith("### g: fabricated")
    body = lines[4:]
    names = [line.split(" | ")[0] for line in body]
    assert names == ["| ew", "| m good", "| m bad", "| m noisy", "| m broken"]
    assert body[0].endswith("| — |") and "(3 run(s) failed)" in body[4]


def test_table_cells_escape_the_column_separator():
    claim = Claim("A|B", "beats | EW", "better", ("x",), ("ew",))
    rows = claim_rows(GroupMeasure("g", "t", ["ew", "x"], {"ew": {0: 1.0, 1: 2.0}, "x": {0: 0.0, 1: 0.5}},
                                   claims=(claim,)))
    line = claims_table(rows)[2]
    assert "A\\|B" in line and "beats \\| EW" in line


# ---------------------------------------------------------------------------------------------- the suite
def test_every_claim_names_variants_of_its_group():
    for group in GROUPS.values():
        labels = {e.label for e in group.methods}
        assert group.comparator in labels, group.name
        for claim in group.claims:
            assert set(claim.variants) <= labels, (group.name, claim.statement)
            assert {c for c in claim.comparators if c != SINGLE_TASK} <= labels, (group.name, claim.statement)


def test_runs_shared_between_groups_carry_the_same_label():
    """Groups share one store: the same run (protocol, method, options) must have one label everywhere."""
    seen: dict[tuple[str, str, str], str] = {}
    for group in GROUPS.values():
        protocol = repr(group.protocol)
        for entry in group.methods:
            key = (protocol, entry.method, repr(sorted(entry.hyperparameters.items())))
            assert seen.setdefault(key, entry.label) == entry.label, (group.name, entry.label)


def test_the_quick_set_covers_every_seed_method_and_the_suite_name_parses():
    assert set(QUICK) <= set(GROUPS)
    methods = {c.method for name in QUICK for c in GROUPS[name].claims}
    assert methods == {"EMA", "BMTL", "tensioners", "HydaLearn", "ForkMerge"}
    assert parse_suite_name("seeds") == list(QUICK)
    assert parse_suite_name("seeds: aux, bmtl ") == ["aux", "bmtl"]
    assert parse_suite_name("demo") is None
    with pytest.raises(ValueError, match="unknown seeds group.*known: ema"):
        parse_suite_name("seeds:nope")
