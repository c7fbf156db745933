"""Loop or vmap per graph shape: timed over the first steps, the faster kept, a failing vmap remembered as the
loop; both give the same per-task gradients (Jacobian path and balancer steps)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import taskbalance
from taskbalance.batching import TRIALS, BatchingChoice, preferred_mode
from taskbalance.jacobian import batched_jacobian


def test_the_faster_mode_is_kept_after_the_trials():
    choice = BatchingChoice("timed")
    calls: list[str] = []

    def call(mode: str, trial: bool) -> str:
        calls.append(mode)
        if mode == "vmap":
            time.sleep(0.02)
        return mode

    like = torch.zeros(1)
    for _ in range(2 * TRIALS):
        choice.run("shape", call, like)
    assert sorted(calls) == ["loop"] * TRIALS + ["vmap"] * TRIALS
    assert choice.chosen == {"shape": "loop"}
    calls.clear()
    assert [choice.run("shape", call, like) for _ in range(3)] == ["loop"] * 3
    assert calls == ["loop"] * 3


def test_a_vmap_that_raises_is_remembered_as_the_loop():
    choice = BatchingChoice("vmap")

    def call(mode: str, trial: bool) -> str:
        if mode == "vmap":
            raise RuntimeError("Batching rule not implemented for aten::something")
        return mode

    assert choice.run("shape", call, torch.zeros(1)) == "loop"
    assert choice.chosen == {"shape": "loop"}


def test_an_error_of_the_callers_is_raised_not_taken_for_a_missing_batching_rule():
    choice = BatchingChoice("vmap")

    def call(mode: str, trial: bool) -> str:
        raise RuntimeError("Trying to backward through the graph a second time")

    with pytest.raises(RuntimeError, match="second time"):
        choice.run("shape", call, torch.zeros(1), lambda error: "second time" in str(error))


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="batching must be"):
        BatchingChoice("sometimes")  # type: ignore[arg-type]


def _cnn_losses(seed: int) -> tuple[nn.Module, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    x = torch.randn(6, 2, 6, 6)
    z = trunk(x)
    losses = torch.stack([z[:, i].pow(2).mean() for i in range(3)])
    return trunk, losses, list(trunk.parameters())


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_loop_and_vmap_give_the_same_jacobian(mode):
    _, losses, shared = _cnn_losses(0)
    expected, _ = batched_jacobian(losses, shared)
    got, unreached = batched_jacobian(losses, shared, batching=BatchingChoice(mode))
    assert unreached == []
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_the_jacobian_path_loops_over_tasks_for_a_convolution_on_cpu_and_vmaps_an_mlp():
    balancer = taskbalance.make("mgda", ["a", "b", "c"], engine="jacobian")
    for seed in range(3):
        _, losses, shared = _cnn_losses(seed)
        balancer.backward(dict(zip("abc", losses, strict=True)), shared=shared)
    assert list(balancer._batching.chosen.values()) == ["loop"]
    mlp = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    z = mlp(torch.randn(5, 4))
    balancer.backward({t: z[:, i].pow(2).mean() for i, t in enumerate("abc")}, shared=list(mlp.parameters()))
    assert sorted(balancer._batching.chosen.values()) == ["loop", "vmap"]


def test_the_rule_is_deterministic_so_resumed_runs_stay_bit_exact():
    """Two balancers fed the same steps choose the same mode at every step (no clock involved)."""
    first, second = BatchingChoice(), BatchingChoice()
    _, losses, _ = _cnn_losses(0)
    picks = [c.run("k", lambda mode, trial: mode, losses, preferred=lambda: preferred_mode(losses))
             for c in (first, second) for _ in range(3)]
    assert picks == ["loop"] * 6


class _NoVmapBackward(torch.autograd.Function):
    """Identity whose backward reads a host value: impossible under vmap (raises there), fine in a loop."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        float(grad.sum())  # raises under vmap: the batching fallback must still have the whole graph
        return grad


class _Trunk(nn.Module):
    def __init__(self, guard: bool) -> None:
        super().__init__()
        self.guard = guard
        self.first, self.second = nn.Linear(4, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.first(x))
        return torch.tanh(self.second(_NoVmapBackward.apply(hidden) if self.guard else hidden))


@pytest.mark.parametrize("engine", ["gramian", "jacobian"])
def test_a_vmap_failing_deep_in_the_backward_falls_back_to_the_loop_on_the_same_step(engine):
    # The vmap pass frees the upper layers' saved tensors before it fails in the lower one; the fallback loop
    # must still find them (an unproven shape key keeps the graph). The guard is an identity, so the step must
    # equal the unguarded model's.
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))

    def step(guard: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        trunk, heads = _Trunk(guard), nn.ModuleList(nn.Linear(8, 1) for _ in range(3))
        balancer = taskbalance.make("mgda", list("abc"), engine=engine)
        for _ in range(2):  # the second step reuses the remembered mode of the shape
            trunk.zero_grad()
            z = trunk(x)
            losses = {t: head(z).pow(2).mean() for t, head in zip("abc", heads, strict=True)}
            balancer.backward(losses, shared=trunk.parameters())
        return [p.grad.clone() for p in trunk.parameters()]

    for guarded, plain in zip(step(True), step(False), strict=True):
        torch.testing.assert_close(guarded, plain)


def test_batches_of_changing_size_share_one_key_so_only_the_first_step_keeps_the_graph(monkeypatch):
    """Graph models change their batch's node and edge counts every step. The Gramian engine's batching key is
    the model's structure (the shared layers' shapes), not the data's, so the graph-keeping first vmap of a
    key (the loop fallback's insurance) happens once, not on every step. (The Jacobian path keeps the graph
    on every step anyway: the heads' backward follows.)"""
    from taskbalance import gramian

    retained: list[bool] = []
    real = gramian.batched_vjp

    def spy(roots, inputs, retain_graph, **options):
        retained.append(retain_graph)
        return real(roots, inputs, retain_graph, **options)

    monkeypatch.setattr(gramian, "batched_vjp", spy)
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))
    balancer = taskbalance.make("mgda", list("abc"), engine="gramian")
    for rows in (5, 9, 7, 12):
        z = trunk(torch.randn(rows, 4))
        balancer.backward({t: h(z).pow(2).mean() for t, h in zip("abc", heads, strict=True)},
                          shared=trunk.parameters())
    assert retained == [True, False, False, False]
