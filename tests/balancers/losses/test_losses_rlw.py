"""RLW (Lin et al. 2022): w = softmax(z), z ~ N(0, I), from the balancer's own seeded generator."""

from __future__ import annotations

import pytest
import torch
from torchjd.scalarization import Random as ReferenceRandom

import taskbalance

TASKS = ["a", "b", "c", "d"]


def leaves(values, names=TASKS):
    return {t: torch.tensor(float(v), requires_grad=True) for t, v in zip(names, values, strict=True)}


def weights_over(balancer, steps: int) -> torch.Tensor:
    return torch.stack([balancer.backward(leaves([1.0, 2.0, 3.0, 4.0])).weights for _ in range(steps)])


def test_weights_lie_on_the_simplex_and_change_every_step():
    w = weights_over(taskbalance.make("rlw", TASKS), 50)
    assert bool((w > 0).all())
    torch.testing.assert_close(w.sum(dim=1), torch.ones(50))
    assert len({tuple(row.tolist()) for row in w}) == 50


def test_reproducible_from_the_seed_and_independent_of_the_global_rng():
    torch.manual_seed(1)
    first = weights_over(taskbalance.make("rlw", TASKS, seed=7), 10)
    torch.manual_seed(2)
    torch.randn(100)
    again = weights_over(taskbalance.make("rlw", TASKS, seed=7), 10)
    other = weights_over(taskbalance.make("rlw", TASKS, seed=8), 10)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_draws_equal_torchjd_random_under_the_same_seed():
    ours = taskbalance.make("rlw", TASKS, seed=3)
    torch.manual_seed(3)  # TorchJD's Random draws from the global generator
    reference = ReferenceRandom()
    for step in range(5):
        values = torch.tensor([1.0, 2.0, 3.0, 4.0]) * (step + 1)
        record = ours.backward(leaves(values.tolist()))
        stacked = values.clone().requires_grad_(True)
        reference(stacked).backward()
        torch.testing.assert_close(record.weights, stacked.grad)


def test_absent_tasks_are_masked_without_shifting_the_random_stream():
    full = taskbalance.make("rlw", TASKS, seed=5)
    partial = taskbalance.make("rlw", TASKS, seed=5)
    for _ in range(4):
        w_full = full.backward(leaves([1.0, 2.0, 3.0, 4.0])).weights
        w_part = partial.backward(leaves([1.0, 3.0], names=["a", "c"])).weights
        assert w_part[1] == 0 and w_part[3] == 0
        torch.testing.assert_close(w_part.sum(), torch.tensor(1.0))
        # same z: the present weights are the full weights renormalised over the present tasks
        kept = w_full[[0, 2]]
        torch.testing.assert_close(w_part[[0, 2]], kept / kept.sum())


def test_generator_state_round_trips_through_state_dict():
    balancer = taskbalance.make("rlw", TASKS, seed=11)
    weights_over(balancer, 3)
    state = balancer.state_dict()
    continued = weights_over(balancer, 3)
    resumed = taskbalance.make("rlw", TASKS, seed=11)
    resumed.load_state_dict(state)
    assert torch.equal(weights_over(resumed, 3), continued)


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seed_is_rejected(seed):
    with pytest.raises(ValueError, match="seed"):
        taskbalance.make("rlw", TASKS, seed=seed)
