"""ForkMerge's merge: convex combinations of state dicts, merge linearity, the greedy coefficient search."""

import math

import pytest
import torch
from toy import ToyMultiTask, toy_batch, toy_losses

from taskbalance.auxiliary.merge import check_alphas, greedy_merge_search, merge_state_dicts

TASKS = ["target", "aux"]


def trained_state(seed: int) -> dict:
    torch.manual_seed(seed)
    model = ToyMultiTask(TASKS, norm=True)
    x, y = toy_batch(TASKS, seed=seed)
    model.train()
    for _ in range(seed + 1):  # different num_batches_tracked per branch
        model(x)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_convex_combination_of_state_dicts_including_batchnorm_buffers():
    states = [trained_state(s) for s in range(3)]
    coefficients = [0.5, 0.3, 0.2]
    merged = merge_state_dicts(states, coefficients)
    assert merged.keys() == states[0].keys()
    for key, value in merged.items():
        if value.is_floating_point():  # weights, biases, BN running mean / var
            expected = sum(c * s[key].double() for c, s in zip(coefficients, states, strict=True))
            torch.testing.assert_close(value.double(), expected, atol=1e-6, rtol=1e-6)
        else:  # num_batches_tracked: integer, taken from branch 0, not averaged
            assert value.dtype == torch.long and torch.equal(value, states[0][key])
    assert "trunk.1.running_mean" in merged and "trunk.1.num_batches_tracked" in merged
    assert merged["trunk.1.num_batches_tracked"].item() == 1


def test_merge_with_one_coefficient_returns_that_state_exactly():
    states = [trained_state(s) for s in range(2)]
    merged = merge_state_dicts(states, [0.0, 1.0])
    for key, value in merged.items():
        if value.is_floating_point():
            assert torch.equal(value, states[1][key])


def test_include_and_base_select_which_entries_are_combined():
    states = [trained_state(s) for s in range(2)]
    merged = merge_state_dicts(states, [0.5, 0.5], include=lambda key: key.startswith("trunk"), base=1)
    assert torch.equal(merged["heads.aux.weight"], states[1]["heads.aux.weight"])
    expected = 0.5 * states[0]["trunk.0.weight"] + 0.5 * states[1]["trunk.0.weight"]
    torch.testing.assert_close(merged["trunk.0.weight"], expected)


@pytest.mark.parametrize(
    ("coefficients", "message"),
    [([0.5], "coefficients"), ([0.7, 0.7], "sum to 1"), ([1.5, -0.5], ">= 0"), ([math.nan, 1.0], ">= 0")],
)
def test_bad_coefficients_are_rejected(coefficients, message):
    states = [trained_state(0), trained_state(1)]
    with pytest.raises(ValueError, match=message):
        merge_state_dicts(states, coefficients)


def test_mismatched_states_are_rejected():
    states = [trained_state(0), trained_state(1)]
    del states[1]["heads.aux.bias"]
    with pytest.raises(ValueError, match="different keys"):
        merge_state_dicts(states, [0.5, 0.5])


def sgd_step(model_state: dict, weights: dict[str, float], x, y) -> dict:
    model = ToyMultiTask(TASKS, norm=True)
    model.load_state_dict(model_state)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, losses = toy_losses(model, x, y)
    optimizer.zero_grad()
    sum(w * losses[t] for t, w in weights.items()).backward()
    optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("lam", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_one_sgd_step_interpolation_equals_training_with_that_auxiliary_weight(lam):
    """θ(λ) = (1 − λ) θ(0) + λ θ(1) for one plain SGD step, BN buffers included.

    docs/method-notes.md §3.2.
    """
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in ToyMultiTask(TASKS, norm=True).state_dict().items()}
    x, y = toy_batch(TASKS, seed=5)
    target_only = sgd_step(start, {"target": 1.0, "aux": 0.0}, x, y)
    joint = sgd_step(start, {"target": 1.0, "aux": 1.0}, x, y)
    weighted = sgd_step(start, {"target": 1.0, "aux": lam}, x, y)
    merged = merge_state_dicts([target_only, joint], [1 - lam, lam])
    for key in weighted:
        torch.testing.assert_close(merged[key], weighted[key], atol=1e-6, rtol=0)


