"""The study report: its arithmetic (CIs, heatmap colours, curves) and contents, on hand-made store rows."""

from __future__ import annotations

import base64
import math
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from matplotlib import colormaps
from typer.testing import CliRunner

from taskbalance.bench.runner import STL, RunResult, RunSpec
from taskbalance.bench.store import ResultsStore
from taskbalance.cli import app
from taskbalance.diagnostics import relative_change
from taskbalance.report import load_sections, t_quantile, write_report
from taskbalance.report.data import (
    colour_sign,
    confidence_interval,
    flatten_weights,
    mean_curve,
    moving_average,
    relative_change_matrix,
    smoothing_window,
    symmetric_limit,
)
from taskbalance.report.plots import HEATMAP_CMAP, heatmap_colours
from taskbalance.report.render import delta_m_css

A = {
    "name": "a",
    "kind": "regression",
    "metric": "mae",
    "higher_is_better": False,
    "role": "target",
    "unit": "",
}
C = {
    "name": "c",
    "kind": "binary",
    "metric": "accuracy",
    "higher_is_better": True,
    "role": "target",
    "unit": "",
}
AUX = {
    "name": "h",
    "kind": "regression",
    "metric": "mae",
    "higher_is_better": False,
    "role": "auxiliary",
    "unit": "",
}
TRAIN = {"epochs": 2, "batch_size": 8, "lr": 0.01}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(
    method: str,
    seed: int,
    metrics: dict[str, float],
    *,
    tasks=(A, C),
    hp=None,
    label="",
    status="done",
    train=TRAIN,
    ms: float = 2.0,
) -> RunResult:
    """A finished (or failed) run as the runner would return it: 2 epochs × 3 steps of weights."""
    spec = RunSpec("toy", method, seed, dict(hp or {}), label=label, arch="tiny", train=dict(train))
    names = list(metrics)
    history = [
        {
            "epoch": e,
            "train_loss": {n: 1.0 / e + seed for n in names},
            "val": {n: metrics[n] + 1.0 / e for n in names},
            "val_loss": {n: 1.0 / e for n in names},
            "weights": {n: 1.0 for n in names},
        }
        for e in (1, 2)
    ]
    weights = [
        [[1.0 + 0.1 * k + 0.01 * step for k in range(len(names))] for step in range(3)] for _ in range(2)
    ]
    if status != "done":
        return RunResult(
            spec, status, error="Traceback (most recent call last):\nValueError: beta must be < 1"
        )
    return RunResult(
        spec,
        "done",
        tasks=list(tasks),
        metrics=metrics,
        val_metrics=metrics,
        selected_epoch=2,
        ms_per_step=ms,
        peak_memory_mb=100.0,
        steps=6,
        history=history,
        weights=weights,
    )


def baselines(a=(1.0, 1.2), c=(0.8, 0.9), **kwargs) -> list[RunResult]:
    out = [run(STL, s, {"a": v}, hp={"task": "a"}, **kwargs) for s, v in enumerate(a)]
    return out + [run(STL, s, {"c": v}, hp={"task": "c"}, **kwargs) for s, v in enumerate(c)]


def store_with(directory: Path, results: list[RunResult]) -> Path:
    with ResultsStore(directory) as store:
        for result in results:
            store.record(result)
    return directory


def section_of(directory: Path):
    with ResultsStore(directory) as store:
        (section,) = load_sections(store)
    return section


# ---------------------------------------------------------------------------------------------- arithmetic
@pytest.mark.parametrize("df", [1, 2, 3.5, 9, 40])
@pytest.mark.parametrize("probability", [0.5, 0.9, 0.975, 0.995, 0.025])
def test_t_quantile_inverts_the_student_t_distribution(df, probability):
    assert t_quantile(probability, df) == pytest.approx(
        scipy.stats.t.ppf(probability, df), rel=1e-9, abs=1e-12
    )


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="probability"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.9, 0)


@pytest.mark.parametrize("values", [[1.0, 3.0], [2.0, -1.0, 4.5], [0.3, 0.1, 0.2, 0.25, 0.5]])
def test_confidence_interval_is_the_student_t_interval_of_the_mean(values):
    mean, std, n = statistics.fmean(values), statistics.stdev(values), len(values)
    low, high = confidence_interval(mean, std, n, 0.95)
    expected = scipy.stats.t.interval(0.95, n - 1, loc=mean, scale=std / math.sqrt(n))
    assert (low, high) == pytest.approx(expected, rel=1e-9)
    narrower = confidence_interval(mean, std, n, 0.8)
    assert low < narrower[0] < mean < narrower[1] < high


