"""Inputs both engines must treat the same way: a parameter listed twice in ``shared=`` counts once, and the
Gramian engine is refused where it would not run (feature-level gradients) instead of being ignored."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import taskbalance

TASKS = ["a", "b", "c"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "trunk": nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh()),
        "heads": nn.ModuleList([nn.Linear(8, 1) for _ in TASKS]),
    })
    return model.double()


def _losses(model: nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(10, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(10, 3, generator=generator, dtype=torch.float64)
    z = model["trunk"](x)
    return {t: ((model["heads"][i](z).squeeze(-1) - y[:, i]) ** 2).mean() for i, t in enumerate(TASKS)}


@pytest.mark.parametrize("engine", ["jacobian", "gramian"])
@pytest.mark.parametrize("method", ["mgda", "upgrad", "pcgrad"])
def test_a_parameter_listed_twice_in_shared_counts_once(method, engine):
    model = _model()
    twin = copy.deepcopy(model)
    shared = list(model["trunk"].parameters())
    listed_twice = [*twin["trunk"].parameters(), twin["trunk"][0].weight]
    reference = taskbalance.make(method, TASKS, engine=engine).backward(_losses(model), shared=shared)
    record = taskbalance.make(method, TASKS, engine=engine).backward(_losses(twin), shared=listed_twice)
    torch.testing.assert_close(record.weights, reference.weights, rtol=1e-10, atol=1e-12)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)


def test_the_gramian_engine_with_feature_level_gradients_is_refused():
    with pytest.raises(ValueError, match="gradients='parameters'"):
        taskbalance.make("mgda", TASKS, gradients="features", engine="gramian")
    taskbalance.make("mgda", TASKS, gradients="features", engine="auto")  # the default is fine
