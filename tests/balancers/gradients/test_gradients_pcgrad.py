"""PCGrad: no conflict left with the last task projected on, the plain sum without conflicts, seeded orders.

Also holds the helpers the other projection/stateful-method tests share: sampled Jacobians (including
degenerate ones) and the bit-exact resume check through the public ``backward()``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import pytest
import torch
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance
from taskbalance import GradientStep
from taskbalance.balancers.gradients.pcgrad import PCGrad, project_conflicting, random_orders

TASKS = ["a", "b", "c"]


# ---------------------------------------------------------------- shared helpers
def sample_jacobians(
    seed: int = 0, count: int = 12, dtype: torch.dtype = torch.float64
) -> Iterator[tuple[str, torch.Tensor]]:
    """Random Jacobians and the degenerate shapes every method must survive."""
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        k = int(torch.randint(2, 7, (), generator=g))
        p = int(torch.randint(2, 12, (), generator=g))
        scales = torch.exp(2 * torch.randn(k, 1, generator=g, dtype=dtype))
        yield f"random{i}", torch.randn(k, p, generator=g, dtype=dtype) * scales
    base = torch.randn(4, 7, generator=g, dtype=dtype)
    yield "zero_row", torch.cat([base[:2], torch.zeros(1, 7, dtype=dtype), base[2:]])
    yield "all_zero", torch.zeros(3, 5, dtype=dtype)
    yield "duplicates", torch.cat([base[:2], base[:2], base[1:2]])
    yield "collinear", torch.stack([base[0], -2.0 * base[0], 0.5 * base[0], base[1]])
    yield "opposite_pair", torch.stack([base[0], -base[0]])
    yield "wild_norms", base * torch.tensor([1e-4, 1.0, 1e3, 1e5], dtype=dtype)[:, None]
    yield "k1", base[:1]
    scales = torch.exp(torch.randn(40, 1, generator=g, dtype=dtype))
    yield "k40", torch.randn(40, 30, generator=g, dtype=dtype) * scales


def grads_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def train(model, optimizer, balancer, steps: range, *, level: str = "parameters",
          epoch_every: int = 0, backward_kwargs: Callable | None = None) -> None:
    """The public protocol on deterministic batches (batch ``i`` depends only on ``i``)."""
    for step in steps:
        x, y = toy_batch(TASKS, seed=step)
        optimizer.zero_grad(set_to_none=True)
        z, losses = toy_losses(model, x, y)
        if step % 5 == 3:  # a batch without labels for "b"
            del losses["b"]
        extra = backward_kwargs(model, x, y) if backward_kwargs else {}
        if level == "features":
            balancer.backward(losses, features=z, **extra)
        else:
            balancer.backward(losses, shared=model.trunk.parameters(), **extra)
        optimizer.step()
        if epoch_every and step % epoch_every == epoch_every - 1:
            balancer.end_epoch()


def assert_resume_bit_exact(name: str, *, level: str = "parameters", total: int = 10, cut: int = 5,
                            epoch_every: int = 0, backward_kwargs: Callable | None = None, **hyper) -> None:
    """N steps, checkpoint (model, optimizer, balancer), reload into fresh objects, continue: identical."""
    def fresh():
        torch.manual_seed(0)
        model = ToyMultiTask(TASKS)
        balancer = taskbalance.make(name, TASKS, **hyper)
        optimizer = torch.optim.Adam([*model.parameters(), *balancer.parameters()], lr=0.02)
        return model, optimizer, balancer

    options = {"level": level, "epoch_every": epoch_every, "backward_kwargs": backward_kwargs}
    model, optimizer, balancer = fresh()
    train(model, optimizer, balancer, range(total), **options)

    model2, optimizer2, balancer2 = fresh()
    train(model2, optimizer2, balancer2, range(cut), **options)
    buffer = io.BytesIO()
    torch.save({"model": model2.state_dict(), "optimizer": optimizer2.state_dict(),
                "balancer": balancer2.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    torch.manual_seed(1234)  # neither the global RNG nor construction order may matter
    model3 = ToyMultiTask(TASKS)
    balancer3 = taskbalance.make(name, TASKS, **hyper)
    balancer3.load_state_dict(saved["balancer"])
    model3.load_state_dict(saved["model"])
    optimizer3 = torch.optim.Adam([*model3.parameters(), *balancer3.parameters()], lr=0.02)
    optimizer3.load_state_dict(saved["optimizer"])
    train(model3, optimizer3, balancer3, range(cut, total), **options)

    for (key, p), p3 in zip(model.state_dict().items(), model3.state_dict().values(), strict=True):
        assert torch.equal(p, p3), key
    expected, got = balancer.state_dict(), balancer3.state_dict()
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        elif isinstance(value, dict):
            for field, entry in value.items():
                if isinstance(entry, torch.Tensor):
                    assert torch.equal(got[key][field], entry), (key, field)
                else:
                    assert got[key][field] == entry, (key, field)


def orders_for(k: int, seed: int) -> torch.Tensor:
    return random_orders(k, torch.Generator().manual_seed(seed), torch.device("cpu"))


def projected_rows(jacobian: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    orders = orders_for(jacobian.shape[0], seed)
    return project_conflicting(jacobian @ jacobian.T, orders) @ jacobian, orders


def naive_pcgrad(jacobian: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """The paper's Algorithm 1, literally: one task and one other task at a time."""
    rows = []
    for i in range(jacobian.shape[0]):
        g = jacobian[i].clone()
        for j in orders[i].tolist():
            dot = g @ jacobian[j]
            if dot < 0:
                g = g - dot / (jacobian[j] @ jacobian[j]) * jacobian[j]
        rows.append(g)
    return torch.stack(rows)


