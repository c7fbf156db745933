"""A study folder that must not change (read-only, archived, a colleague's): report and export leave it as is.

Run as root, permission bits do not stop writes, so the tests check the stronger property directly: after
``report --output`` and ``export --output`` every file of the study folder has the same bytes and no file
appeared (no report, no plots, no SQLite ``-wal``/``-shm``/journal).
"""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from taskbalance.bench.runner import RunSpec, execute
from taskbalance.bench.store import ResultsStore
from taskbalance.cli import app
from taskbalance.train import TrainConfig

runner = CliRunner()
TRAIN = TrainConfig(epochs=1, batch_size=64).to_dict()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def finished_study(folder: Path) -> Path:
    study = folder / "study"
    with ResultsStore(study) as store:
        for method in ("stl:a", "stl:b", "ew"):
            store.record(execute(RunSpec("tiny", method, 0, {}, train=TRAIN)))
    return study


def test_report_to_another_folder_leaves_the_study_folder_byte_identical(tmp_path: Path):
    study = finished_study(tmp_path)
    before = snapshot(study)
    out = tmp_path / "elsewhere"
    result = runner.invoke(app, ["report", str(study), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").exists() and (out / "report.html").exists()
    assert "Conclusion:" in (out / "report.md").read_text()
    assert snapshot(study) == before


def test_export_to_another_file_leaves_the_study_folder_byte_identical(tmp_path: Path):
    study = finished_study(tmp_path)
    before = snapshot(study)
    result = runner.invoke(app, ["export", str(study), "--output", str(tmp_path / "runs.csv")])
    assert result.exit_code == 0, result.output
    assert "ew" in (tmp_path / "runs.csv").read_text()
    assert snapshot(study) == before


def test_a_report_that_cannot_be_written_says_where_to_write_it_instead(tmp_path: Path):
    study = finished_study(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ["report", str(study), "--output", str(blocker / "sub")])
    assert result.exit_code == 2
    assert "cannot write the report" in result.output and "Traceback" not in result.output
