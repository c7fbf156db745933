"""Trivial references and secondary metrics: computed by every bench run, stored, used for the verdicts, shown
in the tables and the report, exported; and the same through StudyLog."""

from __future__ import annotations

import csv
import random
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

import taskbalance
from taskbalance.bench.export import flatten_runs
from taskbalance.bench.spec import RunResult, RunSpec
from taskbalance.bench.store import ResultsStore
from taskbalance.bench.study import summarize
from taskbalance.cli import app
from taskbalance.data import Task
from taskbalance.report import write_report

TASK_RECORD = {
    "name": "churn", "kind": "binary", "metric": "accuracy", "higher_is_better": True, "role": "target",
    "unit": "",
}


def _store_runs(directory: Path, *, with_trivial: bool) -> list[RunSpec]:
    """Baselines below the majority rate, a method exactly at it (accuracy 0.8 = majority share)."""
    trivial = {"churn": {"auroc": 0.5, "average_precision": 0.2, "accuracy": 0.8}} if with_trivial else {}
    specs = []
    with ResultsStore(directory) as store:
        for seed, (base, method) in enumerate([(0.60, 0.800), (0.62, 0.801), (0.61, 0.800), (0.63, 0.801)]):
            for spec, value in (
                (RunSpec("d", "stl", seed, {"task": "churn"}, label="stl:churn"), base),
                (RunSpec("d", "bmtl", seed, label="bmtl"), method),
            ):
                store.record(
                    RunResult(
                        spec, "done", tasks=[TASK_RECORD], metrics={"churn": value},
                        test_metrics={"churn": {"auroc": 0.5, "average_precision": 0.2, "accuracy": value}},
                        trivial_metrics=trivial,
                    )
                )
                specs.append(spec)
    return specs


def test_a_method_at_the_majority_rate_is_flagged_not_called_positive_transfer(tmp_path: Path):
    specs = _store_runs(tmp_path / "without", with_trivial=False)
    with ResultsStore(tmp_path / "without") as store:
        unflagged = summarize(store, specs).methods[0].transfer
    assert unflagged is not None and unflagged.tasks["churn"].verdict == "positive transfer"  # what it was

    specs = _store_runs(tmp_path / "with", with_trivial=True)
    with ResultsStore(tmp_path / "with") as store:
        summary = summarize(store, specs)
    transfer = summary.methods[0].transfer
    assert transfer is not None and transfer.tasks["churn"].verdict == "at trivial level"
    assert transfer.tasks["churn"].trivial == 0.8
    assert summary.trivial_primary() == {"churn": 0.8}
    assert summary.methods[0].secondary_mean["churn"]["accuracy"] == pytest.approx(0.8005)
    assert summary.baseline is not None and summary.baseline.secondary_mean["churn"]["auroc"] == 0.5


def test_the_report_shows_the_trivial_row_and_the_secondary_metrics(tmp_path: Path):
    specs = _store_runs(tmp_path, with_trivial=True)
    markdown = write_report(tmp_path, specs=specs, plots=False).markdown.read_text()
    assert "Secondary metrics" in markdown
    secondary = markdown.split("Secondary metrics", 1)[1]
    header = next(line for line in secondary.splitlines() if line.startswith("| method"))
    assert "churn auroc ↑" in header and "churn average_precision ↑" in header
    assert "churn accuracy" not in header  # the primary metric has its own table
    assert "| trivial predictor | 0.5 | 0.2 |" in secondary
    assert "| trivial predictor | 0.8 |" in markdown.split("Secondary metrics", 1)[0]


def test_export_has_every_metric_and_the_trivial_references(tmp_path: Path):
    _store_runs(tmp_path, with_trivial=True)
    with ResultsStore(tmp_path) as store:
        columns, rows = flatten_runs(store.runs())
    for column in ("test/churn", "test/churn/auroc", "test/churn/average_precision", "test/churn/accuracy",
                   "trivial/churn/accuracy"):
        assert column in columns
    assert {r["trivial/churn/accuracy"] for r in rows} == {0.8}
    assert rows[1]["test/churn/accuracy"] == rows[1]["test/churn"] == 0.8


