"""Data parallelism: two gloo ranks on the CPU take exactly the step of one process on the global batch.

One spawn of two ranks runs every scenario (starting processes is the slow part); the parent then runs the
same loop in a single process on the concatenated batch and compares. Covered: a loss-level method (EMA,
with a DDP-wrapped model and with a plain module), a projection method (PCGrad, random: both sides seeded
identically) and a solver method (MGDA, also at the feature level, MGDA-UB style). Gradient methods run on a
plain module and on a DDP-wrapped model under ``no_sync()`` (see ``taskbalance.distributed``); parameter-level
Gramian methods through the Gramian engine (the global Gramian, cross-rank terms included) and, for MGDA,
through the Jacobian engine too.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from toy import ToyMultiTask, toy_batch

import taskbalance
from taskbalance.distributed import (
    DistributedReducer,
    all_reduce_gradients,
    broadcast_parameters,
    distribute,
)

TASKS = ["a", "b", "c"]
WORLD = 2
PER_RANK = 8
STEPS = 3
TOLERANCE = {"rtol": 1e-9, "atol": 1e-11}  # float64: only summation order differs from one process
# (method, hyperparameters, gradient level, how the model is wrapped)
SCENARIOS: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "ema-ddp": ("ema", {}, "parameters", "ddp"),
    "ema-plain": ("ema", {}, "parameters", "plain"),
    "pcgrad-plain": ("pcgrad", {"seed": 7}, "parameters", "plain"),
    "pcgrad-no_sync": ("pcgrad", {"seed": 7}, "parameters", "no_sync"),
    "mgda-plain": ("mgda", {}, "parameters", "plain"),  # the Gramian engine (auto)
    "mgda-jacobian": ("mgda", {"engine": "jacobian"}, "parameters", "plain"),
    "upgrad-gramian-no_sync": ("upgrad", {"engine": "gramian"}, "parameters", "no_sync"),
    "mgda-no_sync": ("mgda", {}, "parameters", "no_sync"),
    "mgda-features": ("mgda", {}, "features", "plain"),
}


def _batch(step: int, shard: slice | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, y = toy_batch(TASKS, n=WORLD * PER_RANK, seed=step)
    x, y = x.double(), {t: v.double() for t, v in y.items()}
    if shard is not None:
        x, y = x[shard], {t: v[shard] for t, v in y.items()}
    return x, y


def _losses(runner: torch.nn.Module, x: torch.Tensor, y: dict[str, torch.Tensor]):
    z, out = runner(x)
    return z, {t: ((out[t] - y[t]) ** 2).mean() for t in TASKS}


def _train(scenario: str, distributed: bool, shard: slice | None) -> dict[str, Any]:
    """STEPS steps of SGD; per-step gradients and weights, final parameters and balancer state."""
    method, hyperparameters, level, wrap = SCENARIOS[scenario]
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS).double()
    kwargs = dict(hyperparameters)
    if taskbalance.method_info(method).family == "gradient":
        kwargs["gradients"] = level
    balancer = taskbalance.make(method, TASKS, **kwargs)
    runner: torch.nn.Module = model
    if distributed:
        distribute(balancer)
        if wrap == "plain":
            broadcast_parameters(model)
        else:
            runner = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads, weights = [], []
    for step in range(STEPS):
        x, y = _batch(step, shard)
        optimizer.zero_grad(set_to_none=True)
        if wrap == "no_sync" and distributed:
            with runner.no_sync():  # type: ignore[operator]
                z, losses = _losses(runner, x, y)
                record = balancer.backward(losses, shared=model.trunk.parameters(), features=z)
        else:
            z, losses = _losses(runner, x, y)
            record = balancer.backward(losses, shared=model.trunk.parameters(), features=z)
            if distributed and wrap == "plain" and balancer.info.family == "loss":
                all_reduce_gradients(model.parameters())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        weights.append(record.weights.clone())
        optimizer.step()
    return {
        "grads": grads,
        "weights": weights,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "state": {k: v for k, v in balancer.state_dict().items() if isinstance(v, torch.Tensor)},
    }


def _mismatched_tasks(rank: int) -> str:
    """Rank 1 leaves task 'c' out; with check_tasks=True every rank must raise (none may hang)."""
    balancer = taskbalance.make("ema", TASKS)
    balancer.set_reducer(DistributedReducer(check_tasks=True))
    model = ToyMultiTask(TASKS).double()
    x, y = _batch(0, slice(rank * PER_RANK, (rank + 1) * PER_RANK))
    _, losses = _losses(model, x, y)
    if rank == 1:
        del losses["c"]
    try:
        balancer.backward(losses)
    except RuntimeError as error:
        return str(error)
    return "no error"


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        results: dict[str, Any] = {name: _train(name, True, shard) for name in SCENARIOS}
        results["mismatch"] = _mismatched_tasks(rank)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    directory: Path = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(directory / "store"), str(directory)), nprocs=WORLD, join=True)
    return [torch.load(directory / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **TOLERANCE, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks_take_the_single_process_step_on_the_global_batch(scenario, ranks):
    reference = _train(scenario, distributed=False, shard=None)
    for rank in ranks:
        got = rank[scenario]
        for step in range(STEPS):
            _assert_close(got["grads"][step], reference["grads"][step])
            torch.testing.assert_close(got["weights"][step], reference["weights"][step], **TOLERANCE)
        _assert_close(got["params"], reference["params"])
        _assert_close(got["state"], reference["state"])


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_rank_keeps_a_bit_identical_state_and_model(scenario, ranks):
    first, second = ranks[0][scenario], ranks[1][scenario]
    for key in ("params", "state"):
        assert first[key].keys() == second[key].keys()
        for name in first[key]:
            assert torch.equal(first[key][name], second[key][name]), (key, name)
    for a, b in zip(first["weights"], second["weights"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_ranks_passing_different_tasks_all_raise_when_checked(ranks):
    for rank in ranks:
        assert "'c'" in rank["mismatch"] and "same tasks" in rank["mismatch"]


def test_the_reducer_needs_an_initialised_process_group():
    if dist.is_initialized():  # pragma: no cover - the test process never initialises one
        dist.destroy_process_group()
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedReducer()