# ---------------------------------------------------------------- defining properties
@pytest.mark.parametrize("seed", range(20))
def test_two_tasks_leave_no_conflict_between_projected_rows_and_the_other_gradient(seed):
    g = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(2, 9, generator=g, dtype=torch.float64) * torch.exp(torch.randn(2, 1, generator=g,
                                                                                            dtype=torch.float64))
    rows, _ = projected_rows(jacobian, seed)
    scale = jacobian.norm(dim=1) * jacobian.norm(dim=1).flip(0)
    assert bool((rows[0] @ jacobian[1] >= -1e-12 * scale[0]) & (rows[1] @ jacobian[0] >= -1e-12 * scale[1]))


@pytest.mark.parametrize("label,jacobian", list(sample_jacobians()))
def test_projected_row_never_conflicts_with_the_last_task_it_was_projected_on(label, jacobian):
    k = jacobian.shape[0]
    rows, orders = projected_rows(jacobian)
    assert bool(torch.isfinite(rows).all())
    if k == 1:
        assert torch.equal(rows, jacobian)
        return
    last = jacobian[orders[:, -1]]
    dots = (rows * last).sum(dim=1)
    assert bool((dots >= -1e-9 * jacobian.norm(dim=1) * last.norm(dim=1)).all()), label


@pytest.mark.parametrize("label,jacobian", list(sample_jacobians(seed=1)))
def test_batched_projection_equals_the_sequential_algorithm(label, jacobian):
    rows, orders = projected_rows(jacobian, seed=3)
    atol = 1e-9 * float(jacobian.abs().max())
    torch.testing.assert_close(rows, naive_pcgrad(jacobian, orders), rtol=1e-9, atol=atol)


def test_projection_reduces_conflict_on_average():
    before, after = 0.0, 0.0
    for _, jacobian in sample_jacobians(seed=2, count=60):
        rows, _ = projected_rows(jacobian)
        norms = jacobian.norm(dim=1).clamp_min(1e-300)
        unit = jacobian / norms[:, None]
        off = ~torch.eye(jacobian.shape[0], dtype=torch.bool)
        before += float((unit @ unit.T).clamp(max=0)[off].sum())
        after += float(((rows / norms[:, None]) @ unit.T).clamp(max=0)[off].sum())
    assert after > 0.5 * before  # both are negative: at least half of the total conflict is removed