def test_no_confidence_interval_from_one_seed():
    assert all(math.isnan(v) for v in confidence_interval(3.0, math.nan, 1))
    assert all(math.isnan(v) for v in confidence_interval(3.0, 0.5, 1))
    with pytest.raises(ValueError, match="level"):
        confidence_interval(0.0, 1.0, 3, 1.5)


def test_heatmap_colours_worse_red_better_blue_zero_white_missing_grey():
    matrix = [[12.0, -12.0], [0.0, math.nan], [3.0, -6.0]]
    assert [[colour_sign(v) for v in row] for row in matrix] == [
        ["worse", "better"],
        ["equal", "missing"],
        ["worse", "better"],
    ]
    rgba = heatmap_colours(matrix)
    assert rgba.shape == (3, 2, 4)
    red, blue = rgba[0, 0], rgba[0, 1]
    assert red[0] > red[2] + 0.2 and blue[2] > blue[0] + 0.2  # positive (worse) red, negative blue
    cmap = colormaps[HEATMAP_CMAP]
    np.testing.assert_allclose([red, blue], [cmap(1.0), cmap(0.0)])  # ±12: both ends of a scale centred at 0
    assert rgba[1, 0, :3].min() > 0.9  # 0 is the white centre
    grey = rgba[1, 1, :3]
    assert np.ptp(grey) < 0.01 and 0.6 < grey[0] < 0.9  # nan is neutral grey, neither red nor blue
    assert rgba[2, 0, 0] > rgba[2, 0, 2] and rgba[2, 0, 2] > red[2]  # +3 is a paler red than +12


def test_symmetric_limit_spans_the_largest_magnitude_of_either_sign():
    assert symmetric_limit([[1.0, -7.5], [math.nan, 2.0]]) == 7.5
    assert symmetric_limit([[0.0]]) == 1.0 and symmetric_limit([]) == 1.0


def test_flatten_weights_and_epoch_boundaries():
    rows, boundaries = flatten_weights([[[1, 2], [3, 4]], [[5, 6]], [[7, 8], [9, 0]]])
    assert rows == [[1, 2], [3, 4], [5, 6], [7, 8], [9, 0]] and boundaries == [2, 3]


def test_weight_smoothing_is_a_centred_moving_average_that_skips_missing_values():
    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 3) == pytest.approx([1.5, 2.0, 3.0, 4.0, 4.5])
    assert moving_average([0.0, 10.0, 0.0, 10.0], 1) == [0.0, 10.0, 0.0, 10.0]
    smoothed = moving_average([1.0, float("nan"), 3.0, float("nan")], 3)
    assert smoothed[:3] == pytest.approx([1.0, 2.0, 3.0]) and smoothed[3] == 3.0
    assert math.isnan(moving_average([float("nan")] * 3, 1)[1])
    alternating = moving_average([0.0, 1.0] * 500, smoothing_window(1000))  # step-to-step jumps: the trend
    assert max(alternating[20:-20]) - min(alternating[20:-20]) < 0.04
    assert smoothing_window(9) == 1 and smoothing_window(48) == 7 and smoothing_window(1000) == 33
    with pytest.raises(ValueError, match="odd"):
        moving_average([1.0], 2)


def test_mean_curve_averages_seeds_per_epoch_and_ignores_missing_values():
    h1 = [{"val": {"a": 1.0}}, {"val": {"a": 3.0}}]
    h2 = [{"val": {"a": 2.0}}, {"val": {"a": float("nan")}}, {"val": {"a": 5.0}}]
    assert mean_curve([h1, h2], "val", "a") == [1.5, 3.0, 5.0]
    assert math.isnan(mean_curve([[{"val": {}}]], "val", "a")[0])


