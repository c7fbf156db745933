"""Published Δm beside ours: the shipped table, Spearman's ρ, the report section of a published protocol."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import scipy.stats
from test_report import baselines, run, store_with

from taskbalance.report import write_report
from taskbalance.report.published import (
    compare,
    load_published,
    published_line,
    published_table_for,
    spearman_rho,
)

PUBLISHED_QM9 = {
    "ew": 177.6, "si": 77.8, "rlw": 203.8, "dwa": 175.3, "uw": 108.0, "mgda": 120.5, "pcgrad": 125.7,
    "cagrad": 112.8, "imtl-g": 77.2, "nash-mtl": 62.0, "famo": 58.5,
}


def test_the_shipped_qm9_table_holds_the_papers_values_with_their_sources() -> None:
    table = load_published("qm9")
    assert {v.method: v.delta_m for v in table.values} == PUBLISHED_QM9
    assert table.protocol["dataset"] == "qm9_graph" and table.protocol["arch"] == "mpnn"
    assert {v.paper_label for v in table.values} >= {"LS", "SI", "IMTL-G", "Nash-MTL", "FAMO"}
    for value in table.values:
        nash = "Navon et al." in value.citation and "Table 2" in value.citation
        assert nash or "Liu et al." in value.citation
        assert value.confirmed == bool(value.confirmation)
    assert table.value("famo") is not None and "FAMO" in table.value("famo").citation  # type: ignore[union-attr]
    with pytest.raises(KeyError, match="shipped: qm9"):
        load_published("nyuv2")


@pytest.mark.parametrize(
    "x, y",
    [
        ([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]),
        ([3.0, 1.0, 2.0], [1.0, 3.0, 2.0]),
        ([1, 1, 2, 3, 3, 3], [2, 1, 4, 4, 3, 9]),  # ties in both
        ([0.3, -1.2, 5.5, 2.0, 2.0, 7.1, -3.0], [10, 20, 30, 40, 50, 60, 70]),
    ],
)
def test_spearman_rho_equals_scipy(x: list[float], y: list[float]) -> None:
    assert spearman_rho(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)


def test_spearman_rho_is_undefined_for_constant_short_or_non_finite_input() -> None:
    assert math.isnan(spearman_rho([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman_rho([1], [2]))
    assert math.isnan(spearman_rho([1, math.nan, 3], [1, 2, 3]))
    with pytest.raises(ValueError, match="equal length"):
        spearman_rho([1, 2], [1, 2, 3])


def test_compare_matches_methods_by_label_and_needs_three_for_rho() -> None:
    table = load_published("qm9")
    ours = {"ew": 10.0, "uw": 5.0, "famo": -1.0, "tensioners": 3.0}
    comparison = compare(table, ours)
    assert comparison.matched == 3
    assert comparison.rho == pytest.approx(1.0)  # ew > uw > famo in both
    assert math.isnan(compare(table, {"ew": 1.0, "uw": 2.0}).rho)


def _paper_study(directory: Path, deltas_from: dict[str, float]) -> Path:
    """A qm9_graph + mpnn store: baselines a=1.0/1.2 (mean 1.1), c=0.8/0.9, methods at chosen metrics."""

    def paper(result):
        return replace(result, spec=replace(result.spec, dataset="qm9_graph", arch="mpnn"))

    results = [paper(r) for r in baselines()]
    for label, a in deltas_from.items():
        results += [paper(run(label, s, {"a": a, "c": 0.85})) for s in (0, 1)]
    return store_with(directory, results)


def test_report_of_a_published_protocol_study_shows_the_published_column_and_rho(tmp_path: Path) -> None:
    metrics = {"ew": 2.0, "uw": 1.5, "nash-mtl": 1.2, "famo": 1.3}  # ew worst, nash-mtl best
    files = write_report(_paper_study(tmp_path, metrics), plots=False)
    text = files.markdown.read_text()
    assert "Published numbers beside ours" in text
    assert "published Δm%" in text and "177.6" in text and "58.5" in text
    assert "as reported by Navon et al." in text
    expected = scipy.stats.spearmanr([2.0, 1.5, 1.2, 1.3], [177.6, 108.0, 62.0, 58.5]).statistic
    assert f"over the 4 methods in both: {expected:+.2f}" in text
    assert "departs from the published protocol (2 epoch(s) instead of 300; 2 seed(s) instead of 3)" in text
    assert "Published numbers beside ours" in files.html.read_text()


def test_report_of_another_study_has_no_published_section(tmp_path: Path) -> None:
    results = baselines() + [run("ew", s, {"a": 1.0, "c": 0.85}) for s in (0, 1)]
    text = write_report(store_with(tmp_path, results), plots=False).markdown.read_text()
    assert "Published numbers" not in text and "Spearman" not in text


def test_terminal_line_only_for_a_published_protocol() -> None:
    assert published_table_for({"dataset": "qm9", "arch": "qm9"}) is None
    assert published_line({"dataset": "qm9", "arch": "qm9"}, {"ew": 1.0}) is None
    line = published_line(
        {"dataset": "qm9_graph", "arch": "mpnn", "train": {"epochs": 300}},
        {"ew": 3.0, "uw": 2.0, "famo": 1.0},
    )
    assert line is not None and "+1.00" in line and "indicative" not in line