@pytest.mark.parametrize("seed", range(5))
def test_without_conflicts_the_update_is_the_plain_sum(seed):
    g = torch.Generator().manual_seed(seed)
    jacobian = torch.rand(5, 8, generator=g, dtype=torch.float64)  # non-negative rows: no pair conflicts
    aggregation = PCGrad(list("abcde"), seed=seed).aggregate(GradientStep.of(jacobian))
    torch.testing.assert_close(aggregation.weights, torch.ones(5, dtype=torch.float64))


def test_opposite_gradients_cancel_exactly_and_zero_rows_are_harmless():
    g = torch.randn(6, dtype=torch.float64)
    jacobian = torch.stack([g, -3 * g, torch.zeros(6, dtype=torch.float64)])
    aggregation = PCGrad(TASKS, seed=0).aggregate(GradientStep.of(jacobian))
    direction = aggregation.weights @ jacobian
    assert bool(torch.isfinite(aggregation.weights).all())
    torch.testing.assert_close(direction, torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)


def test_orders_are_uniform_permutations_of_the_other_tasks():
    orders = torch.cat([orders_for(4, s) for s in range(300)])
    rows = torch.arange(4).repeat(300)
    assert bool((orders != rows[:, None]).all())
    assert torch.equal(orders.sort(dim=1).values, torch.stack([torch.tensor([j for j in range(4) if j != i])
                                                               for i in rows.tolist()]))
    first = torch.bincount(orders[rows == 0, 0], minlength=4)[1:].double()
    assert float(first.min() / first.max()) > 0.6  # each of the 3 others comes first about equally often


# ---------------------------------------------------------------- the balancer
def test_seed_fixes_the_random_orders_and_global_rng_does_not_matter():
    jacobian = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))

    def weights(seed: int) -> torch.Tensor:
        return PCGrad(list("abcdef"), seed=seed).aggregate(GradientStep.of(jacobian)).weights

    torch.manual_seed(0)
    first = weights(7)
    torch.manual_seed(99)
    assert torch.equal(weights(7), first)
    assert len({tuple(weights(s).tolist()) for s in range(10)}) > 1  # 6 conflicting tasks: the order matters


def test_backward_fills_shared_grads_with_the_projected_sum_and_heads_with_plain_gradients():
    tasks = ["a", "b"]
    torch.manual_seed(0)
    model = ToyMultiTask(tasks)
    x, y = toy_batch(tasks)
    _, losses = toy_losses(model, x, y)
    shared = list(model.trunk.parameters())
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], shared, retain_graph=True)])
            for t in tasks]
    jacobian = torch.stack(rows)
    heads_expected = {
        t: torch.autograd.grad(losses[t], list(model.heads[t].parameters()), retain_graph=True) for t in tasks
    }
    expected = naive_pcgrad(jacobian, torch.tensor([[1], [0]])).sum(dim=0)  # two tasks: order-free

    record = taskbalance.make("pcgrad", tasks, seed=0).backward(losses, shared=shared)
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    for t in tasks:
        for p, g in zip(model.heads[t].parameters(), heads_expected[t], strict=True):
            torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(record.weights @ jacobian, expected, rtol=1e-5, atol=1e-7)
    assert record.extras["coefficients"].shape == (2, 2)


def test_refuses_feature_level_gradients_naming_alternatives():
    with pytest.raises(ValueError, match="not defined on feature-level.*gradients='parameters'"):
        taskbalance.make("pcgrad", TASKS, gradients="features")


def test_bad_seed_is_rejected():
    with pytest.raises(TypeError, match="seed"):
        taskbalance.make("pcgrad", TASKS, seed=1.5)


def test_resume_continues_the_random_orders_bit_for_bit():
    assert_resume_bit_exact("pcgrad", seed=3)


def test_state_dict_carries_the_generator_state():
    jacobian = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    names = list("abcde")
    balancer = PCGrad(names, seed=5)
    balancer.aggregate(GradientStep.of(jacobian))
    copy = PCGrad(names, seed=6)
    copy.load_state_dict(balancer.state_dict())
    assert torch.equal(copy.rng_state, balancer.rng_state)
    for _ in range(3):
        a = balancer.aggregate(GradientStep.of(jacobian)).weights
        assert torch.equal(copy.aggregate(GradientStep.of(jacobian)).weights, a)