# ---------------------------------------------------------------------------------------------- sections
def test_section_ci_and_heatmap_come_from_the_stored_seeds(tmp_path: Path):
    method = [{"a": 1.5, "c": 0.7}, {"a": 1.65, "c": 0.6}, {"a": 1.62, "c": 0.75}]  # a: paired diffs ≈ 0.5
    results = baselines(a=(1.0, 1.2, 1.1), c=(0.8, 0.9, 0.85))
    results += [run("ew", s, m) for s, m in enumerate(method)]
    section = section_of(store_with(tmp_path, results))
    (view,) = section.methods
    base = {"a": 1.1, "c": 0.85}
    per_seed = [
        (relative_change(m["a"], base["a"], False) + relative_change(m["c"], base["c"], True)) / 2
        for m in method
    ]
    assert view.delta_m == pytest.approx(statistics.fmean(per_seed))
    expected = scipy.stats.t.interval(
        0.95, 2, loc=statistics.fmean(per_seed), scale=statistics.stdev(per_seed) / math.sqrt(3)
    )
    assert (view.ci_low, view.ci_high) == pytest.approx(expected)
    labels, tasks, values, marks = relative_change_matrix(section)
    assert labels == ["ew"] and tasks == ["a", "c"]
    mean_a, mean_c = statistics.fmean(m["a"] for m in method), statistics.fmean(m["c"] for m in method)
    assert values[0] == pytest.approx(
        [relative_change(mean_a, 1.1, False), relative_change(mean_c, 0.85, True)]
    )
    assert all(v > 0 for v in values[0]) and marks[0][0] == "NEG"  # clearly worse on a, 3 seeds each
    assert view.representative_seed == 0 and section.weights["ew"][0][0] == pytest.approx([1.0, 1.1])


def test_delta_m_cell_is_shaded_only_when_the_ci_excludes_zero(tmp_path: Path):
    worse = [{"a": 2.0, "c": 0.5}, {"a": 2.1, "c": 0.45}]
    noisy = [{"a": 0.5, "c": 0.95}, {"a": 1.9, "c": 0.6}]
    better = [{"a": 0.5, "c": 0.95}, {"a": 0.52, "c": 0.96}]
    results = baselines()
    for label, rows in (("worse", worse), ("noisy", noisy), ("better", better)):
        results += [run("ew", s, m, label=label, hp={"tag": label}) for s, m in enumerate(rows)]
    views = {v.label: v for v in section_of(store_with(tmp_path, results)).methods}
    assert views["worse"].ci_low > 0 and delta_m_css(views["worse"]) == "neg"
    assert views["better"].ci_high < 0 and delta_m_css(views["better"]) == "pos"
    assert views["noisy"].ci_low < 0 < views["noisy"].ci_high and delta_m_css(views["noisy"]) == ""


def test_each_protocol_is_its_own_section_newest_first(tmp_path: Path):
    longer = {**TRAIN, "epochs": 5}
    results = baselines() + [run("ew", s, {"a": 1.0, "c": 0.8}) for s in (0, 1)]
    results += baselines(train=longer) + [run("ema", 0, {"a": 0.9, "c": 0.9}, train=longer)]
    store_with(tmp_path, results)
    with ResultsStore(tmp_path) as store:
        sections = load_sections(store)
    assert [[m.label for m in s.methods] for s in sections] == [["ema"], ["ew"]]
    assert [s.protocol["train"]["epochs"] for s in sections] == [5, 2]
    files = write_report(tmp_path, plots=False)
    headings = re.findall(r"<h2>Study: toy \(protocol (\w+)\)</h2>", files.html.read_text())
    assert headings == [s.protocol_hash for s in sections] and files.plots == []


# ---------------------------------------------------------------------------------------------- the report
def test_report_files_are_written_and_the_html_is_self_contained(tmp_path: Path):
    results = baselines() + [
        run(m, s, {"a": 1.1 + 0.1 * s, "c": 0.8}, ms=3.0 + s) for m in ("ew", "pcgrad") for s in (0, 1)
    ]
    files = write_report(store_with(tmp_path, results))
    assert files.markdown == tmp_path / "report.md" and files.html == tmp_path / "report.html"
    names = sorted(p.name for p in files.plots)
    assert names == sorted(
        [
            "delta_m.png",
            "transfer_heatmap.png",
            "cost_vs_delta_m.png",
            "weights.png",
            "train_curves.png",
            "val_curves.png",
        ]
    )
    assert all(p.parent == tmp_path / "plots" and p.read_bytes().startswith(PNG_MAGIC) for p in files.plots)

    page = files.html.read_text()
    assert "<script" not in page and "<link" not in page and "http://" not in page and "https://" not in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in sources}
    assert embedded == {p.read_bytes() for p in files.plots}
    assert (
        "<table" in page
        and "lower is better" in page
        and "single-task baselines of the same protocol" in page
    )

    markdown = files.markdown.read_text()
    for path in files.plots:
        assert f"](plots/{path.name})" in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| method | seeds"))
    assert "Δm% ↓" in header and "95% CI" in header and "ms/step" in header
    metric_header = next(line for line in markdown.splitlines() if line.startswith("| method | a "))
    assert "a mae ↓" in metric_header and "c accuracy ↑" in metric_header
    assert markdown.splitlines()[4].startswith("> Conclusion: ")  # heads the report, after title and date
    assert "<p class=\"conclusion\">Conclusion: " in page
    assert re.search(r"\| pcgrad \| 1\.15 ± 0\.071 \| 0\.8 ± 0 \|", markdown)


