"""``--device``: the study's torch device reaches each run's trainer; an unknown one fails in the driver."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import taskbalance.train.loop as loop
from taskbalance.bench.driver import StudyError, check_device
from taskbalance.bench.study_file import study_from_text, study_to_toml
from taskbalance.bench.suites import SUITES
from taskbalance.cli import app

runner = CliRunner()
NO_GPU = not torch.cuda.is_available()


def test_device_cpu_is_threaded_through_to_every_runs_trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []
    real_fit = loop.fit

    def recording_fit(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("device"))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(loop, "fit", recording_fit)
    result = runner.invoke(
        app,
        ["bench", "--suite", "quick", "--methods", "ew", "--seeds", "1", "--epochs", "1", "--device", "cpu",
         "--executor", "serial", "--no-report", "--out", str(tmp_path / "s")],
    )
    assert result.exit_code == 0, result.output
    assert seen == ["cpu"] * 4  # 3 single-task baselines + ew


def test_the_device_is_a_study_field_written_to_study_files_and_kept_out_of_the_protocol():
    suite = SUITES["quick"]
    assert suite.device == "cpu"
    text = study_to_toml(suite).replace('kind = "local"', 'kind = "local"\ndevice = "cuda"')
    on_gpu = study_from_text(text)
    assert on_gpu.device == "cuda" and study_from_text(study_to_toml(on_gpu)) == on_gpu
    result = runner.invoke(app, ["bench", "--suite", "quick", "--print-study", "--device", "cuda:1"])
    assert result.exit_code == 0 and 'device = "cuda:1"' in result.output
    from taskbalance.bench.study import Study

    cpu_specs = Study.from_suite(suite, [], baselines=False).specs()
    gpu_specs = Study.from_suite(on_gpu, [], baselines=False).specs()
    assert {s.device for s in gpu_specs} == {"cuda"}
    assert [s.key for s in cpu_specs] == [s.key for s in gpu_specs]  # same runs, wherever they train


@pytest.mark.skipif(not NO_GPU, reason="checks the message of a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_an_unavailable_device_fails_in_the_driver_with_exit_2(tmp_path: Path, device: str):
    result = runner.invoke(
        app, ["bench", "--suite", "quick", "--device", device, "--no-report", "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 2
    assert f"device {device!r} is not available" in result.output
    assert "--device cpu" in result.output
    assert not (tmp_path / "s" / "results.sqlite").exists()  # nothing written


def test_a_malformed_device_is_named() -> None:
    with pytest.raises(StudyError, match="'gpu0' is not a torch device"):
        check_device("gpu0")
    check_device("cpu")
