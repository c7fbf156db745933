"""MoDo and SDMGrad in training: the extra-batch protocol end to end (own loop, ``fit``,
``taskbalance bench``), the error without a closure, a NaN on an extra batch, and the state round-trip."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from toy import ToyMultiTask, toy_batch, toy_losses
from typer.testing import CliRunner

import taskbalance as tb
from taskbalance import NonFiniteGradientError, NonFiniteLossError
from taskbalance.cli import app
from taskbalance.data.tiny import tiny_data
from taskbalance.models.tiny import TinyModel
from taskbalance.train import TrainConfig, fit, seed_everything

TASKS = ["a", "b", "c"]
METHODS = ["modo", "sdmgrad"]


def loop(method: str, steps: int, **options):
    """A plain loop: the step's batch is ``seed=step``, the extra batches ``seed=1000 + draw``; returns the
    model, the balancer and the closure factory (so a test can continue the same stream)."""
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    balancer = tb.make(method, TASKS, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    draws = iter(range(1000, 100_000))

    def extra_losses():
        return toy_losses(model, *toy_batch(TASKS, seed=next(draws)))[1]

    for step in range(steps):
        optimizer.zero_grad()
        _, losses = toy_losses(model, *toy_batch(TASKS, seed=step))
        balancer.backward(losses, shared=model.trunk.parameters(), extra_losses=extra_losses)
        optimizer.step()
    return model, balancer, extra_losses


@pytest.mark.parametrize("method", METHODS)
def test_without_a_closure_the_error_names_the_fix_and_nothing_is_written(method):
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    balancer = tb.make(method, TASKS)
    state = copy.deepcopy(balancer.state_dict())
    _, losses = toy_losses(model, *toy_batch(TASKS))
    fix = r"2 extra training batches per step.*extra_losses=fn.*docs/extra-batches"
    with pytest.raises(ValueError, match=fix):
        balancer.backward(losses, shared=model.trunk.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert balancer.step_count == 0 and str(balancer.state_dict()) == str(state)
    # aggregate() on a bare step: the same message
    with pytest.raises(RuntimeError, match="extra_losses=fn"):
        balancer.aggregate(tb.GradientStep.of(torch.randn(3, 5)))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_nonfinite_extra_batch_raises_and_leaves_the_state_and_grads_unchanged(method, poison):
    model, balancer, extra_losses = loop(method, 3)
    state = copy.deepcopy(balancer.state_dict())
    calls = iter(range(2))

    def poisoned():
        losses = extra_losses()
        if next(calls) == 1:  # the second extra batch: the first was already drawn
            if poison == "loss":
                losses["b"] = losses["b"] * float("nan")
            else:
                losses["b"] = losses["b"] + 0.0 * torch.sqrt(model.trunk[0].weight[0, 0] * 0)
        return losses

    model.zero_grad(set_to_none=True)
    _, losses = toy_losses(model, *toy_batch(TASKS, seed=50))
    error = NonFiniteLossError if poison == "loss" else NonFiniteGradientError
    with pytest.raises(error) as raised:
        balancer.backward(losses, shared=model.trunk.parameters(), extra_losses=poisoned)
    assert "b" in raised.value.tasks  # (a batched backward through sqrt(0) poisons every row: 0 · inf)
    assert all(p.grad is None for p in model.parameters())
    after = balancer.state_dict()
    assert balancer.step_count == 3
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key], value), key


@pytest.mark.parametrize("method", METHODS)
def test_state_round_trips_and_the_restored_balancer_takes_the_same_next_step(method):
    _, balancer, _ = loop(method, 4)
    saved = balancer.state_dict()
    weights = saved["lambd" if method == "modo" else "w"]
    assert float((weights - 1 / 3).abs().max()) > 1e-4  # the state has moved off its start
    restored = tb.make(method, TASKS)
    restored.load_state_dict(copy.deepcopy(saved))
    assert restored.step_count == 4
    rows = [torch.randn(3, 7, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            for s in range(3)]
    outcomes = []
    for b in (balancer, restored):
        extra = tb.balancers.ReplayedExtraBatches(rows[1:], TASKS)
        outcomes.append(b.aggregate(tb.GradientStep.of(rows[0], extra=extra)).shared_update(rows[0]))
    torch.testing.assert_close(outcomes[0], outcomes[1], rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_the_closure_is_asked_only_for_the_present_tasks(method):
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    balancer = tb.make(method, TASKS)
    asked = []

    def without_b():  # an extra batch may lack a task absent from the step
        asked.append(1)
        losses = toy_losses(model, *toy_batch(TASKS, seed=7 + len(asked)))[1]
        return {t: v for t, v in losses.items() if t != "b"}

    _, losses = toy_losses(model, *toy_batch(TASKS))
    del losses["b"]
    record = balancer.backward(losses, shared=model.trunk.parameters(), extra_losses=without_b)
    assert len(asked) == 2 and float(record.weights[1]) == 0.0 and "b" in record.skipped
    assert model.heads["b"].weight.grad is None


@pytest.mark.parametrize("method", METHODS)
def test_fit_supplies_the_training_batches_and_trains(method):
    data = tiny_data(binary=())
    seed_everything(1)
    model = TinyModel(data)
    before = copy.deepcopy(model.state_dict())
    balancer = tb.make(method, data.task_names)
    assert balancer.extra_batch_source == "training"
    result = fit(model, data, balancer, TrainConfig(epochs=2, batch_size=16, lr=1e-2), seed=1, progress=False)
    weights = [step for epoch in result.weights for step in epoch]
    assert len({tuple(w) for w in weights}) > 1  # the weights move with the drawn batches
    assert all(abs(sum(w) - 1) < 1e-5 for w in weights)  # λ / (w + λw̃)/(1 + λ) sum to 1
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(torch.isfinite(torch.tensor(list(m.values()))).all() for m in result.test_metrics.values())


@pytest.mark.slow
def test_bench_runs_the_double_sampling_methods_end_to_end(tmp_path: Path):
    out = tmp_path / "study"
    result = CliRunner().invoke(app, [
        "bench", "--dataset", "synthetic_aux", "--methods", "ew,modo,sdmgrad", "--epochs", "1",
        "--seeds", "1", "--out", str(out), "--workers", "1", "--no-baselines", "--no-report",
    ])
    assert result.exit_code == 0, result.output
    assert "3 run(s) executed, 0 already done" in result.output
    for method in ("modo", "sdmgrad"):
        assert re.search(rf"^\s*│?\s*{method}\b", result.output, flags=re.MULTILINE), result.output


@pytest.mark.parametrize("method", ["modo", "sdmgrad"])
def test_names_from_a_failed_backward_never_reach_a_later_step(method, monkeypatch):
    from taskbalance.balancers import GradientStep, ReplayedExtraBatches

    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    balancer = tb.make(method, TASKS)
    _, losses = toy_losses(model, *toy_batch(TASKS, seed=0))
    del losses["c"]  # the screened step's tasks are a, b

    def fail(step):
        raise RuntimeError("after screening, before drawing")

    monkeypatch.setattr(balancer, "_prepare", fail)
    with pytest.raises(RuntimeError, match="before drawing"):
        balancer.backward(losses, shared=model.trunk.parameters(),
                          extra_losses=lambda: toy_losses(model, *toy_batch(TASKS, seed=1))[1])
    monkeypatch.undo()
    # a later step of two other tasks (b, c) must draw b and c, not the failed step's a and b
    jacobian = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    extra = ReplayedExtraBatches([jacobian, jacobian], ["b", "c"])
    weights = balancer.aggregate(GradientStep.of(jacobian, index=torch.tensor([1, 2]), extra=extra)).weights
    assert bool(torch.isfinite(weights).all()) and extra.drawn == 2
