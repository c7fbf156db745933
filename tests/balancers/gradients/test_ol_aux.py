"""OL-AUX: auxiliary weights move by β·cos(g_k, g_target), applied every ``update_every`` steps."""

import io

import pytest
import torch
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance as tb
from taskbalance import GradientStep

TASKS = ["main", "aligned", "opposed"]


def step(balancer, jacobian):
    aggregation = balancer.aggregate(GradientStep.of(jacobian))
    balancer.step_count += 1  # what Balancer.backward does after each step
    return aggregation


def test_aligned_auxiliary_weight_grows_and_opposed_one_shrinks():
    balancer = tb.make("ol-aux", TASKS, main="main", beta=0.5, update_every=5)
    g = torch.randn(16, generator=torch.Generator().manual_seed(0))
    jacobian = torch.stack([g, 3.0 * g, -g])
    history = [step(balancer, jacobian).weights.clone() for _ in range(10)]
    for weights in history[:4]:  # nothing is applied before the 5th step
        assert weights.tolist() == [1.0, 1.0, 1.0]
    # the 5th step already uses the updated weights: 1 ± 5 · β · |cos| = 1 ± 2.5
    torch.testing.assert_close(history[4], torch.tensor([1.0, 3.5, -1.5]))
    torch.testing.assert_close(history[9], torch.tensor([1.0, 6.0, -4.0]))
    assert balancer.accumulated.abs().max() == 0


def test_matches_a_direct_reading_of_the_rule_on_random_gradients():
    beta, every, k = 0.3, 3, 4
    balancer = tb.make("ol-aux", ["t", "a", "b", "c"], beta=beta, update_every=every)
    weights = torch.ones(k)
    accumulated = torch.zeros(k)
    generator = torch.Generator().manual_seed(4)
    for t in range(11):
        jacobian = torch.randn(k, 9, generator=generator)
        for i in range(1, k):
            accumulated[i] += beta * torch.nn.functional.cosine_similarity(jacobian[i], jacobian[0], dim=0)
        if (t + 1) % every == 0:
            weights += accumulated
            accumulated.zero_()
        torch.testing.assert_close(step(balancer, jacobian).weights, weights)


def test_dot_similarity_accumulates_inner_products():
    balancer = tb.make("ol-aux", ["t", "a"], beta=0.1, update_every=1, similarity="dot")
    jacobian = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    torch.testing.assert_close(step(balancer, jacobian).weights, torch.tensor([1.0, 1.0 + 0.1 * 3.0]))


def test_absent_auxiliary_accumulates_nothing():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    balancer = tb.make("ol-aux", TASKS, update_every=1)
    x, y = toy_batch(TASKS)
    _, losses = toy_losses(model, x, y)
    del losses["opposed"]
    record = balancer.backward(losses, shared=model.trunk.parameters())
    assert record.weights[2] == 0.0 and balancer.weights[2] == 1.0
    assert balancer.weights[1] != 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"beta": 0.0}, "beta"), ({"update_every": 0}, "update_every"), ({"update_every": 2.5}, "update_every"),
     ({"similarity": "l2"}, "similarity")],
)
def test_bad_hyperparameters_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tb.make("ol-aux", TASKS, **kwargs)


def run(model, optimizer, balancer, steps, start):
    for t in range(start, start + steps):
        x, y = toy_batch(TASKS, seed=100 + t)
        optimizer.zero_grad(set_to_none=True)
        _, losses = toy_losses(model, x, y)
        balancer.backward(losses, shared=model.trunk.parameters())
        optimizer.step()


def fresh():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    balancer = tb.make("ol-aux", TASKS, main="main", update_every=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, optimizer, balancer


def test_resume_continues_bit_for_bit():
    model, optimizer, balancer = fresh()
    run(model, optimizer, balancer, 13, 0)

    model_a, optimizer_a, balancer_a = fresh()
    run(model_a, optimizer_a, balancer_a, 7, 0)  # 7: mid-way through an accumulation window
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optimizer": optimizer_a.state_dict(),
                "balancer": balancer_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_b, optimizer_b, balancer_b = fresh()
    model_b.load_state_dict(saved["model"])
    optimizer_b.load_state_dict(saved["optimizer"])
    balancer_b.load_state_dict(saved["balancer"])
    assert balancer_b.step_count == 7
    run(model_b, optimizer_b, balancer_b, 6, 7)

    assert torch.equal(balancer_b.weights, balancer.weights)
    assert torch.equal(balancer_b.accumulated, balancer.accumulated)
    for (name, p), q in zip(model.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