def test_partial_study_failed_run_and_single_seed_method(tmp_path: Path):
    results = baselines() + [run("ew", s, {"a": 1.2, "c": 0.8 + 0.01 * s}) for s in (0, 1)]
    results += [run("ema", 0, {"a": 1.0, "c": 0.9}), run("ema", 1, {}, hp={}, status="failed")]
    files = write_report(store_with(tmp_path, results))
    markdown = files.markdown.read_text()
    assert "| ema | 1 |" in markdown and "no CI (1 seed)" in markdown
    assert "One seed only for ema: no confidence interval" in markdown
    assert "Failed runs (1)" in markdown and "ema seed 1: ValueError: beta must be &lt; 1" in markdown
    ema_row = next(line for line in markdown.splitlines() if line.startswith("| ema |"))
    assert "+2 ?" in ema_row  # both tasks: insufficient seeds for a verdict
    assert (tmp_path / "plots" / "delta_m.png").exists()


def test_without_baselines_delta_m_is_unavailable_and_no_stale_plots_remain(tmp_path: Path):
    stale = tmp_path / "plots" / "delta_m.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG_MAGIC)
    files = write_report(store_with(tmp_path, [run("ew", s, {"a": 1.0, "c": 0.8}) for s in (0, 1)]))
    markdown = files.markdown.read_text()
    assert "No single-task baselines in this study" in markdown and "| ew | 2 |" in markdown
    assert "unavailable" in next(line for line in markdown.splitlines() if line.startswith("| ew |"))
    assert "Δm plot not drawn: no single-task baselines" in markdown
    assert not stale.exists() and not (tmp_path / "plots" / "transfer_heatmap.png").exists()
    assert sorted(p.name for p in files.plots) == ["train_curves.png", "val_curves.png", "weights.png"]


def test_auxiliary_study_scores_target_tasks_only(tmp_path: Path):
    tasks = (A, C, AUX)
    results = baselines(tasks=tasks)  # single-task baselines of the targets only, as Study plans them
    results += [run("ew", s, {"a": 1.0, "c": 0.85, "h": 3.0}, tasks=tasks) for s in (0, 1)]
    store_with(tmp_path, results)
    section = section_of(tmp_path)
    assert section.scored_tasks == ["a", "c"] and section.auxiliary_tasks == ["h"]
    assert relative_change_matrix(section)[1] == ["a", "c"]
    markdown = write_report(tmp_path, plots=False).markdown.read_text()
    assert "Δm and verdicts are computed on the target tasks only (a, c)" in markdown
    assert "h (aux) mae ↓" in markdown


def test_text_from_the_store_is_escaped_in_the_html(tmp_path: Path):
    results = baselines() + [run("ew", s, {"a": 1.0, "c": 0.8}, label="<b>ew</b>") for s in (0, 1)]
    page = write_report(store_with(tmp_path, results), plots=False).html.read_text()
    assert "<b>ew</b>" not in page and "&lt;b&gt;ew&lt;/b&gt;" in page


def test_missing_store_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="run `taskbalance bench --out"):
        write_report(tmp_path)
    assert not (tmp_path / "results.sqlite").exists()


def test_cli_report_command(tmp_path: Path):
    store_with(tmp_path, [run("ew", s, {"a": 1.0, "c": 0.8}) for s in (0, 1)])  # no baselines: 3 plots
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "report.html (self-contained)" in result.output and "3 plot(s)" in result.output
    assert (tmp_path / "report.md").exists() and (tmp_path / "report.html").exists()
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no results store" in missing.output
