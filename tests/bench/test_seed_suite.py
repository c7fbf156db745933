"""The seeds suite end to end with a tiny budget (1 epoch, 2 seeds, 200 samples): it runs, shares runs
between groups, judges the claims from what it measured, and is reachable as ``bench --suite seeds:...``."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from taskbalance.bench.claims import FAILED, HOLDS, MIXED, NOT_HOLDS, NOT_SHOWN
from taskbalance.bench.executor import make_executor
from taskbalance.bench.seeds import report_lines, run_groups
from taskbalance.cli import app

VERDICTS = {HOLDS, NOT_HOLDS, NOT_SHOWN, FAILED, MIXED}


def test_tiny_seeds_suite_runs_and_judges_every_claim(tmp_path: Path):
    names = ["bmtl-2task", "tensioners-2task", "aux"]
    outcome = run_groups(names, tmp_path, make_executor(1), epochs=1, seeds=2, size=200)
    assert [m.group for m in outcome.measures] == names
    # tensioners-2task shares the single-task baselines and EW with bmtl-2task (same protocol, one store)
    runs = {"bmtl-2task": 2 * 2 + 4 * 2, "tensioners-2task": 2 * 1, "aux": 2 * 1 + 5 * 2}
    assert outcome.executed == sum(runs.values())
    assert {(r.claim.method, r.variant) for r in outcome.rows} == {
        ("BMTL", "bmtl T=1"), ("BMTL", "bmtl T=5"), ("BMTL", "bmtl T=25"),
        ("tensioners", "tensioners (faithful)"),
        ("HydaLearn", "hydalearn"), ("HydaLearn", "hydalearn cosine"), ("HydaLearn", "hydalearn held-out"),
        ("ForkMerge", "forkmerge"),
    }
    for row in outcome.rows:
        assert row.verdict in VERDICTS
        assert row.delta_m.n == 2 and row.paired.n == 2, row  # every run of this tiny budget finished
    text = "\n".join(report_lines(outcome))
    assert "| BMTL | beats EW |" in text and "### aux: synthetic_aux" in text
    assert "n = 200, 1 epochs, 2 seeds" in text

    again = run_groups(names, tmp_path, make_executor(1), epochs=1, seeds=2, size=200)  # resumes: none to run
    assert again.executed == 0
    assert [r.paired.mean for r in again.rows] == [r.paired.mean for r in outcome.rows]


def test_bench_suite_seeds_runs_named_groups_and_refuses_study_flags(tmp_path: Path):
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--suite", "seeds:bmtl-2task", "--epochs", "1", "--seeds", "2",
                                 "--subset", "200", "--workers", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "| BMTL | beats EW |" in result.output and "### bmtl-2task:" in result.output
    assert (tmp_path / "results.sqlite").is_file()
    refused = runner.invoke(app, ["bench", "--suite", "seeds", "--methods", "ew", "--out", str(tmp_path)])
    assert refused.exit_code == 2 and "does not take --methods" in refused.output
    unknown = runner.invoke(app, ["bench", "--suite", "seeds:nope"])
    assert unknown.exit_code == 2 and "unknown seeds group" in unknown.output
    typo = runner.invoke(app, ["bench", "--suite", "seed"])
    assert typo.exit_code == 2 and "unknown suite 'seed'" in typo.output
    assert "seeds[:group,...]" in typo.output
