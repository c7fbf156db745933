"""How the Gramian engine holds per-task gradients: convolutions in the loop mode take theirs straight from
autograd (each task's output gradients are freed as autograd goes, never held for every task at once), and
small per-task gradients are packed side by side, large ones kept apart, each counted exactly once."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from taskbalance import gramian
from taskbalance.gramian import GramianEngine
from taskbalance.jacobian import parameter_jacobian

K = 3


def relative(got: Tensor, expected: Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


def check_against_jacobian(roots_of, shared: list[Tensor], engine: GramianEngine, tolerance: float) -> None:
    jacobian = parameter_jacobian(roots_of(), shared).to(torch.float64)
    weights = torch.tensor([0.7, -0.2, 1.3], dtype=shared[0].dtype)
    step = engine.gramian(roots_of(), shared)
    assert relative(step.gramian, jacobian @ jacobian.T) < tolerance
    for p in shared:
        p.grad = None
    engine.apply(step, weights, weights, shared)
    update = torch.cat([p.grad.reshape(-1) for p in shared]).to(torch.float64)
    assert relative(update, weights.to(torch.float64) @ jacobian) < tolerance


class TwiceConv(nn.Module):
    """One convolution applied twice (its uses share the weight), a second one, pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 5, 3, stride=2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.c1(torch.tanh(self.c1(x))))
        return torch.tanh(self.c2(h)).mean((2, 3))


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_a_convolution_called_twice_is_exact_in_both_batching_modes(batching):
    torch.manual_seed(0)
    model = TwiceConv().double()
    heads = [nn.Linear(5, 1).double() for _ in range(K)]
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)

    def roots() -> Tensor:
        z = model(x)
        return torch.stack([(h(z).squeeze(-1) - i).pow(2).mean() for i, h in enumerate(heads)])

    check_against_jacobian(roots, list(model.parameters()), GramianEngine(batching=batching), 1e-10)


def test_a_layer_with_a_large_weight_and_a_small_bias_counts_each_once():
    """The weight (over the packing limit) is kept apart, the bias packed: the update holds each once."""
    torch.manual_seed(0)
    width = 300
    assert width * width > gramian._PACK_LIMIT >= width
    layer = nn.Linear(width, width).double()
    heads = [nn.Linear(width, 1).double() for _ in range(K)]
    x = torch.randn(700, width, dtype=torch.float64)

    def roots() -> Tensor:
        z = torch.tanh(layer(x))
        return torch.stack([h(z).pow(2).mean() for h in heads])

    engine = GramianEngine(form="direct")
    check_against_jacobian(roots, list(layer.parameters()), engine, 1e-10)
    step = engine.gramian(roots(), list(layer.parameters()))
    assert [p for p, _ in step.large] == [layer.weight]
    assert [p for pack in step.packs for p in pack.parameters[: pack.shared]] == [layer.bias]


def test_small_per_task_gradients_are_packed_into_one_matrix():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
    heads = [nn.Linear(8, 1) for _ in range(K)]
    z = trunk(torch.randn(64, 4))
    roots = torch.stack([h(z).pow(2).mean() for h in heads])
    step = GramianEngine().gramian(roots, list(trunk.parameters()))
    assert [layer.form for layer in step.layers] == ["direct", "direct"]
    (pack,) = step.packs  # the shared parameters' rows, then the heads'
    width = sum(p.numel() for p in trunk.parameters())
    assert pack.rows.shape == (K, width + K * 9) and pack.width == width and pack.shared == 4
    assert {id(p) for p in pack.parameters[:4]} == {id(p) for p in trunk.parameters()}
    assert {id(p) for p in pack.parameters[4:]} == {id(p) for h in heads for p in h.parameters()}
    assert step.large == [] and step.head_large == []


def peak_bytes(run) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


def test_convolutions_in_the_loop_mode_never_hold_every_tasks_output_gradients():
    """The per-task output gradients of every convolution for every task (what a backward to the layers'
    outputs would return at once) are far more than the engine's peak: it takes the convolutions' per-task
    weight gradients from autograd, which frees each output gradient once used."""
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    heads = [nn.Linear(16, 1) for _ in range(K)]
    x = torch.randn(16, 3, 32, 32)
    shared = list(trunk.parameters())
    engine = GramianEngine(batching="loop")

    def step() -> None:
        z = trunk(x)
        roots = torch.stack([h(z).pow(2).mean() for h in heads])
        engine.apply(engine.gramian(roots, shared), torch.ones(K), torch.ones(K), shared)

    step()  # warm-up
    activation = 16 * 16 * 32 * 32 * 4  # bytes of one convolution's output
    held_at_once = K * 2 * activation  # every task's output gradients of both convolutions
    forward = peak_bytes(lambda: trunk(x))
    assert peak_bytes(step) < forward + held_at_once / 2


