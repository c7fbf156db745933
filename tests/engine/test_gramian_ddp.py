"""Data parallelism: on two gloo ranks (CPU), every Gramian-sufficient method takes the same steps through the
Gramian engine as through the Jacobian path (weights, every ``.grad``, the balancer's state), on the MLP, CNN,
embedding + LayerNorm and BatchNorm models, in float64 and float32; and the Gramian the engine forms is the
global batch's, cross-rank terms included. One spawn of two ranks runs every case (starting processes is the
slow part); the parent compares."""

from __future__ import annotations

import copy
import datetime
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_gramian_engine import (
    FLOOR,
    MODELS,
    TASKS,
    TOLERANCE,
    ZERO_IN_EXACT_ARITHMETIC,
    gramian_methods,
    losses_of,
    make_batch,
    make_model,
    relative,
    shared_of,
)
from torch import nn

import taskbalance
from taskbalance.distributed import distribute
from taskbalance.gramian import GramianEngine
from taskbalance.jacobian import parameter_jacobian

WORLD = 2
STEPS = 2
DTYPES = {"f64": torch.float64, "f32": torch.float32}
METHODS = gramian_methods()


def _shard(model_name: str, dtype: torch.dtype, seed: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_batch(model_name, dtype, seed)
    half = (x.shape[0] + 1) // 2
    part = slice(0, half) if rank == 0 else slice(half, None)
    return x[part], y[part]


def _run(method: str, engine: str, model: nn.Module, model_name: str, dtype: torch.dtype, rank: int
         ) -> dict[str, Any]:
    torch.manual_seed(123)  # randomised methods draw the same numbers on both paths and both ranks
    balancer = taskbalance.make(method, TASKS, gradients="parameters", engine=engine)
    distribute(balancer)
    optimizer = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.05)
    weights, grads = [], []
    before = _GRAMIAN_RUNS[0]
    for seed in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        x, y = _shard(model_name, dtype, seed, rank)
        record = balancer.backward(losses_of(model, x, y), shared=shared_of(model))
        weights.append(record.weights.clone())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
        balancer.end_epoch()
    state = {k: v for k, v in balancer.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}
    runs = torch.tensor(_GRAMIAN_RUNS[0] - before)
    return {"weights": weights, "grads": grads, "state": state, "gramian_runs": runs}


def _cross_rank_gramian(rank: int) -> dict[str, torch.Tensor]:
    """The Gramian the balancer records under the reducer, the global batch's ``J Jᵀ`` (``J`` the rank mean
    of the per-rank Jacobians), and the rank mean of the per-rank Gramians (what dropping the cross-rank terms
    would give)."""
    model = make_model("mlp", torch.float64)
    x, y = _shard("mlp", torch.float64, 0, rank)
    balancer = taskbalance.make("mgda", TASKS, engine="gramian")
    balancer.record_gramian = True
    distribute(balancer)
    record = balancer.backward(losses_of(model, x, y), shared=shared_of(model))
    local = parameter_jacobian(torch.stack(list(losses_of(model, x, y).values())), shared_of(model))
    local_gramian = local @ local.T
    dist.all_reduce(local, op=dist.ReduceOp.SUM)
    dist.all_reduce(local_gramian, op=dist.ReduceOp.SUM)
    global_jacobian = local / WORLD
    return {
        "recorded": record.extras["gramian"],
        "global": global_jacobian @ global_jacobian.T,
        "mean_of_local": local_gramian / WORLD,
    }


_GRAMIAN_RUNS = [0]


def _count_gramian_runs() -> None:
    """Count the Gramian engine's runs in this (worker) process."""
    gramian = GramianEngine.gramian

    def counting(self: GramianEngine, *args: Any, **kwargs: Any) -> Any:
        _GRAMIAN_RUNS[0] += 1
        return gramian(self, *args, **kwargs)

    GramianEngine.gramian = counting  # type: ignore[method-assign]


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    _count_gramian_runs()
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        results: dict[str, Any] = {"cross_rank": _cross_rank_gramian(rank)}
        for method in METHODS:
            for model_name in MODELS:
                for dtype_name, dtype in DTYPES.items():
                    model = make_model(model_name, dtype)
                    twin = copy.deepcopy(model)
                    results[f"{method}/{model_name}/{dtype_name}"] = {
                        "jacobian": _run(method, "jacobian", model, model_name, dtype, rank),
                        "gramian": _run(method, "gramian", twin, model_name, dtype, rank),
                    }
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    directory: Path = tmp_path_factory.mktemp("gramian_ddp")
    mp.spawn(_worker, args=(str(directory / "store"), str(directory)), nprocs=WORLD, join=True)
    return [torch.load(directory / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_every_rank_takes_the_jacobian_paths_step_through_the_gramian_engine(method, model_name, dtype_name,
                                                                             ranks):
    dtype = DTYPES[dtype_name]
    tolerance = TOLERANCE[dtype]
    for rank in ranks:
        case = rank[f"{method}/{model_name}/{dtype_name}"]
        jacobian, gramian = case["jacobian"], case["gramian"]
        assert (int(jacobian["gramian_runs"]), int(gramian["gramian_runs"])) == (0, STEPS)
        for got, expected in zip(gramian["weights"], jacobian["weights"], strict=True):
            assert relative(got, expected) < tolerance, (got, expected)
        for grads_g, grads_j in zip(gramian["grads"], jacobian["grads"], strict=True):
            assert grads_g.keys() == grads_j.keys() and grads_j
            scale = max(float(g.abs().max()) for g in grads_j.values())
            for name, expected in grads_j.items():
                own = float(expected.abs().max())
                error = float((grads_g[name] - expected).abs().max())
                floor = 1.0 if name in ZERO_IN_EXACT_ARITHMETIC else FLOOR[dtype]
                assert error <= tolerance * max(own, floor * scale), (name, own / scale, error / scale)
        assert gramian["state"].keys() == jacobian["state"].keys()
        for name, expected in jacobian["state"].items():
            assert relative(gramian["state"][name], expected) < tolerance, name


@pytest.mark.slow
def test_the_gramian_is_the_global_batchs_cross_rank_terms_included(ranks):
    for rank in ranks:
        cross = rank["cross_rank"]
        torch.testing.assert_close(cross["recorded"], cross["global"], rtol=1e-10, atol=1e-14)
        # the cross-rank terms matter: the mean of the per-rank Gramians is far from it
        assert relative(cross["mean_of_local"], cross["global"]) > 1e-2
    torch.testing.assert_close(ranks[0]["cross_rank"]["recorded"], ranks[1]["cross_rank"]["recorded"],
                               rtol=0, atol=0)
