"""ForkMerge as in the paper: Algorithm 1's grid and binary search (any anchor weight), Λ-pruning, per-branch
schedulers and balancers whose state survives merges and resume, evaluation every epoch."""

from __future__ import annotations

import functools

import pytest
import torch
from test_forkmerge import TASKS, Net, Problem, evaluate, forkmerge, sgd, train_steps
from test_forkmerge_merge import distance_score, vector_states

import taskbalance as tb
from taskbalance.auxiliary import ForkMerge
from taskbalance.auxiliary.merge import greedy_merge_search, mixture_merge_search


@pytest.mark.parametrize("lam", [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
def test_two_branch_grid_reaches_every_weight_including_anchor_below_one_half(lam):
    states = vector_states(2)
    goal = (1 - lam) * states[0]["theta"] + lam * states[1]["theta"]
    search = mixture_merge_search(states, [1.0, 0.0], distance_score(goal))  # branch 0 is the anchor
    assert search.coefficients == pytest.approx([1 - lam, lam])
    assert search.score == pytest.approx(0.0, abs=1e-12)


def test_true_optimum_at_point_eight_is_found_where_the_official_greedy_stops_at_one_half():
    states = vector_states(2)
    goal = 0.2 * states[0]["theta"] + 0.8 * states[1]["theta"]  # the better-scoring branch 0 should get 0.2
    official = greedy_merge_search(states, [1.0, 0.0], distance_score(goal))
    assert official.coefficients == pytest.approx([0.5, 0.5])
    fm_default = mixture_merge_search(states, [1.0, 0.0], distance_score(goal))
    assert fm_default.coefficients == pytest.approx([0.2, 0.8])


def test_binary_search_finds_an_off_grid_optimum_of_a_unimodal_score():
    states = vector_states(2)
    goal = 0.37 * states[0]["theta"] + 0.63 * states[1]["theta"]
    search = mixture_merge_search(states, [1.0, 0.0], distance_score(goal), binary_steps=6)
    assert search.coefficients[1] == pytest.approx(0.63, abs=2 ** -7)
    assert len(search.evaluations) <= 3 + 2 * 6


def test_three_branches_mixture_search_stays_on_the_simplex_and_can_favour_the_last_branch():
    states = vector_states(3)
    goal = 0.1 * states[0]["theta"] + 0.1 * states[1]["theta"] + 0.8 * states[2]["theta"]
    search = mixture_merge_search(states, [2.0, 1.0, 0.0], distance_score(goal))
    assert sum(search.coefficients) == pytest.approx(1.0)
    assert search.coefficients[2] == pytest.approx(0.8)


def test_lambda_pruning_drops_zero_weight_branches_and_keeps_the_k_largest():
    problem = Problem.make()
    branches = [{"target": 1.0}, {"target": 1.0, "helper": 1.0}, {"target": 1.0, "noise": 1.0},
                {"target": 1.0, "helper": 1.0, "noise": 1.0}]
    fm = forkmerge(problem, branches=branches, total_steps=30, merge_every=10, eval_every=10,
                   keep_branches=2)
    assert fm.prune_after == 1
    result = fm.fit()
    first = result.history[0]
    kept = first["kept_branches"]
    coefficients = first["coefficients"]
    assert 1 <= len(kept) <= 2
    assert all(coefficients[b] > 0 for b in kept) or len(kept) == 1
    dropped = [b for b in range(4) if b not in kept]
    assert all(coefficients[d] <= min(coefficients[k] for k in kept) for d in dropped)
    assert result.branch_weights == [branches[b] | {t: 0.0 for t in TASKS if t not in branches[b]}
                                     for b in kept]
    assert all(len(h["coefficients"]) == len(kept) for h in result.history[1:])


def test_pruning_after_a_later_merge_and_zero_weight_only():
    problem = Problem.make()
    fm = forkmerge(problem, branches=[{"target": 1.0}, {"target": 1.0, "noise": 1.0}], total_steps=30,
                   merge_every=10, eval_every=10, prune_after=2)
    history = fm.fit().history
    assert "kept_branches" not in history[0]
    kept = history[1]["kept_branches"]
    assert kept == [b for b, c in enumerate(history[1]["coefficients"]) if c > 0]


def cosine(optimizer):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6)


class RecordingSteps:
    """train_steps that records the learning rate of every step and the balancer it was handed."""

    def __init__(self, problem: Problem) -> None:
        self.problem, self.lrs, self.balancers = problem, [], []

    def __call__(self, model, optimizer, weights, n, balancer=None):
        self.lrs += [optimizer.param_groups[0]["lr"]] * n
        self.balancers.append(balancer)
        if balancer is not None:
            for _ in range(n):
                out = model(self.problem.x[:16])
                losses = {t: ((out[t] - self.problem.y[t][:16]) ** 2).mean() for t in balancer.tasks}
                optimizer.zero_grad()
                balancer.backward(losses)
                optimizer.step()
        else:
            train_steps(self.problem, model, optimizer, weights, n)


def test_each_branch_steps_its_scheduler_every_epoch_and_the_schedule_survives_merges():
    problem = Problem.make()
    steps = RecordingSteps(problem)
    fm = ForkMerge(Net, sgd, steps, functools.partial(evaluate, problem), TASKS, ["target"],
                   branches=[{"target": 1.0}, {"target": 1.0, "helper": 1.0}], total_steps=12, merge_every=4,
                   steps_per_epoch=2, scheduler_factory=cosine)
    fm.fit()
    expected = [0.05 * (1 + torch.cos(torch.tensor(torch.pi * e / 6)).item()) / 2 for e in range(6)]
    per_branch = [steps.lrs[i:i + 4] for i in range(0, len(steps.lrs), 4)]  # segments × branches
    for segment in range(3):
        for branch in range(2):
            lrs = per_branch[2 * segment + branch]
            assert lrs == pytest.approx([expected[2 * segment]] * 2 + [expected[2 * segment + 1]] * 2)


def test_scheduler_state_and_balancer_state_survive_a_resume_bit_for_bit(tmp_path):
    problem = Problem.make()

    def make(directory):
        return ForkMerge(Net, sgd, RecordingSteps(problem), functools.partial(evaluate, problem), TASKS,
                         ["target"], branches=[{"target": 1.0}, {"target": 1.0, "helper": 1.0}],
                         total_steps=12, merge_every=4, steps_per_epoch=2, scheduler_factory=cosine,
                         balancer_factory=lambda w: tb.make("ema", [t for t in TASKS if w[t] > 0]),
                         checkpoint_dir=directory)

    whole = make(tmp_path / "whole").fit()
    interrupted = make(tmp_path / "resumed")
    interrupted.fit(max_segments=1)
    resumed = make(tmp_path / "resumed")
    result = resumed.fit()
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[key], value, rtol=0, atol=0)
    states = resumed.state_dict()["branches"]
    assert all(b["scheduler"]["last_epoch"] == 6 for b in states)
    assert all(b["balancer"]["_extra_state"]["step_count"] == 12 for b in states)  # carried across merges
