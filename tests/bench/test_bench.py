"""Study planning, execution, failure handling, executors and the end-of-study summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskbalance.bench.executor import LocalProcessExecutor, SerialExecutor, make_executor
from taskbalance.bench.runner import STL, RunSpec, execute, restrict_tasks
from taskbalance.bench.store import ResultsStore
from taskbalance.bench.study import Study, run_specs, summarize
from taskbalance.bench.suites import SUITES, MethodEntry, get_suite, parse_methods, split_available
from taskbalance.data.tiny import tiny_data
from taskbalance.diagnostics import compare_study
from taskbalance.train import TrainConfig

TRAIN = TrainConfig(epochs=2, batch_size=32, lr=1e-2)


def study(methods=("ew", "ema"), seeds=(0, 1), **data_options):
    return Study.from_suite(
        get_suite("quick"),
        tiny_data(**data_options).tasks,
        methods=[MethodEntry(m, m) for m in methods],
        seeds=list(seeds),
        dataset_options=data_options,
        train=TRAIN,
    )


def test_specs_put_baselines_first_and_only_for_target_tasks():
    s = study(regression=("main",), binary=(), auxiliary=("aux",))
    specs = s.specs()
    assert [x.method for x in specs[:2]] == [STL, STL]
    assert [x.hyperparameters for x in specs[:2]] == [{"task": "main"}, {"task": "main"}]
    assert [(x.display, x.seed) for x in specs[2:]] == [("ew", 0), ("ema", 0), ("ew", 1), ("ema", 1)]
    assert len({x.key for x in specs}) == len(specs)
    assert len({x.protocol_hash for x in specs}) == 1


def test_protocol_hash_changes_with_the_protocol_only():
    a = RunSpec("tiny", "ew", 0, arch="tiny", train=TRAIN.to_dict())
    other_method = RunSpec("tiny", "ema", 3, {"beta": 0.5}, arch="tiny", train=TRAIN.to_dict())
    assert other_method.protocol_hash == a.protocol_hash
    longer = RunSpec("tiny", "ew", 0, arch="tiny", train={**TRAIN.to_dict(), "epochs": 3})
    other_data = RunSpec("tiny", "ew", 0, arch="tiny", train=TRAIN.to_dict(), dataset_options={"seed": 1})
    assert len({a.protocol_hash, longer.protocol_hash, other_data.protocol_hash}) == 3


def test_single_task_baseline_trains_on_one_task_only():
    result = execute(RunSpec("tiny", STL, 0, {"task": "b"}, arch="tiny", train=TRAIN.to_dict()))
    assert result.status == "done", result.error
    assert set(result.metrics) == {"b"}
    assert [t["name"] for t in result.tasks] == ["a", "b", "c"]  # the full task list, for the summary
    data = restrict_tasks(tiny_data(), ["c"])
    assert data.task_names == ["c"] and set(data.train.y) == {"c"}
    with pytest.raises(ValueError, match="no task"):
        restrict_tasks(tiny_data(), ["zzz"])


def test_a_failing_run_is_recorded_not_raised_and_retried_next_time(tmp_path: Path):
    bad = RunSpec("tiny", "ema", 0, {"beta": 7.0}, arch="tiny", train=TRAIN.to_dict())
    good = RunSpec("tiny", "ew", 0, arch="tiny", train=TRAIN.to_dict())
    with ResultsStore(tmp_path) as store:
        assert run_specs([bad, good], store, SerialExecutor()) == (2, 0)
        rows = {r["method"]: r for r in store.runs()}
        assert rows["ema"]["status"] == "failed" and "beta must be in [0, 1)" in rows["ema"]["error"]
        assert rows["ew"]["status"] == "done"
        assert run_specs([bad, good], store, SerialExecutor()) == (1, 1)
        assert store.runs(status="failed")[0]["attempts"] == 2


def test_summary_matches_the_transfer_statistics_of_the_stored_runs(tmp_path: Path):
    s = study()
    specs = s.specs()
    with ResultsStore(tmp_path) as store:
        executed, skipped = run_specs(specs, store, SerialExecutor())
        assert (executed, skipped) == (len(specs), 0)
        summary = summarize(store, specs)
        rows = store.runs(status="done")
    assert [t.name for t in summary.tasks] == ["a", "b", "c"]
    assert summary.baseline is not None and summary.baseline.seeds == 2
    assert [m.label for m in summary.methods] == ["ew", "ema"]
    baselines: dict[str, dict[int, float]] = {}
    for row in rows:
        if row["method"] == STL:
            task = row["hyperparameters"]["task"]
            baselines.setdefault(task, {})[row["seed"]] = row["metrics"][task]
    runs = {m: {r["seed"]: r["metrics"] for r in rows if r["method"] == m} for m in ("ew", "ema")}
    study_comparison = compare_study(runs, baselines, tiny_data().tasks)  # one Holm family: 2 methods × 3
    expected = study_comparison.methods["ema"]
    assert summary.correction_text == study_comparison.correction_text and "Holm" in summary.correction_text
    ema = summary.methods[1]
    assert ema.transfer is not None
    assert ema.transfer.delta_m == pytest.approx(expected.delta_m)
    assert {n: t.verdict for n, t in ema.transfer.tasks.items()} == {
        n: t.verdict for n, t in expected.tasks.items()
    }
    for name, entry in expected.tasks.items():
        assert ema.transfer.tasks[name].p_adjusted == pytest.approx(entry.p_adjusted, nan_ok=True)
    assert ema.ms_per_step > 0 and ema.seeds == 2
    assert summary.failed == [] and summary.unfinished == 0


def test_without_baselines_there_is_no_delta_m(tmp_path: Path):
    s = study(seeds=(0,))
    s.baselines = False
    with ResultsStore(tmp_path) as store:
        run_specs(s.specs(), store, SerialExecutor())
        summary = summarize(store, s.specs())
    assert summary.baseline is None
    assert all(m.transfer is None for m in summary.methods)


def test_process_pool_results_equal_serial_results():
    specs = [RunSpec("tiny", m, 0, arch="tiny", train=TRAIN.to_dict()) for m in ("ew", "ema")]
    serial = {r.spec.method: r for r in SerialExecutor().map(specs)}
    pooled = {r.spec.method: r for r in LocalProcessExecutor(workers=2).map(specs)}
    assert set(pooled) == {"ew", "ema"}
    for method in serial:
        assert pooled[method].status == "done", pooled[method].error
        assert pooled[method].metrics == serial[method].metrics
        assert pooled[method].weights == serial[method].weights


def test_make_executor_and_bad_worker_counts():
    assert isinstance(make_executor(1), SerialExecutor)
    assert isinstance(make_executor(2), LocalProcessExecutor)
    assert make_executor(None).workers >= 1
    with pytest.raises(ValueError, match="workers"):
        make_executor(0)


def test_suites_name_their_methods_and_unregistered_ones_are_reported():
    demo = get_suite("demo")
    assert [m.label for m in demo.methods] == [
        "ew",
        "uw",
        "dwa",
        "ema",
        "bmtl",
        "famo",
        "pcgrad",
        "mgda-ub",
        "nash-mtl",
        "tensioners",
    ]
    assert demo.dataset == "qm9" and demo.seeds == 2 and demo.train.epochs == 20
    runnable, missing = split_available((MethodEntry("ew", "ew"), MethodEntry("x", "not-a-method")))
    assert [e.method for e in runnable] == ["ew"] and [e.method for e in missing] == ["not-a-method"]
    with pytest.raises(KeyError, match="known suites: aux, aux-qm9, demo, fashion-reconstruct, "):
        get_suite("nope")
    assert set(SUITES) >= {"aux", "aux-qm9", "demo", "quick"}


def test_parse_methods():
    assert [e.method for e in parse_methods(" ew, EMA ,,pcgrad")] == ["ew", "ema", "pcgrad"]
    with pytest.raises(ValueError, match="twice"):
        parse_methods("ew,ew")
    with pytest.raises(ValueError, match="no method"):
        parse_methods(" , ")