# ------------------------------------------------------------ greedy search on constructed functions
def vector_states(count: int, dim: int = 4) -> list[dict]:
    generator = torch.Generator().manual_seed(count)
    return [{"theta": torch.randn(dim, generator=generator, dtype=torch.float64)} for _ in range(count)]


def distance_score(goal: torch.Tensor):
    return lambda state: -float((state["theta"] - goal).norm())


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
def test_two_branches_pick_the_grid_coefficient_that_maximises_validation(alpha):
    """Anchor Λ̃ = 1, second branch Λ̃ = α·1: the candidates are Λ_2 = α / (1 + α) (at most one half)."""
    states = vector_states(2)
    lam = alpha / (1 + alpha)
    goal = (1 - lam) * states[0]["theta"] + lam * states[1]["theta"]
    search = greedy_merge_search(states, [1.0, 0.0], distance_score(goal))
    assert search.coefficients == pytest.approx([1 - lam, lam])
    assert search.raw == pytest.approx([1.0, alpha])
    assert search.order == [0, 1]
    assert search.score == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(search.state["theta"], goal)
    assert len(search.evaluations) == 6


def test_best_scoring_branch_is_the_anchor():
    states = vector_states(2)
    search = greedy_merge_search(states, [0.1, 0.9], distance_score(states[0]["theta"]))
    assert search.order == [1, 0]
    assert search.raw[1] == 1.0
    # branch 0 can get at most half the mass, so the closest reachable point to θ_0 is the midpoint
    assert search.coefficients == pytest.approx([0.5, 0.5])


def test_added_branches_respect_the_mass_bound():
    """The i-th added branch gets at most 1/(i+2) of the mass; reached when the score wants it all."""
    states = vector_states(4)
    score = lambda state: float(state["theta"][0])  # noqa: E731
    for b, s in enumerate(states):
        s["theta"][0] = float(b)  # later branches are more attractive
    search = greedy_merge_search(states, [3.0, 2.0, 1.0, 0.0], score)
    total = 0.0
    for i, branch in enumerate(search.order[1:]):
        total_before = sum(search.raw[b] for b in search.order[: i + 1])
        share = search.raw[branch] / (total_before + search.raw[branch])
        assert share <= 1 / (i + 2) + 1e-12
        assert share == pytest.approx(1 / (i + 2))  # every branch takes the maximum here
        total += share
    assert sum(search.coefficients) == pytest.approx(1.0)
    assert search.coefficients == pytest.approx([0.25, 0.25, 0.25, 0.25])


def test_ties_go_to_the_smaller_coefficient():
    states = vector_states(3)
    flat = greedy_merge_search(states, [0.0, 0.0, 0.0], lambda state: 1.0)
    assert flat.coefficients == [1.0, 0.0, 0.0]  # constant score: every added branch keeps λ = 0

    two = vector_states(2)
    plateau = {round(a / (1 + a), 6) for a in (0.4, 0.6)}  # two coefficients with the same, best, score

    def score(state):
        lam = float((state["theta"] - two[0]["theta"])[0] / (two[1]["theta"] - two[0]["theta"])[0])
        return 1.0 if round(lam, 6) in plateau else 0.0

    search = greedy_merge_search(two, [1.0, 0.0], score, alphas=[1.0, 0.6, 0.4, 0.2, 0.0])  # order irrelevant
    assert search.raw == pytest.approx([1.0, 0.4])


def test_nan_scores_count_as_minus_infinity():
    states = vector_states(2)
    def score(state):
        return 0.0 if torch.equal(state["theta"], states[0]["theta"]) else math.nan

    search = greedy_merge_search(states, [1.0, math.nan], score)
    assert search.order == [0, 1]
    assert search.coefficients == [1.0, 0.0]


def test_alphas_are_validated_and_sorted():
    assert check_alphas([1, 0.5, 0, 0.5]) == (0.0, 0.5, 1.0)
    with pytest.raises(ValueError):
        check_alphas([])
    with pytest.raises(ValueError):
        check_alphas([0.0, 1.5])