class OddLinear(nn.Module):
    """Linear uses the cost model must size right: a bare weight used as ``x @ W`` (transposed), a 3-d input
    (rows = batch × positions), and a weight used once with its bias and once without (it falls back)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 20) / 3)
        self.seq = nn.Linear(20, 12)
        self.l = nn.Linear(12, 12)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(x @ self.w)  # (N, 5, 20)
        h = torch.tanh(self.seq(h))  # 3-d input
        h = torch.tanh(self.l(h)) + torch.tanh(nn.functional.linear(h, self.l.weight))
        return h.mean(1)


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("form", ["auto", "b_side", "direct"])
def test_transposed_three_d_and_split_linear_uses_are_exact(form, batching):
    torch.manual_seed(0)
    model = OddLinear().double()
    heads = [nn.Linear(12, 1).double() for _ in range(K)]
    x = torch.randn(7, 5, 6, dtype=torch.float64)

    def roots() -> Tensor:
        z = model(x)
        return torch.stack([(h(z).squeeze(-1) - i).pow(2).mean() for i, h in enumerate(heads)])

    engine = GramianEngine(form=form, batching=batching)
    check_against_jacobian(roots, list(model.parameters()), engine, 1e-10)
    step = engine.gramian(roots(), list(model.parameters()))
    assert step.fallback == [model.l.weight]
    if form != "auto":
        assert {layer.form for layer in step.layers if layer.group.weight is not None} == {form}


def test_the_packed_update_adds_into_existing_gradients_and_never_shares_one_between_steps():
    """A parameter without ``.grad`` takes its view of the step's update; a second step adds into it (gradient
    accumulation), and the first step's update tensor is not written by the second."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
    heads = [nn.Linear(8, 1) for _ in range(K)]
    shared, head_parameters = list(trunk.parameters()), [p for h in heads for p in h.parameters()]
    x = torch.randn(16, 4)

    def roots() -> Tensor:
        z = trunk(x)
        return torch.stack([h(z).pow(2).mean() for h in heads])

    weights = torch.tensor([0.7, -0.2, 1.3])
    reference = parameter_jacobian(roots(), [*shared, *head_parameters])
    engine = GramianEngine()
    engine.apply(engine.gramian(roots(), shared), weights, weights, shared)
    first = [p.grad for p in [*shared, *head_parameters]]
    snapshot = [g.clone() for g in first]
    engine.apply(engine.gramian(roots(), shared), weights, weights, shared)
    update = torch.cat([p.grad.reshape(-1) for p in [*shared, *head_parameters]])
    torch.testing.assert_close(update, 2 * (weights @ reference))
    assert all(p.grad is g for p, g in zip([*shared, *head_parameters], first, strict=True))  # added in place
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in snapshot]), weights @ reference)


