"""`diagnose` (mounted by the CLI as `taskbalance diagnose`): affinity, groupings and conflict files."""

import json

import pytest
import typer
from test_affinity import tiny_data
from typer.testing import CliRunner

from taskbalance.data import register_dataset
from taskbalance.diagnostics.cli_diagnose import diagnose
from taskbalance.sinks import read_csv_scalars

DATASET = "tiny_affinity_cli_test"


@pytest.fixture(scope="module")
def app():
    register_dataset(DATASET, lambda **options: tiny_data(**options), overwrite=True)
    application = typer.Typer(add_completion=False)
    application.command("diagnose")(diagnose)
    return application


def test_diagnose_writes_affinity_groupings_and_conflict(app, tmp_path):
    out = tmp_path / "diag"
    result = CliRunner().invoke(app, [DATASET, "--steps", "12", "--batch-size", "64", "--lr", "0.3",
                                      "--hidden", "16", "--layers", "1", "--conflict-every", "5",
                                      "--option", "n=128", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Suggested groupings" in result.output and "conflict rate" in result.output
    affinity = json.loads((out / "affinity.json").read_text())
    assert affinity["tasks"] == ["a", "b", "c"]
    assert [len(g["groups"]) for g in affinity["groupings"]] == [1, 2, 3]
    assert affinity["protocol"]["steps"] == 12
    conflict = json.loads((out / "conflict.json").read_text())
    assert conflict["summary"]["steps_observed"] == 3
    assert conflict["history"]["steps"] == [0, 5, 10]
    metrics = read_csv_scalars(out / "metrics.csv")
    assert [step for step, _ in metrics["conflict/conflict_rate"]] == [0, 5, 10]
    assert (out / "affinity.png").read_bytes()[:4] == b"\x89PNG"


def test_diagnose_rejects_bad_input(app, tmp_path):
    runner = CliRunner()
    unknown = runner.invoke(app, ["no_such_dataset", "--out", str(tmp_path)])
    assert unknown.exit_code == 2 and "unknown dataset" in unknown.output
    bad_mode = runner.invoke(app, [DATASET, "--mode", "second", "--out", str(tmp_path)])
    assert bad_mode.exit_code == 2 and "first_order" in bad_mode.output
    bad_option = runner.invoke(app, [DATASET, "--option", "n", "--out", str(tmp_path)])
    assert bad_option.exit_code == 2 and "key=value" in bad_option.output


def test_divergence_warning_flags_overshooting_affinities_only():
    import math

    import torch

    from taskbalance.diagnostics.cli_diagnose import divergence_warning

    sane = torch.tensor([[0.2, -0.3], [0.05, 0.4]])
    assert divergence_warning(sane, lr=0.05) is None
    exploded = torch.tensor([[0.2, -4.1e9], [0.05, 0.4]])
    message = divergence_warning(exploded, lr=0.05)
    assert message is not None and "4.1e+09" in message and "lr=0.05" in message
    assert divergence_warning(torch.tensor([[math.nan, 0.1], [0.1, 0.2]]), lr=0.1) is not None
