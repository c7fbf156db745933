"""Train-level faults: unreadable checkpoints are named and can be set aside, a resume refuses another run's
checkpoint, and long commands report progress instead of printing nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import taskbalance as tb
from taskbalance.bench.tiny import TinyModel, tiny_data
from taskbalance.cli import app
from taskbalance.diagnostics.affinity import compute_task_affinity
from taskbalance.train import (
    CheckpointError,
    CheckpointMismatchError,
    TrainConfig,
    fit,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    set_aside,
)

CONFIG = TrainConfig(epochs=2, batch_size=32, lr=1e-2, eval_batch_size=64)


def run(data, method="ema", seed=0, config=CONFIG, progress=False, **kwargs):
    seed_everything(seed)
    model = TinyModel(data)
    balancer = tb.make(method, data.task_names, **kwargs.pop("hyperparameters", {}))
    return fit(model, data, balancer, config, seed=seed, progress=progress, **kwargs)


# ---------------------------------------------------------------------------------------------- unreadable
def _checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "run.pt"
    run(tiny_data(), checkpoint=path)
    return path


def test_a_truncated_checkpoint_raises_a_checkpoint_error_naming_the_file(tmp_path: Path):
    path = _checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as caught:
        load_checkpoint(path)
    assert caught.value.path == path and str(path) in str(caught.value)
    with pytest.raises(CheckpointError, match=str(path)):
        run(tiny_data(), checkpoint=path, resume=True)
    assert path.exists()  # never overwritten: the caller decides


def test_garbage_and_foreign_files_are_checkpoint_errors_too(tmp_path: Path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a zip file at all" * 10)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a taskbalance checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_set_aside_checkpoint_keeps_the_file_and_the_run_restarts_afresh(tmp_path: Path):
    path = _checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    kept = path.read_bytes()
    moved = set_aside(path)
    assert moved.name == "run.pt.corrupt" and moved.read_bytes() == kept and not path.exists()
    path.write_bytes(b"broken again")
    assert set_aside(path).name == "run.pt.corrupt.1"
    restarted = run(tiny_data(), checkpoint=path, resume=True)
    fresh = run(tiny_data())
    assert restarted.test == fresh.test and restarted.selected_epoch == fresh.selected_epoch


# ---------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"method": "pcgrad"}, "method"),
        ({"seed": 1}, "seed"),
        ({"identity": {"hyperparameters": {"beta": 0.5}}}, "hyperparameters"),
        ({"config": TrainConfig(epochs=3, batch_size=32, lr=1e-2, eval_batch_size=64)}, "protocol"),
    ],
)
def test_resume_refuses_a_checkpoint_of_another_run(tmp_path: Path, change, field):
    path = tmp_path / "run.pt"
    run(tiny_data(), checkpoint=path, identity={"hyperparameters": {}})
    before = path.read_bytes()
    arguments = {"identity": {"hyperparameters": {}}, **change}
    if "beta" in str(arguments["identity"]):
        arguments["hyperparameters"] = {"beta": 0.5}
    with pytest.raises(CheckpointMismatchError, match="belongs to another run") as caught:
        run(tiny_data(), checkpoint=path, resume=True, **arguments)
    assert field in caught.value.differences and field in str(caught.value)
    assert path.read_bytes() == before


def test_resume_of_the_same_run_is_accepted_and_the_identity_is_saved(tmp_path: Path):
    path = tmp_path / "run.pt"
    first = run(tiny_data(), checkpoint=path, identity={"hyperparameters": {"beta": 0.5}},
                hyperparameters={"beta": 0.5})
    saved = load_checkpoint(path)["identity"]
    assert saved["method"] == "ema" and saved["seed"] == 0 and saved["hyperparameters"] == {"beta": 0.5}
    again = run(tiny_data(), checkpoint=path, resume=True, identity={"hyperparameters": {"beta": 0.5}},
                hyperparameters={"beta": 0.5})
    assert again.test == first.test


def test_a_checkpoint_without_an_identity_is_refused(tmp_path: Path):
    path = _checkpoint(tmp_path)
    state = load_checkpoint(path)
    del state["identity"]
    save_checkpoint(state, path)
    with pytest.raises(CheckpointMismatchError, match="without its run's identity"):
        run(tiny_data(), checkpoint=path, resume=True)


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_cli_train_resume_refuses_another_method_or_seed_with_exit_2(tmp_path: Path):
    checkpoint = str(tmp_path / "run.pt")
    common = ("train", "--dataset", "tiny", "--epochs", "1", "--checkpoint", checkpoint)
    first = _invoke(*common, "--method", "ema", "--seed", "0")
    assert first.exit_code == 0, first.output
    for other in (("--method", "pcgrad", "--seed", "0"), ("--method", "ema", "--seed", "1"),
                  ("--method", "ema", "--seed", "0", "--hp", "beta=0.5")):
        refused = _invoke(*common, "--resume", *other)
        assert refused.exit_code == 2, refused.output
        assert "belongs to another run" in refused.output and "Traceback" not in refused.output
    same = _invoke(*common, "--resume", "--method", "ema", "--seed", "0")
    assert same.exit_code == 0, same.output


def test_cli_train_resume_names_a_corrupt_checkpoint_with_exit_2(tmp_path: Path):
    checkpoint = tmp_path / "run.pt"
    checkpoint.write_bytes(b"truncated")
    result = _invoke(
        "train", "--dataset", "tiny", "--epochs", "1", "--checkpoint", str(checkpoint), "--resume"
    )
    assert result.exit_code == 2, result.output
    assert "run.pt" in result.output and "truncated or corrupt" in result.output


# ---------------------------------------------------------------------------------------------- progress
def test_fit_prints_one_line_per_epoch_when_stderr_is_not_a_terminal(capsys):
    run(tiny_data(), progress=None)
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in err] == ["train: epoch 1/2", "train: epoch 2/2"]
    assert all("val score" in line for line in err)
    run(tiny_data(), progress=False)
    assert capsys.readouterr().err == ""


def test_diagnose_affinity_prints_one_line_per_pass_when_asked(capsys):
    data = tiny_data()
    per_pass = -(-len(data.train) // 32)
    compute_task_affinity(data, steps=per_pass + 1, batch_size=32, hidden=8, layers=1, progress=None)
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in err] == ["diagnose: epoch 1/2", "diagnose: epoch 2/2"]
    assert err[-1].endswith(f"step {per_pass + 1}/{per_pass + 1}, " + err[-1].split(", ")[-1])
    compute_task_affinity(data, steps=2, batch_size=32, hidden=8, layers=1)
    assert capsys.readouterr().err == ""