def test_a_store_written_before_the_new_columns_gains_them(tmp_path: Path):
    database = tmp_path / "results.sqlite"
    with ResultsStore(tmp_path):
        pass
    db = sqlite3.connect(database)  # the schema as it was: drop the two added columns
    db.execute("ALTER TABLE runs DROP COLUMN test_metrics")
    db.execute("ALTER TABLE runs DROP COLUMN trivial_metrics")
    db.commit()
    db.close()
    spec = RunSpec("d", "ew", 0)
    with ResultsStore(tmp_path) as store:
        store.record(RunResult(spec, "done", tasks=[TASK_RECORD], metrics={"churn": 0.7},
                               trivial_metrics={"churn": {"accuracy": 0.8}}))
        (run,) = store.runs()
    assert run.trivial_metrics == {"churn": {"accuracy": 0.8}} and run.test_metrics == {}


def test_study_log_takes_trivial_references_and_secondary_metrics(tmp_path: Path):
    tasks = [Task("churn", "binary")]
    assert tasks[0].metric == "auroc"  # the default primary metric of a binary task is not accuracy
    with pytest.raises(KeyError, match="unknown task"):
        taskbalance.StudyLog(tmp_path, tasks=tasks, trivial={"nope": 0.5})
    with pytest.raises(ValueError, match="non-finite"):
        taskbalance.StudyLog(tmp_path, tasks=tasks, trivial={"churn": float("nan")})
    log = taskbalance.StudyLog(tmp_path, tasks=tasks, trivial={"churn": 0.5})  # a number: the primary metric
    for seed in range(3):
        log.add_baseline("churn", seed, {"churn": 0.70 + 0.01 * seed},
                         test_metrics={"churn": {"auroc": 0.70 + 0.01 * seed, "accuracy": 0.85}})
        log.add_run("collapsed", seed, {"churn": 0.5 + 0.001 * (seed % 2)},
                    test_metrics={"churn": {"auroc": 0.5, "accuracy": 0.86}})
    summary = log.summary()
    assert summary.trivial == {"churn": {"auroc": 0.5}}
    transfer = summary.methods[0].transfer
    assert transfer is not None and transfer.tasks["churn"].at_trivial_level
    assert transfer.tasks["churn"].verdict in ("negative transfer", "at trivial level")
    assert summary.methods[0].secondary_mean["churn"]["accuracy"] == pytest.approx(0.86)
    assert "collapsed on churn" in log.conclusion()


def _imbalanced_csv(path: Path) -> None:
    """15% positives that no feature predicts (the only feature is constant): every model sits at the trivial
    level; y is noise as well."""
    rng = random.Random(0)
    lines = ["x,rare,y"] + [f"1.0,{int(i % 7 == 0)},{rng.random():.3f}" for i in range(200)]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_bench_on_imbalanced_binary_labels_flags_the_trivial_level_end_to_end(tmp_path: Path):
    table = tmp_path / "t.csv"
    _imbalanced_csv(table)
    out = tmp_path / "study"
    result = CliRunner().invoke(
        app,
        ["bench", "--csv", str(table), "--target", "rare:binary", "--target", "y:regression",
         "--methods", "ew,ema", "--seeds", "2", "--epochs", "1", "--out", str(out), "--workers", "1"],
        terminal_width=160,
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("auroc ↑" in line for line in lines)  # the primary metric of imbalanced binary labels
    assert not any("accuracy" in line for line in lines)
    trivial_row = next(line for line in lines if "trivial predictor" in line)
    assert "0.5" in trivial_row
    verdicts = result.output.split("Relative change")[1].split("Verdicts:")[0].splitlines()
    for method in ("ew", "ema"):
        row = next(line for line in verdicts if line.startswith(f"│ {method} "))
        assert row.split("│")[2].strip().endswith("triv")  # the rare column: flagged
        assert " pos" not in row
    assert lines[-1].startswith("Conclusion: ") and "trivial predictor's level" in lines[-1]

    with ResultsStore(out) as store:
        runs = store.runs(status="done")
    assert len(runs) == 8 and all(r.trivial_metrics["rare"]["auroc"] == 0.5 for r in runs)
    method_runs = [r for r in runs if r.method != "stl"]
    assert all(set(r.test_metrics["rare"]) == {"auroc", "average_precision", "accuracy"} for r in method_runs)
    assert all(set(r.test_metrics["y"]) == {"mae", "rmse"} for r in method_runs)

    exported = CliRunner().invoke(app, ["export", str(out), "--format", "csv"])
    assert exported.exit_code == 0, exported.output
    with open(out / "results.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert {"test/rare/average_precision", "test/y/rmse", "trivial/rare/auroc"} <= set(header)
    assert "Secondary metrics" in (out / "report.md").read_text()
