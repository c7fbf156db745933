"""The Conclusion paragraph and the terminal layout, on constructed study summaries."""

from __future__ import annotations

import io

from rich.console import Console

from taskbalance.bench.study import MethodSummary, StudySummary, TaskInfo
from taskbalance.bench.table import render_summary
from taskbalance.diagnostics import compare_study
from taskbalance.diagnostics.conclusion import conclusion

SEEDS = range(4)
JITTER = [0.0, 0.013, -0.011, 0.006]


def _study(offsets: dict[str, dict[str, float]], tasks: list[TaskInfo], *, seeds=SEEDS, trivial=None):
    """Methods whose error (lower is better) is the baseline's plus an offset, with seed noise."""
    baselines = {t.name: {s: 1.0 + 0.1 * i + JITTER[s] for s in seeds} for i, t in enumerate(tasks)}
    runs = {
        label: {
            s: {t: baselines[t][s] + off + 0.004 * ((s + j) % 3) for j, (t, off) in enumerate(per.items())}
            for s in seeds
        }
        for label, per in offsets.items()
    }
    comparison = compare_study(runs, baselines, tasks, trivial=trivial)
    methods = []
    for label, per_seed in runs.items():
        item = MethodSummary(
            label,
            label,
            len(per_seed),
            {},
            {},
            ms_per_step=2.0 if label == "ew" else 5.0,
            peak_memory_mb=100.0,
        )
        item.metric_mean = {t.name: sum(r[t.name] for r in per_seed.values()) / len(per_seed) for t in tasks}
        item.metric_std = {t.name: 0.01 for t in tasks}
        item.transfer = comparison.methods[label]
        methods.append(item)
    baseline = MethodSummary(
        "single-task",
        "stl",
        len(seeds),
        {t.name: 1.0 for t in tasks},
        {t.name: 0.01 for t in tasks},
        1.5,
        90.0,
    )
    return StudySummary(tasks, baseline, methods, correction_text=comparison.correction_text)


TASKS = [TaskInfo("a", "mae", False), TaskInfo("b", "mae", False)]


def test_conclusion_with_negative_transfer_names_tasks_methods_remedies_and_cost():
    summary = _study({"ew": {"a": 0.3, "b": 0.0}, "pcgrad": {"a": 0.0, "b": 0.0}}, TASKS)
    text = conclusion(summary)
    assert text.startswith("Conclusion: Negative transfer is present — under ew on a")
    assert "pcgrad (Δm" in text and "removes it on every task" in text and "5 ms/step" in text
    assert "Holm" in text


def test_conclusion_without_negative_transfer_says_so_with_the_correction():
    summary = _study({"ew": {"a": 0.0, "b": 0.0}, "ema": {"a": -0.002, "b": 0.001}}, TASKS)
    text = conclusion(summary)
    assert text.startswith("Conclusion: No significant negative transfer on any scored task under any method")
    assert "Holm–Bonferroni" in text and "lowest Δm:" in text
    assert "remove" not in text


def test_conclusion_asks_for_more_seeds_when_evidence_is_weak():
    summary = _study({"ew": {"a": 0.05, "b": 0.0}}, TASKS, seeds=range(2))
    text = conclusion(summary)
    assert "evidence is weak: ew has only 2 matched seed(s) — run ≥ 4 seeds" in text  # 4: seeds_needed


def test_conclusion_flags_the_trivial_level_and_never_calls_it_positive():
    tasks = [TaskInfo("label", "auroc", True)]
    baselines = {"label": {s: 0.40 + 0.01 * s for s in SEEDS}}  # worse than chance
    runs = {"collapsed": {s: {"label": 0.5 + 0.001 * s} for s in SEEDS}}  # a constant score: AUROC 0.5
    comparison = compare_study(runs, baselines, tasks, trivial={"label": 0.5})
    item = MethodSummary("collapsed", "bmtl", 4, {"label": 0.5}, {"label": 0.001}, 1.0, 1.0)
    item.transfer = comparison.methods["collapsed"]
    summary = StudySummary(tasks, None, [item], correction_text=comparison.correction_text)
    text = conclusion(summary)
    assert item.transfer.tasks["label"].verdict == "at trivial level"
    assert "trivial predictor's level (majority class / training mean): collapsed on label" in text
    assert "not counted as positive transfer" in text
    assert "single-task model of label is itself at the trivial level" in text


def test_no_baselines_gives_no_verdict():
    summary = StudySummary(TASKS, None, [MethodSummary("ew", "ew", 2, {}, {}, 1.0, 1.0)])
    assert conclusion(summary).startswith("Conclusion: no verdict on negative transfer is possible")


def test_fourteen_tasks_stay_readable_at_80_columns():
    tasks = [TaskInfo(f"label_{i:02d}", "auroc", True) for i in range(14)]
    summary = _study({"ew": {t.name: 0.0 for t in tasks}, "bmtl_hot": {t.name: 0.01 for t in tasks}}, tasks)
    buffer = io.StringIO()
    render_summary(summary, Console(file=buffer, width=80, force_terminal=False))
    text = buffer.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "bmtl_hot" in text  # the method column is never squeezed to nothing
    assert "(1/" in text and "label_13" in text  # detail is paged, every task shown
    assert "Holm" in text
