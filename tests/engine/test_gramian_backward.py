"""How the Gramian engine gets its per-task gradients: one batched backward (a loop of ``k`` where chosen), to
the layers' outputs, with no weight gradient of a B-side layer formed; the cost model picks B-side or direct
per layer; the update is assembled per layer from the step, without any backward."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from taskbalance.gramian import GramianEngine, embedding_costs, linear_costs
from taskbalance.jacobian import parameter_jacobian

K = 3


class CountBackwards:
    """Stands in for autograd's engine and counts its backward runs (``torch.autograd.grad`` and the lean
    batched call both go through ``Variable._execution_engine.run_backward``)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.runs = 0

    def run_backward(self, *args: Any, **kwargs: Any) -> Any:
        self.runs += 1
        return self.engine.run_backward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


class ComputedShapes(TorchDispatchMode):
    """Records the output shapes of every operation that computes (views left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, Tensor):
                    self.shapes.append(tuple(o.shape))
        return out


def mlp_step(form: str, batching: str):
    """A two-layer trunk whose weights (13 × 7, 11 × 13) have sizes no other tensor of the step has."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 11), nn.Tanh())
    heads = [nn.Linear(11, 1) for _ in range(K)]
    x = torch.randn(5, 7)

    def roots() -> Tensor:
        z = trunk(x)
        return torch.stack([(h(z).squeeze(-1) - i).pow(2).mean() for i, h in enumerate(heads)])

    return trunk, heads, roots, GramianEngine(form=form, batching=batching)


WEIGHT_SIZES = {13 * 7, 11 * 13, K * 13 * 7, K * 11 * 13}  # one task's weight gradient, or all k at once


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("form", ["b_side", "direct"])
def test_one_batched_backward_and_no_weight_gradient_of_a_b_side_layer(form, batching, monkeypatch):
    """vmap: one backward for every task, layer and head at once; loop: one per task. A B-side layer's
    weight gradient is never formed (no operation outputs a tensor of its size, per task or for all tasks);
    a direct-form layer's is (the control: the check can see them)."""
    trunk, heads, roots_of, engine = mlp_step(form, batching)
    shared = list(trunk.parameters())
    roots = roots_of()
    counter = CountBackwards(torch.autograd.Variable._execution_engine)
    monkeypatch.setattr(torch.autograd.Variable, "_execution_engine", counter)
    with ComputedShapes() as computed:
        step = engine.gramian(roots, shared)
    monkeypatch.undo()
    assert counter.runs == (1 if batching == "vmap" else K)
    assert [layer.form for layer in step.layers] == [form, form]
    assert len(step.heads) == 2 * K  # the heads' per-task gradients came out of the same backward
    weight_sized = [s for s in computed.shapes if torch.Size(s).numel() in WEIGHT_SIZES]
    if form == "b_side":
        assert weight_sized == []
    else:
        assert weight_sized


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("form", ["b_side", "direct"])
def test_the_update_is_assembled_from_the_step_without_a_backward(form, batching, monkeypatch):
    trunk, heads, roots_of, engine = mlp_step(form, batching)
    shared = list(trunk.parameters())
    every = [*shared, *[p for h in heads for p in h.parameters()]]
    jacobian = parameter_jacobian(roots_of(), every)
    step = engine.gramian(roots_of(), shared)
    counter = CountBackwards(torch.autograd.Variable._execution_engine)
    monkeypatch.setattr(torch.autograd.Variable, "_execution_engine", counter)
    weights = torch.tensor([0.7, -0.2, 1.3])
    engine.apply(step, weights, weights, shared)
    monkeypatch.undo()
    assert counter.runs == 0
    update = torch.cat([p.grad.reshape(-1) for p in every])
    torch.testing.assert_close(update, weights @ jacobian, rtol=1e-5, atol=1e-7)


class Mixed(nn.Module):
    """A wide layer (B-side: R = 8 rows against 200 × 200 weights), a narrow one (direct: 4 × 4 weights) and
    an embedding, all in one step."""

    def __init__(self, vocabulary: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, 200)
        self.wide = nn.Linear(200, 200)
        self.squeeze = nn.Linear(200, 4)
        self.narrow = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.narrow(torch.tanh(self.squeeze(torch.tanh(self.wide(self.embed(x)))))))


@pytest.mark.parametrize(("vocabulary", "embedding_form"), [(5000, "b_side"), (3, "direct")])
def test_the_cost_model_chooses_per_layer_in_one_step(vocabulary, embedding_form):
    torch.manual_seed(0)
    model = Mixed(vocabulary).double()
    heads = [nn.Linear(4, 1).double() for _ in range(K)]
    x = torch.randint(0, vocabulary, (8,))
    shared = list(model.parameters())

    def roots() -> Tensor:
        z = model(x)
        return torch.stack([(h(z).squeeze(-1) - i).pow(2).mean() for i, h in enumerate(heads)])

    with ComputedShapes() as computed:
        step = GramianEngine().gramian(roots(), shared)
    forms = {layer.group.weight.shape: layer.form for layer in step.layers}  # type: ignore[union-attr]
    b_side_sizes = {n * p.numel() for n in (1, K) for layer in step.layers if layer.form == "b_side"
                    for p in (layer.group.weight, layer.group.bias) if p is not None and p.dim() == 2}
    assert not [s for s in computed.shapes if torch.Size(s).numel() in b_side_sizes]  # no weight gradient

    def cheaper(costs: tuple[int, int]) -> str:
        return "b_side" if costs[0] <= costs[1] else "direct"

    assert forms[(200, 200)] == cheaper(linear_costs(8, 200, 200, K)) == "b_side"
    assert forms[(4, 200)] == cheaper(linear_costs(8, 200, 4, K))
    assert forms[(4, 4)] == cheaper(linear_costs(8, 4, 4, K)) == "direct"
    assert forms[(vocabulary, 200)] == cheaper(embedding_costs(8, vocabulary, 200, K)) == embedding_form
    jacobian = parameter_jacobian(roots(), shared)
    torch.testing.assert_close(step.gramian, jacobian @ jacobian.T, rtol=1e-10, atol=1e-14)
