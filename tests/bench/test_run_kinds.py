"""Run kinds are objects in one table: each validates in the driver and executes in a worker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import taskbalance
from taskbalance.bench.keys import canonical_json, run_key
from taskbalance.bench.kinds import BALANCER, FORKMERGE, RUN_KINDS, STL, is_baseline, kind_of, validate_run
from taskbalance.bench.kinds.forkmerge import forkmerge_train_steps
from taskbalance.bench.runner import RunResult, RunSpec, execute
from taskbalance.bench.store import ResultsStore, RunRecord
from taskbalance.data import available_datasets, load
from taskbalance.models import build_model
from taskbalance.models.tiny import TinyModel
from taskbalance.train import TrainConfig

TASKS = load("tiny").tasks


def test_the_table_maps_method_names_to_kinds():
    assert kind_of(STL).baseline and not kind_of(STL).listable
    assert kind_of(FORKMERGE).name == "forkmerge" and kind_of(FORKMERGE).listable
    assert kind_of("pcgrad") is BALANCER and not is_baseline("pcgrad")
    assert set(RUN_KINDS) == {STL, FORKMERGE}


def test_kinds_validate_in_the_driver_with_one_line_saying_what_is_accepted():
    with pytest.raises(ValueError, match="unknown balancing method 'emma'.*'ema'.*'forkmerge'"):
        validate_run("emma", {}, TASKS)
    with pytest.raises(ValueError, match="temperature"):
        validate_run("bmtl", {"T": 5}, TASKS)
    validate_run("bmtl", {"temperature": 5}, TASKS)
    with pytest.raises(ValueError, match="unknown ForkMerge option"):
        validate_run(FORKMERGE, {"momentum": 0.9}, TASKS)
    with pytest.raises(ValueError, match="not tasks of the dataset"):
        validate_run(FORKMERGE, {"main": "zzz"}, TASKS)
    with pytest.raises(ValueError, match="topk"):
        validate_run(FORKMERGE, {"main": "a", "topk": [7]}, TASKS)
    validate_run(FORKMERGE, {"main": "a"}, TASKS)
    # the paper's search and Λ-pruning are bench options too (issue 11)
    validate_run(FORKMERGE, {"main": "a", "search": "binary", "binary_steps": 3}, TASKS)
    validate_run(FORKMERGE, {"main": "a", "prune_after": 1, "keep_branches": 1}, TASKS)
    with pytest.raises(ValueError, match="search"):
        validate_run(FORKMERGE, {"main": "a", "search": "exhaustive"}, TASKS)
    with pytest.raises(ValueError, match="exactly one hyperparameter 'task'"):
        validate_run(STL, {}, TASKS)
    with pytest.raises(ValueError, match="not a task of the dataset"):
        validate_run(STL, {"task": "zzz"}, TASKS)


def test_no_method_name_is_compared_as_a_string_outside_the_kinds_table():
    root = Path(taskbalance.__file__).parent
    pattern = re.compile(r'== "(forkmerge|stl|tiny)"')
    offenders = [
        f"{path.relative_to(root)}:{i}"
        for path in root.rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_tiny_is_an_ordinary_registered_dataset_and_model():
    assert "tiny" in available_datasets()
    data = load("tiny", n_train=20)
    torch.manual_seed(0)
    model = build_model(data)  # auto → the tiny MLP
    assert isinstance(model, TinyModel) and len(data.train) == 20
    with pytest.raises(TypeError, match="unknown option"):
        build_model(data, "tiny", hidden=[3])


def test_forkmerge_branches_train_through_the_trainers_step(monkeypatch):
    from taskbalance.train import loop

    calls: list[dict[str, float] | None] = []
    original = loop.train_step

    def spy(*args, **kwargs):
        calls.append(kwargs.get("loss_weights"))
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", spy)
    data = load("tiny", auxiliary=("x",))
    config = TrainConfig(epochs=1, batch_size=32)
    torch.manual_seed(0)
    model = build_model(data)
    optimizer = torch.optim.Adam(model.parameters())
    optimizer.param_groups[0]["taskbalance_step"] = 0
    weights = {"a": 1.0, "b": 0.5, "x": 0.0, "c": 1.0}
    forkmerge_train_steps(data, config, 3, model, optimizer, weights, 3)
    assert calls == [weights] * 3


def test_the_store_returns_typed_records_keyed_like_specs(tmp_path: Path):
    odd = RunSpec("tiny", "x", seed=1, hyperparameters={"b": 1, "a": [2]})
    assert odd.key == run_key("tiny", odd.protocol_hash, "x", {"a": [2], "b": 1}, 1)
    assert odd.key[3] == canonical_json({"b": 1, "a": [2]}) == '{"a":[2],"b":1}'
    spec = RunSpec("tiny", "ew", seed=1, train=TrainConfig(epochs=1).to_dict())
    with ResultsStore(tmp_path) as store:
        store.record(execute(spec))
        store.record(RunResult(spec=RunSpec("tiny", "uw", seed=0), status="failed", error="boom"))
        done, failed = store.runs()
    assert isinstance(done, RunRecord) and done.key == spec.key and done.status == "done"
    assert set(done.metrics) == {"a", "b", "c"} and done.selected_epoch == 1
    assert failed.metrics == {} and failed.error == "boom"
