"""The auxiliary-task study: the ``aux``/``aux-qm9`` suites, ForkMerge as a bench run kind, target-only Δm."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from qm9_files import _molecules, _write_qm9pack_like
from rich.console import Console

from taskbalance.auxiliary import forkmerge as forkmerge_module
from taskbalance.bench.executor import SerialExecutor
from taskbalance.bench.kinds.forkmerge import forkmerge_train_steps
from taskbalance.bench.runner import (
    FORKMERGE,
    STL,
    RunSpec,
    build_network,
    execute,
    load_dataset,
)
from taskbalance.bench.store import ResultsStore
from taskbalance.bench.study import Study, run_specs, summarize
from taskbalance.bench.suites import get_suite, split_available
from taskbalance.bench.table import render_summary
from taskbalance.data import load
from taskbalance.train import TrainConfig

TINY_TRAIN = TrainConfig(epochs=2, batch_size=32, lr=3e-3)
TINY_DATA = {"n": 200}


def tiny_aux_study(seeds: tuple[int, ...] = (0, 1)) -> Study:
    """The ``aux`` suite with its methods and model, on 200 samples for 2 epochs: a few seconds."""
    suite = get_suite("aux")
    data = load_dataset(suite.dataset, TINY_DATA)
    return Study.from_suite(suite, data.tasks, seeds=list(seeds), dataset_options=TINY_DATA, train=TINY_TRAIN)


def forkmerge_spec(**changes: object) -> RunSpec:
    spec = next(s for s in tiny_aux_study((0,)).specs() if s.method == FORKMERGE)
    return replace(spec, **changes)  # type: ignore[arg-type]


def test_aux_suites_compare_the_auxiliary_methods_with_the_target_named() -> None:
    for name, target in (("aux", "target"), ("aux-qm9", "zpve")):
        suite = get_suite(name)
        assert [m.label for m in suite.methods] == ["ew", "gcs", "ol-aux", "hydalearn", "forkmerge"]
        assert all(m.hyperparameters == {"main": target} for m in suite.methods if m.method != "ew")
        assert suite.seeds >= 3 and suite.baselines
        runnable, missing = split_available(suite.methods)
        assert missing == [] and len(runnable) == len(suite.methods)
    assert get_suite("aux-qm9").dataset_options["target"] == "zpve"


def test_aux_study_plans_a_single_task_baseline_for_the_target_only() -> None:
    specs = tiny_aux_study().specs()
    baselines = [s for s in specs if s.method == STL]
    assert {s.display for s in baselines} == {"stl:target"} and len(baselines) == 2


def test_tiny_aux_study_runs_end_to_end_and_scores_the_target_only(tmp_path: Path) -> None:
    study = tiny_aux_study()
    specs = study.specs()
    with ResultsStore(tmp_path) as store:
        executed, skipped = run_specs(specs, store, SerialExecutor())
        summary = summarize(store, specs, targets_only=study.targets_only)
        rows = store.runs()
    assert (executed, skipped) == (len(specs), 0) and not summary.failed
    assert [m.label for m in summary.methods] == ["ew", "gcs", "ol-aux", "hydalearn", "forkmerge"]
    for method in summary.methods:
        assert method.transfer is not None and method.transfer.targets_only
        assert method.transfer.tasks["target"].verdict is not None
        assert all(method.transfer.tasks[a].verdict is None for a in ("helpful_0", "noise_0"))
        assert math.isfinite(method.transfer.delta_m)
        assert method.transfer.delta_m == pytest.approx(method.transfer.tasks["target"].relative_change)
    fm_rows = [r for r in rows if r["method"] == FORKMERGE]
    assert len(fm_rows) == 2 and all(r["ms_per_step"] > 0 for r in fm_rows)
    assert all(set(r["metrics"]) == {"target", "helpful_0", "noise_0"} for r in fm_rows)

    console = Console(record=True, width=200)
    render_summary(summary, console)
    text = console.export_text()
    assert "Δm% ↓ (targets)" in text
    assert "on the target task(s) only (target)" in text and "helpful_0, noise_0" in text
    assert "forkmerge" in text


def test_forkmerge_run_records_merges_and_the_budget_of_one_trainer_run() -> None:
    result = execute(forkmerge_spec())
    assert result.status == "done", result.error
    data = load_dataset("synthetic_aux", TINY_DATA)
    steps_per_epoch = math.ceil(len(data.train) / TINY_TRAIN.batch_size)
    assert result.steps == TINY_TRAIN.epochs * steps_per_epoch
    assert len(result.weights) == TINY_TRAIN.epochs
    assert all(len(epoch) == steps_per_epoch and all(len(w) == 3 for w in epoch) for epoch in result.weights)
    assert result.history and all(h["task_weights"]["target"] == pytest.approx(1.0) for h in result.history)
    assert result.history[0]["ranking"] is not None  # topk (0, 1, 2) with 2 auxiliaries needs a ranking
    assert result.selected_epoch is not None and 1 <= result.selected_epoch <= TINY_TRAIN.epochs
    best = max(h["score"] for h in result.history)
    chosen = [h for h in result.history if math.ceil(h["epoch"]) == result.selected_epoch]
    assert any(h["score"] == best for h in chosen)
    for task in data.tasks:  # every metric of the kind and the trivial references, as balancer runs store
        assert result.test_metrics[task.name][task.metric] == result.metrics[task.name]
        assert set(result.trivial_metrics[task.name]) == set(result.test_metrics[task.name])


def test_forkmerge_runs_are_deterministic_and_resume_bit_for_bit(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    uninterrupted = execute(forkmerge_spec())
    spec = forkmerge_spec(checkpoint_dir=str(tmp_path))
    original = forkmerge_module.ForkMerge._run_segment

    def crash_on_second_segment(self, segment):  # type: ignore[no-untyped-def]
        if segment == 1:
            raise RuntimeError("interrupted")
        return original(self, segment)

    monkeypatch.setattr(forkmerge_module.ForkMerge, "_run_segment", crash_on_second_segment)
    interrupted = execute(spec)
    assert interrupted.status == "failed" and "interrupted" in (interrupted.error or "")
    assert list(tmp_path.glob("*.forkmerge/forkmerge.pt"))  # ranking and first merge were checkpointed
    monkeypatch.setattr(forkmerge_module.ForkMerge, "_run_segment", original)
    resumed = execute(spec)
    assert resumed.status == "done", resumed.error
    assert resumed.metrics == uninterrupted.metrics and resumed.val_metrics == uninterrupted.val_metrics
    assert resumed.weights == uninterrupted.weights
    assert not list(tmp_path.iterdir())  # the checkpoint folder is removed once the run is done
    assert execute(forkmerge_spec()).metrics == uninterrupted.metrics


def test_forkmerge_options_are_checked() -> None:
    bad = execute(forkmerge_spec(hyperparameters={"main": "target", "momentum": 0.9}))
    assert bad.status == "failed" and "unknown ForkMerge option(s) momentum" in (bad.error or "")
    both = execute(forkmerge_spec(hyperparameters={"main": "target", "targets": ["target"]}))
    assert both.status == "failed" and "either main= or targets=" in (both.error or "")
    explicit = execute(forkmerge_spec(hyperparameters={"branches": [{"target": 1.0}], "merge_every": 5}))
    assert explicit.status == "done", explicit.error
    only_target = {"target": 1.0, "helpful_0": 0.0, "noise_0": 0.0}
    assert all(h["task_weights"] == only_target for h in explicit.history)


def test_forkmerge_branch_steps_follow_the_trainer_cosine_schedule_and_skip_zero_weight_tasks() -> None:
    data = load_dataset("synthetic_aux", TINY_DATA)
    config = TrainConfig(epochs=3, batch_size=64, lr=1e-2)
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    torch.manual_seed(0)
    model = build_network(data, "mlp", {"hidden": [8], "act": "tanh"})
    noise_head = {k: v.clone() for k, v in model.heads["noise_0"].state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    optimizer.param_groups[0]["taskbalance_step"] = 0
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=config.epochs)
    weights = {"target": 1.0, "helpful_0": 1.0, "noise_0": 0.0}
    for _ in range(config.epochs):
        forkmerge_train_steps(data, config, steps_per_epoch, model, optimizer, weights, steps_per_epoch)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"])
        reference.step()
        schedule.step()
    assert optimizer.param_groups[0]["taskbalance_step"] == config.epochs * steps_per_epoch
    for key, value in model.heads["noise_0"].state_dict().items():
        assert torch.equal(value, noise_head[key])  # weight 0: the task is not in the branch


def test_qm9_target_option_makes_the_other_properties_auxiliary(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TASKBALANCE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "qm9"
    _write_qm9pack_like(folder, _molecules(30))
    data = load("qm9", subset=30, source=folder, target="zpve")
    roles = {t.name: t.role for t in data.tasks}
    assert roles.pop("zpve") == "target" and len(roles) == 10 and set(roles.values()) == {"auxiliary"}
    assert data.protocol["target"] == "zpve"
    plain = load("qm9", subset=30, source=folder)
    assert {t.role for t in plain.tasks} == {"target"} and "target" not in plain.protocol
    with pytest.raises(ValueError, match="target must be one of the chosen tasks"):
        load("qm9", subset=30, source=folder, tasks=["mu", "u0"], target="zpve")
