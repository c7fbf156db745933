"""Faults the bench harness survives: each test failed before its fix."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from taskbalance.bench.executor import LocalProcessExecutor, SerialExecutor, available_cpus, make_executor
from taskbalance.bench.runner import RunSpec, execute
from taskbalance.bench.spec import checkpoint_path
from taskbalance.bench.store import ResultsStore
from taskbalance.bench.study import run_specs
from taskbalance.cli import app
from taskbalance.data import load
from taskbalance.train import TrainConfig

TRAIN = TrainConfig(epochs=2, batch_size=32, lr=1e-2, eval_batch_size=256).to_dict()
runner = CliRunner()


def spec(tmp_path: Path, method: str = "ew", seed: int = 0, **hyperparameters) -> RunSpec:
    return RunSpec(
        "tiny", method, seed, dict(hyperparameters), train=TRAIN, checkpoint_dir=str(tmp_path / "ck")
    )


def test_a_truncated_checkpoint_is_set_aside_named_and_the_run_restarts(tmp_path: Path):
    run = spec(tmp_path)
    path = checkpoint_path(run, ".pt")
    assert path is not None
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.warns(RuntimeWarning, match=str(path.name)):
        result = execute(run)
    assert result.status == "done", result.error
    assert (path.parent / (path.name + ".corrupt")).read_bytes() == b"PK\x03\x04 truncated"
    assert result.metrics == execute(spec(tmp_path / "fresh")).metrics  # a clean restart


def _suicide(spec: RunSpec) -> object:  # pragma: no cover - runs in a pool worker
    if spec.seed == 1:
        os._exit(9)  # like a SIGKILL or the OOM killer
    return execute(spec)


def test_a_dead_worker_fails_only_its_own_run(tmp_path: Path):
    specs = [spec(tmp_path, seed=s) for s in range(4)]
    results = {r.spec.seed: r for r in LocalProcessExecutor(workers=2, run=_suicide).map(specs)}
    assert sorted(results) == [0, 1, 2, 3]
    assert results[1].status == "failed" and "died" in (results[1].error or "")
    assert all(results[s].status == "done" for s in (0, 2, 3)), [results[s].error for s in (0, 2, 3)]


def test_workers_are_capped_at_the_cpus_unless_forced():
    cpus = available_cpus()
    with pytest.warns(RuntimeWarning, match="capped"):
        capped = make_executor(1000)
    assert (capped.workers if isinstance(capped, LocalProcessExecutor) else 1) == cpus
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forced = make_executor(1000, force_workers=True)
    assert isinstance(forced, LocalProcessExecutor) and forced.workers == 1000


def test_two_bench_processes_do_not_run_each_others_runs(tmp_path: Path):
    runs = [spec(tmp_path, seed=s) for s in range(2)]
    with ResultsStore(tmp_path) as ours, ResultsStore(tmp_path) as theirs:
        theirs.owner = f"{theirs.owner.rpartition(':')[0]}:{os.getppid()}"  # a live process: our parent
        assert theirs.claim(runs[0])
        executed, skipped = run_specs(runs, ours, SerialExecutor())
        assert (executed, skipped) == (1, 1)
        assert {r.seed: r.status for r in ours.runs()} == {0: "running", 1: "done"}
        theirs.owner = "thishost:999999999"  # a claim whose process is gone is taken over
    with ResultsStore(tmp_path) as ours:
        with ours._transaction() as db:
            db.execute("UPDATE runs SET claimed_by = ? WHERE seed = 0", (f"{os.uname().nodename}:999999",))
        assert run_specs(runs, ours, SerialExecutor()) == (1, 1)


def test_leftover_temporary_checkpoints_are_removed_on_start(tmp_path: Path):
    run = spec(tmp_path)
    path = checkpoint_path(run, ".pt")
    assert path is not None
    path.parent.mkdir(parents=True)
    leftover = path.parent / f".{path.name}.abc123.tmp"
    leftover.write_bytes(b"half")
    with ResultsStore(tmp_path) as store:
        run_specs([run], store, SerialExecutor())
    assert not leftover.exists()


def test_the_store_opens_read_only_without_writing(tmp_path: Path):
    with ResultsStore(tmp_path) as store:
        store.record(execute(spec(tmp_path)))
    with ResultsStore(tmp_path, read_only=True) as store:
        assert [r.status for r in store.runs()] == ["done"]
        with pytest.raises(Exception, match="readonly"):
            store.claim(spec(tmp_path, seed=5))


def test_csv_targets_with_dots_become_valid_task_names_and_ids_are_not_features(tmp_path: Path):
    frame = pd.DataFrame(
        {
            "rownames": range(1, 41),
            "x": [i % 7 for i in range(40)],
            "price.usd": [float(i) for i in range(40)],
            "y.1": [i % 2 for i in range(40)],
        }
    )
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    with pytest.warns(UserWarning, match="rownames"):
        data = load("table", path=str(path), targets=["price.usd:regression", "y.1:binary"])
    assert data.task_names == ["price_usd", "y_1"] and data.protocol["features"] == ["x"]
    result = runner.invoke(
        app,
        [
            "bench",
            "--csv",
            str(path),
            "--target",
            "price.usd:regression",
            "--target",
            "y.1:binary",
            "--methods",
            "ew",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--workers",
            "1",
            "--out",
            str(tmp_path / "o"),
            "--no-report",
        ],
    )
    assert result.exit_code == 0, result.output
    with ResultsStore(tmp_path / "o", read_only=True) as store:
        assert {r.status for r in store.runs()} == {"done"}