@pytest.mark.parametrize("one_op", [True, False], ids=["chunk_cat", "cat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_side_by_side_equals_flattening_and_concatenating_every_piece(dtype, one_op, monkeypatch):
    monkeypatch.setattr(gramian, "_CHUNK_CAT", one_op and gramian._CHUNK_CAT)
    rows = [torch.randn(K, 4, 5, dtype=dtype), torch.randn(K, 5, dtype=dtype),
            torch.randn(K, 6, 4, dtype=dtype).transpose(1, 2), torch.randn(K, 1, 2, 3, dtype=dtype)]
    expected = torch.cat([r.reshape(K, -1) for r in rows], dim=1)
    assert torch.equal(gramian._side_by_side(rows, K), expected)
    with_scalar = [*rows, torch.randn(K, dtype=dtype)]  # the rows of a 0-d parameter
    assert torch.equal(gramian._side_by_side(with_scalar, K),
                       torch.cat([r.reshape(K, -1) for r in with_scalar], dim=1))
    assert torch.equal(gramian._side_by_side(rows[:1], K), rows[0].reshape(K, -1))


def test_a_zero_dimensional_shared_parameter_and_head_are_exact():
    torch.manual_seed(0)
    trunk = nn.Linear(3, 4).double()
    scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))  # a 0-d shared parameter (fallback)
    heads = [nn.Linear(4, 1).double() for _ in range(K)]
    offsets = [nn.Parameter(torch.tensor(0.1 * i, dtype=torch.float64)) for i in range(K)]  # 0-d heads
    x = torch.randn(10, 3, dtype=torch.float64)

    def roots() -> Tensor:
        z = torch.tanh(trunk(x)) * scale
        outputs = [h(z).squeeze(-1) + o for h, o in zip(heads, offsets, strict=True)]
        return torch.stack([out.pow(2).mean() for out in outputs])

    check_against_jacobian(roots, [*trunk.parameters(), scale], GramianEngine(), 1e-10)
    engine = GramianEngine()
    every = [*trunk.parameters(), scale, *[p for h in heads for p in h.parameters()], *offsets]
    jacobian = parameter_jacobian(roots(), every)
    for p in every:
        p.grad = None
    weights = torch.tensor([0.7, -0.2, 1.3], dtype=torch.float64)
    engine.apply(engine.gramian(roots(), [*trunk.parameters(), scale]), weights, weights,
                 [*trunk.parameters(), scale])
    update = torch.cat([p.grad.reshape(-1) for p in every])
    assert relative(update, weights @ jacobian) < 1e-10


@pytest.mark.parametrize("same", ["one object", "equal copies", "different", "heads their own (None)"])
def test_a_pack_of_shared_and_head_rows_applies_each_side_its_own_weights(same):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh()).double()
    heads = [nn.Linear(8, 1).double() for _ in range(K)]
    shared, head_parameters = list(trunk.parameters()), [p for h in heads for p in h.parameters()]
    x = torch.randn(16, 4, dtype=torch.float64)

    def roots() -> Tensor:
        z = trunk(x)
        return torch.stack([h(z).pow(2).mean() for h in heads])

    shared_weights = torch.tensor([0.7, -0.2, 1.3], dtype=torch.float64)
    head_weights = {"one object": shared_weights, "equal copies": shared_weights.clone(),
                    "different": torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64),
                    "heads their own (None)": None}[same]
    jacobian_shared = parameter_jacobian(roots(), shared)
    jacobian_heads = parameter_jacobian(roots(), head_parameters)
    engine = GramianEngine()
    step = engine.gramian(roots(), shared)
    (pack,) = step.packs
    assert 0 < pack.shared < len(pack.parameters)
    engine.apply(step, shared_weights, head_weights, shared)
    got_shared = torch.cat([p.grad.reshape(-1) for p in shared])
    got_heads = torch.cat([p.grad.reshape(-1) for p in head_parameters])
    assert relative(got_shared, shared_weights @ jacobian_shared) < 1e-12
    ones = torch.ones(K, dtype=torch.float64)
    expected_heads = (ones if head_weights is None else head_weights) @ jacobian_heads
    assert relative(got_heads, expected_heads) < 1e-12


@pytest.mark.parametrize("last_layers", [None, 1])
def test_heads_without_weights_take_their_own_gradients_large_heads_and_partial_gramian_included(last_layers):
    """``head_weights=None``: every head gets its own task's gradient (weight 1), whether its rows are
    packed, kept apart as a large piece, or come from the partial Gramian's ordinary backward."""
    torch.manual_seed(0)
    width = 300
    assert width * width > gramian._PACK_LIMIT
    trunk = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh()).double()
    heads = [nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)).double()
             for _ in range(K)]
    shared, head_parameters = list(trunk.parameters()), [p for h in heads for p in h.parameters()]
    x = torch.randn(6, 4, dtype=torch.float64)

    def roots() -> Tensor:
        z = trunk(x)
        return torch.stack([h(z).pow(2).mean() for h in heads])

    jacobian_heads = parameter_jacobian(roots(), head_parameters)
    engine = GramianEngine(last_layers=last_layers)
    step = engine.gramian(roots(), shared)
    if last_layers is None:
        assert {id(p) for p, _ in step.head_large} == {id(h[0].weight) for h in heads}
    engine.apply(step, torch.tensor([0.7, -0.2, 1.3], dtype=torch.float64), None, shared)
    got_heads = torch.cat([p.grad.reshape(-1) for p in head_parameters])
    assert relative(got_heads, torch.ones(K, dtype=torch.float64) @ jacobian_heads) < 1e-12
