"""Gradient methods declare what they need (``needs``: the Gramian or the Jacobian); ``engine="auto"``
computes only that, ``engine="gramian"|"jacobian"`` overrides it, and a Jacobian method refuses the Gramian
engine."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import taskbalance
from taskbalance.balancers.base import GradientStep
from taskbalance.gramian import GramianEngine

TASKS = ["a", "b", "c"]

# The methods the issue names as needing only the Gramian and an update ``Jᵀw``.
GRAMIAN_SUFFICIENT = {
    "mgda", "upgrad", "dualproj", "imtl-g", "imtl", "nash-mtl", "cagrad", "aligned-mtl", "pcgrad", "gradvac",
    "tensioners", "gcs", "ol-aux", "gradnorm", "hydalearn",
}


def gradient_methods() -> list[str]:
    return [m.name for m in taskbalance.available() if m.family == "gradient" and m.feature_level != "only"]


def needs_of(name: str, **hyperparameters) -> str:
    return taskbalance.make(name, TASKS, **hyperparameters).needs


def test_every_gradient_method_declares_what_it_needs():
    declared = {name: needs_of(name) for name in gradient_methods()}
    assert set(declared.values()) <= {"gramian", "jacobian"}
    assert GRAMIAN_SUFFICIENT <= {name for name, need in declared.items() if need == "gramian"}
    assert declared["db-mtl"] == "jacobian"
    assert taskbalance.make("graddrop", TASKS, gradients="features").needs == "jacobian"
    assert needs_of("hydalearn", mode="exact", lookahead_lr=0.1) == "jacobian"  # HydaLearn exact
    assert needs_of("hydalearn", main_gradient="held_out") == "jacobian"


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in TASKS])

    def losses(self, seed: int = 0) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(10, 5, generator=g), torch.randn(10, len(TASKS), generator=g)
        z = self.trunk(x)
        heads = zip(TASKS, self.heads, strict=True)
        return {t: ((h(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, (t, h) in enumerate(heads)}


def what_ran(balancer, monkeypatch) -> tuple[int, list[bool]]:
    """Runs one step; returns how often the Gramian engine ran and, per aggregate call, whether its step held
    the Jacobian."""
    gramian_runs = [0]
    had_jacobian: list[bool] = []
    gramian = GramianEngine.gramian

    def counting(self, *args, **kwargs):
        gramian_runs[0] += 1
        return gramian(self, *args, **kwargs)

    aggregate = type(balancer).aggregate

    def seeing(self, step: GradientStep):
        # the per-task Jacobian was computed: as the joined matrix, or as its per-input blocks (the Jacobian
        # path's form for Gramian methods, which never join it)
        had_jacobian.append(step.jacobian is not None or step.blocks is not None)
        return aggregate(self, step)

    monkeypatch.setattr(GramianEngine, "gramian", counting)
    monkeypatch.setattr(type(balancer), "aggregate", seeing)
    torch.manual_seed(0)
    model = Model()
    balancer.backward(model.losses(), shared=model.trunk.parameters())
    monkeypatch.undo()
    assert all(p.grad is not None for p in model.parameters())
    return gramian_runs[0], had_jacobian


def jacobian_methods() -> list[str]:
    """Parameter-level methods that need the Jacobian and draw no extra batch (runnable with defaults)."""
    out = []
    for name in gradient_methods():
        balancer = taskbalance.make(name, TASKS)
        if balancer.needs == "jacobian" and not balancer.extra_batches:
            out.append(name)
    return out


def gramian_methods() -> list[str]:
    return [name for name in gradient_methods() if needs_of(name) == "gramian"]


@pytest.mark.parametrize("method", gramian_methods())
def test_auto_runs_a_gramian_method_on_the_gramian_engine_and_never_forms_the_jacobian(method, monkeypatch):
    runs, had_jacobian = what_ran(taskbalance.make(method, TASKS, gradients="parameters"), monkeypatch)
    assert runs == 1
    assert had_jacobian and not any(had_jacobian)


@pytest.mark.parametrize("method", gramian_methods())
def test_engine_jacobian_overrides_the_choice(method, monkeypatch):
    balancer = taskbalance.make(method, TASKS, gradients="parameters", engine="jacobian")
    runs, had_jacobian = what_ran(balancer, monkeypatch)
    assert runs == 0
    assert had_jacobian and all(had_jacobian)


@pytest.mark.parametrize("method", jacobian_methods())
def test_a_jacobian_method_gets_the_jacobian_and_refuses_the_gramian_engine(method, monkeypatch):
    runs, had_jacobian = what_ran(taskbalance.make(method, TASKS), monkeypatch)
    assert runs == 0
    assert had_jacobian and all(had_jacobian)
    with pytest.raises(ValueError, match="needs the Jacobian"):
        taskbalance.make(method, TASKS, engine="gramian")


def test_the_jacobian_methods_checked_are_the_expected_ones():
    assert {"db-mtl", "trimmed-mean"} <= set(jacobian_methods())
    assert not set(jacobian_methods()) & GRAMIAN_SUFFICIENT


def test_a_method_switched_to_the_jacobian_by_its_hyperparameters_refuses_the_gramian_engine():
    with pytest.raises(ValueError, match="needs the Jacobian"):
        taskbalance.make("hydalearn", TASKS, mode="exact", lookahead_lr=0.1, engine="gramian")
