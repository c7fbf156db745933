"""The ``qm9-paper`` suite: the published protocol's settings, and one epoch end to end on a small subset."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from molecules import MOLECULES
from qm9_files import _write_qm9pack_like

from taskbalance.bench.runner import RunSpec, execute
from taskbalance.bench.suites import NASH_MTL_QM9_SINGLE_TASK_MAE, get_suite
from taskbalance.report.published import load_published


def test_qm9_paper_suite_holds_the_published_protocol() -> None:
    suite = get_suite("qm9-paper")
    train = suite.train
    assert (suite.dataset, suite.arch, suite.seeds) == ("qm9_graph", "mpnn", 3)
    assert (train.epochs, train.batch_size, train.lr, train.optimizer) == (300, 120, 1e-3, "adam")
    assert (train.scheduler, train.plateau_factor, train.plateau_patience, train.min_lr) == (
        "plateau", 0.7, 5, 1e-5
    )
    assert train.balancer_lr == 0.025
    assert train.selection_reference == NASH_MTL_QM9_SINGLE_TASK_MAE
    assert len(NASH_MTL_QM9_SINGLE_TASK_MAE) == 11
    assert {e.method for e in suite.methods} >= {"ew", "uw", "dwa", "mgda", "pcgrad", "nash-mtl", "famo"}


def test_qm9_paper_runs_every_method_of_the_published_table() -> None:
    published = {value.method for value in load_published("qm9").values}
    assert {e.method for e in get_suite("qm9-paper").methods} == published


@pytest.mark.slow
def test_one_epoch_of_the_published_protocol_runs_end_to_end_on_a_small_subset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKBALANCE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    names = list(MOLECULES)
    molecules = []
    for i in range(60):
        symbols, xyz = MOLECULES[names[i % len(names)]]
        targets = rng.normal(0, 1, 11) + np.array([2, 70, -0.25, 0.01, 1000, 0.1, -400, -400, -400, -400, 30])
        molecules.append({"symbols": symbols, "xyz": np.array(xyz, dtype=float), "targets": targets})
    _write_qm9pack_like(tmp_path / "qm9", molecules)
    suite = get_suite("qm9-paper")
    train = {**suite.train.to_dict(), "epochs": 1}
    options = {"subset": 60, "source": str(tmp_path / "qm9")}
    for method, hyperparameters in (("stl", {"task": "u0"}), ("uw", {}), ("famo", {})):
        spec = RunSpec(
            dataset=suite.dataset, method=method, seed=0, hyperparameters=hyperparameters,
            dataset_options=options, arch=suite.arch, train=train,
        )
        result = execute(spec)
        assert result.status == "done", result.error
        assert result.steps == 1  # 51 training molecules, batch 120
        assert all(math.isfinite(v) for v in result.metrics.values())
        assert result.selected_epoch == 1
