"""The command line: listing, training, benchmarking, exporting, and clear errors with non-zero exits."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from taskbalance.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_methods_lists_the_registry():
    result = invoke("methods")
    assert result.exit_code == 0, result.output
    for name in ("ew", "ema"):
        assert f"│ {name} " in result.output


def test_unknown_method_is_an_error_naming_the_known_ones():
    result = invoke("bench", "--suite", "quick", "--methods", "ew,emma")
    assert result.exit_code == 2
    assert "unknown balancing method 'emma'" in result.output and "'ema'" in result.output


def test_unknown_dataset_and_suite_are_errors():
    result = invoke("bench", "--dataset", "imagenet")
    assert result.exit_code == 2 and "unknown dataset 'imagenet'" in result.output and "tiny" in result.output
    result = invoke("bench", "--suite", "huge")
    assert result.exit_code == 2 and "unknown suite 'huge'" in result.output
    result = invoke("bench")
    assert result.exit_code == 2 and "give a dataset" in result.output
    result = invoke("bench", "--suite", "quick", "--study", "x.toml")
    assert result.exit_code == 2 and "either --suite or --study" in result.output


def test_bad_target_specs_are_errors(tmp_path: Path):
    table = tmp_path / "t.csv"
    table.write_text("x,y\n1,2\n3,4\n")
    cases = (("y", "must be column:kind"), ("y:ordinal", "'ordinal' is not one of"), (":binary", "must be"))
    for spec, message in cases:
        result = invoke("bench", "--csv", str(table), "--target", spec)
        assert result.exit_code == 2, spec
        assert message in result.output, result.output
    result = invoke("bench", "--csv", str(table))
    assert result.exit_code == 2 and "at least one --target" in result.output
    result = invoke("bench", "--dataset", "tiny", "--target", "y:regression")
    assert result.exit_code == 2 and "give --csv" in result.output
    result = invoke("bench", "--csv", str(tmp_path / "missing.csv"), "--target", "y:regression")
    assert result.exit_code == 2 and "no such file" in result.output


def test_bad_hyperparameter_is_an_error():
    result = invoke("train", "--dataset", "tiny", "--method", "ema", "--hp", "beta")
    assert result.exit_code == 2 and "key=value" in result.output
    result = invoke("train", "--dataset", "tiny", "--method", "ema", "--hp", "gamma=1", "--epochs", "1")
    assert result.exit_code == 2 and "unknown hyperparameter" in result.output


def test_train_prints_the_selected_epoch_metrics(tmp_path: Path):
    result = invoke("train", "--dataset", "tiny", "--method", "ema", "--hp", "beta=0.5", "--epochs", "2",
                    "--checkpoint", str(tmp_path / "c.pt"))
    assert result.exit_code == 0, result.output
    assert "selected on validation" in result.output and "ms/step" in result.output
    assert (tmp_path / "c.pt").exists()


def test_bench_prints_the_summary_then_skips_finished_runs_and_exports(tmp_path: Path):
    out = tmp_path / "study"
    args = ("bench", "--suite", "quick", "--methods", "ew,ema", "--seeds", "2", "--epochs", "1",
            "--out", str(out), "--workers", "1")
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert "single-task" in first.output and "Δm% ↓" in first.output and "lower is better" in first.output
    assert "NEG/n.s./pos" in first.output and "ms/step" in first.output
    assert "10 run(s) executed, 0 already done" in first.output
    assert first.output.strip().splitlines()[-1].startswith("Conclusion: ")  # every bench ends with it
    again = invoke(*args)
    assert again.exit_code == 0 and "0 run(s) executed, 10 already done" in again.output
    assert again.output.strip().splitlines()[-1].startswith("Conclusion: ")
    report = invoke("report", str(out))
    assert report.exit_code == 0 and report.output.strip().splitlines()[-1].startswith("Conclusion: ")

    exported = invoke("export", str(out), "--format", "csv")
    assert exported.exit_code == 0, exported.output
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 10 and {r["status"] for r in rows} == {"done"}
    assert {r["method"] for r in rows} == {"stl", "ew", "ema"} and "test/a" in rows[0]

    parquet = invoke("export", str(out), "--format", "parquet", "--output", str(tmp_path / "r.parquet"))
    assert parquet.exit_code == 0, parquet.output
    assert pq.read_table(tmp_path / "r.parquet").num_rows == 10


def test_suite_methods_not_registered_are_reported_not_dropped(tmp_path: Path, monkeypatch):
    from taskbalance.bench import suites

    quick = suites.SUITES["quick"]
    methods = (suites.MethodEntry("ew", "ew"), suites.MethodEntry("future-method", "future-method"))
    patched = suites.Suite(**{**quick.__dict__, "methods": methods})
    monkeypatch.setitem(suites.SUITES, "quick", patched)
    result = invoke("bench", "--suite", "quick", "--seeds", "1", "--epochs", "1", "--out", str(tmp_path),
                    "--workers", "1", "--no-baselines")
    assert result.exit_code == 0, result.output
    assert "Not run (not registered in this version): future-method" in result.output
    assert "No single-task baselines" in result.output


def test_export_errors(tmp_path: Path):
    result = invoke("export", str(tmp_path / "nothing"))
    assert result.exit_code == 2 and "no results store" in result.output
    result = invoke("export", str(tmp_path), "--format", "xlsx")
    assert result.exit_code == 2 and "csv" in result.output


def test_an_unusable_device_is_one_line_and_exit_2_in_train_and_diagnose(tmp_path: Path):
    # cuda:99 exists on no machine this runs on; "gpu0" is not a torch device at all
    for device, words in (("cuda:99", "not available"), ("gpu0", "not a torch device")):
        trained = runner.invoke(app, ["train", "--method", "ew", "--dataset", "tiny", "--device", device])
        assert trained.exit_code == 2, trained.output
        assert words in trained.output and "Traceback" not in trained.output
        probed = runner.invoke(app, ["diagnose", "tiny", "--device", device, "--out", str(tmp_path)])
        assert probed.exit_code == 2, probed.output
        assert words in probed.output and "Traceback" not in probed.output
