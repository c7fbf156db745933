"""Reports from the user's own loop (taskbalance.StudyLog) equal bench's on the same runs."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

import taskbalance
from taskbalance.bench.executor import SerialExecutor
from taskbalance.bench.store import ResultsStore
from taskbalance.bench.study import Study, run_specs, summarize
from taskbalance.bench.suites import MethodEntry, get_suite
from taskbalance.bench.table import render_summary
from taskbalance.data.tiny import tiny_data
from taskbalance.diagnostics.conclusion import conclusion
from taskbalance.report import write_report
from taskbalance.train import TrainConfig


def _render(summary) -> str:
    buffer = io.StringIO()
    render_summary(summary, Console(file=buffer, width=120))
    return buffer.getvalue()


def _tables(markdown: str) -> list[str]:
    """The report's table rows and the conclusion (everything but the date, protocol and plots)."""
    return [line for line in markdown.splitlines() if line.startswith(("|", "> Conclusion"))]


def test_own_loop_runs_give_the_bench_report(tmp_path: Path):
    data = tiny_data()
    study = Study.from_suite(
        get_suite("quick"),
        data.tasks,
        methods=[MethodEntry(m, m) for m in ("ew", "ema")],
        seeds=[0, 1, 2],
        train=TrainConfig(epochs=1, batch_size=64, lr=1e-2),
    )
    specs = study.specs()
    with ResultsStore(tmp_path / "bench") as store:
        run_specs(specs, store, SerialExecutor())
        bench_summary = summarize(store, specs)
        rows = [r for r in store.runs() if r.status == "done"]
        curves = {r.id: store.curves(r.id) for r in rows}
    bench_files = write_report(tmp_path / "bench", specs=specs, plots=False)

    assert rows[0].trivial_metrics  # bench stores the trivial references with every run
    trivial = rows[0].trivial_metrics
    log = taskbalance.StudyLog(tmp_path / "mine", tasks=data.tasks, dataset="tiny", trivial=trivial)
    for row in rows:
        extra = {"ms_per_step": row.ms_per_step, "peak_memory_mb": row.peak_memory_mb}
        extra["test_metrics"] = row.test_metrics
        history = curves[row.id].get("history", [])
        if row.method == "stl":
            log.add_baseline(row.hyperparameters["task"], row.seed, row.metrics, history=history, **extra)
        else:
            weights = curves[row.id].get("weights", [])
            log.add_run(row.label, row.seed, row.metrics, history=history, weights=weights, **extra)
    own_summary = log.summary()
    assert _render(own_summary) == _render(bench_summary)
    assert "trivial predictor" in _render(own_summary)
    assert own_summary.trivial == bench_summary.trivial and bench_summary.trivial
    assert log.conclusion() == conclusion(bench_summary) and log.conclusion().startswith("Conclusion: ")
    own_files = log.write_report(plots=False)
    assert _tables(own_files.markdown.read_text()) == _tables(bench_files.markdown.read_text())
    assert "Secondary metrics" in bench_files.markdown.read_text()
    assert own_files.conclusions == bench_files.conclusions
    html = own_files.html.read_text()
    assert re.search(r'<p class="conclusion">Conclusion: ', html)


def test_own_loop_rejects_unknown_tasks_and_non_finite_metrics(tmp_path: Path):
    log = taskbalance.StudyLog(tmp_path, tasks=tiny_data().tasks)
    with pytest.raises(KeyError, match="unknown task"):
        log.add_baseline("nope", 0, {"nope": 1.0})
    with pytest.raises(KeyError, match="no metric for task"):
        log.add_run("ew", 0, {"a": 1.0})
    with pytest.raises(ValueError, match="non-finite"):
        log.add_baseline("a", 0, {"a": float("nan")})


def test_report_md_escapes_html_in_user_names(tmp_path: Path):
    from taskbalance.data import Task

    evil = "<img src=x onerror=alert(1)>"
    log = taskbalance.StudyLog(tmp_path, tasks=[Task(evil, "regression")], dataset="<b>data</b>")
    for seed in range(2):
        log.add_baseline(evil, seed, {evil: 1.0 + 0.1 * seed})
        log.add_run("ew", seed, {evil: 1.2 + 0.05 * seed}, label="<script>x</script>")
    files = log.write_report(plots=False)
    markdown, page = files.markdown.read_text(), files.html.read_text()
    assert "<img" not in markdown and "<script" not in markdown and "<b>" not in markdown
    assert "&lt;img src=x onerror=alert(1)&gt;" in markdown
    assert "<img src=x" not in page and "<script" not in page


def test_report_after_adding_baseline_seeds_keeps_the_verdicts_and_says_so(tmp_path: Path):
    from typer.testing import CliRunner

    from taskbalance.cli import app
    from taskbalance.data import Task

    tasks = [Task("energy", "regression")]
    log = taskbalance.StudyLog(tmp_path, tasks=tasks)
    base = {s: 1.0 + 0.02 * ((s * 7) % 5) for s in range(5)}
    for seed in (0, 1, 2):
        log.add_baseline("energy", seed, {"energy": base[seed]})
        log.add_run("pcgrad", seed, {"energy": base[seed] + 0.04 + 0.003 * seed})
    before = log.summary().methods[0].transfer
    first = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert first.exit_code == 0, first.output
    for seed in (3, 4):  # more baseline seeds, no new pcgrad run
        log.add_baseline("energy", seed, {"energy": base[seed]})
    after = log.summary().methods[0].transfer
    assert before is not None and after is not None
    assert after.tasks["energy"].verdict == before.tasks["energy"].verdict
    assert after.tasks["energy"].p_value == pytest.approx(before.tasks["energy"].p_value)
    assert after.delta_m == pytest.approx(before.delta_m)
    again = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert again.exit_code == 0, again.output
    conclusion_line = again.output.strip().splitlines()[-1]
    assert conclusion_line.startswith("Conclusion: ") and "seed sets differ for pcgrad" in conclusion_line
    assert "baseline seeds {3, 4} (no run of this method)" in (tmp_path / "report.md").read_text()
