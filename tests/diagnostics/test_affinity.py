"""Lookahead task affinity (Fifty et al. 2021) and the grouping search."""

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from taskbalance.data.base import MultiTaskData, Split
from taskbalance.data.tasks import Task
from taskbalance.diagnostics.affinity import (
    TaskAffinity,
    affinity_colour_limit,
    affinity_figure,
    best_partition,
    compute_task_affinity,
    grouping_score,
    plot_affinity,
    suggest_groupings,
)

TASKS = ["a", "b", "c"]


# -------------------------------------------------------------------------------------- constructed problem
class SharedRegressor(nn.Module):
    """Every parameter is shared: all tasks read the same prediction, so only their targets differ."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.trunk(x).squeeze(-1)


def constructed_batch(n: int = 64):
    """a and b have identical targets; c has the opposite target."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = 2.0 + torch.sin(x @ torch.randn(4, generator=g))
    return x, {"a": y, "b": y.clone(), "c": -y}


def losses_of(model, x, targets, tasks=TASKS):
    prediction = model(x)
    return {t: ((prediction - targets[t]) ** 2).mean() for t in tasks}


def reference_affinity(model, x, targets, lr):
    """Eq. 2 literally: copy the model, take an SGD step on task i alone, measure L_j."""
    base = {t: v.item() for t, v in losses_of(model, x, targets).items()}
    z = torch.zeros(3, 3, dtype=torch.float64)
    for i, source in enumerate(TASKS):
        copy = SharedRegressor()
        copy.load_state_dict(model.state_dict())
        grads = torch.autograd.grad(losses_of(copy, x, targets)[source], list(copy.parameters()))
        with torch.no_grad():
            for p, g in zip(copy.parameters(), grads, strict=True):
                p -= lr * g
            after = losses_of(copy, x, targets)
        for j, target in enumerate(TASKS):
            z[i, j] = 1 - after[target].item() / base[target]
    return z


def test_exact_affinity_matches_the_definition():
    model = SharedRegressor()
    x, y = constructed_batch()
    expected = reference_affinity(model, x, y, lr=0.05)
    affinity = TaskAffinity(TASKS, lr=0.05)
    step = affinity.observe(losses_of(model, x, y), shared=model.parameters(),
                            evaluate=lambda: losses_of(model, x, y))
    torch.testing.assert_close(step.double(), expected, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(affinity.matrix(), step)


def test_identical_tasks_have_high_mutual_affinity_and_opposite_task_negative():
    model = SharedRegressor()
    x, y = constructed_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    affinity = TaskAffinity(TASKS, lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        losses = losses_of(model, x, y, ["a", "b"])  # train on a and b; c is only measured
        all_losses = {**losses, "c": losses_of(model, x, y, ["c"])["c"]}
        affinity.observe(all_losses, shared=model.parameters(), evaluate=lambda: losses_of(model, x, y))
        sum(losses.values()).backward()
        optimizer.step()
    z = affinity.matrix()
    assert z[0, 1] > 0 and z[1, 0] > 0
    torch.testing.assert_close(z[0, 1], z[0, 0])  # b's loss responds to a's step exactly as a's does
    assert z[0, 2] < 0 and z[2, 0] < 0 and z[1, 2] < 0


def test_first_order_approximates_exact_for_small_steps():
    model = SharedRegressor()
    x, y = constructed_batch()
    for lr, tolerance in ((1e-2, 0.05), (1e-3, 0.005)):
        exact = TaskAffinity(TASKS, lr=lr).observe(losses_of(model, x, y), shared=model.parameters(),
                                                   evaluate=lambda: losses_of(model, x, y))
        first = TaskAffinity(TASKS, lr=lr, mode="first_order").observe(losses_of(model, x, y),
                                                                       shared=model.parameters())
        relative = ((exact - first).abs() / exact.abs().max()).max().item()
        assert relative < tolerance


def test_observe_leaves_parameters_graph_and_rng_untouched():
    model = SharedRegressor()
    x, y = constructed_batch()
    losses = losses_of(model, x, y)
    sum(losses.values()).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    model.zero_grad()

    torch.manual_seed(7)
    reference_draw = torch.rand(3)
    torch.manual_seed(7)
    losses = losses_of(model, x, y)
    TaskAffinity(TASKS, lr=0.1).observe(
        losses, shared=model.parameters(),
        evaluate=lambda: {t: v + 0 * torch.rand(()) for t, v in losses_of(model, x, y).items()},  # draws RNG
    )
    assert torch.equal(torch.rand(3), reference_draw)
    sum(losses.values()).backward()  # the training graph is still usable
    for p, b, g in zip(model.parameters(), before, expected, strict=True):
        assert torch.equal(p, b)
        assert torch.equal(p.grad, g)


def test_no_work_on_inactive_steps_and_missing_tasks():
    model = SharedRegressor()
    x, y = constructed_batch()
    calls = []

    def evaluate():
        calls.append(1)
        return losses_of(model, x, y)

    affinity = TaskAffinity(TASKS, lr=0.05, every=4)
    results = []
    for step in range(9):
        losses = losses_of(model, x, y)
        if step == 8:
            del losses["c"]
        results.append(affinity.observe(losses, shared=model.parameters(), evaluate=evaluate))
    assert [i for i, r in enumerate(results) if r is not None] == [0, 4, 8]
    assert len(calls) == 2 * (1 + 3) + (1 + 2)  # baseline + one lookahead per present task
    assert torch.isnan(results[2 * 4][2]).all() and torch.isnan(results[8][:, 2]).all()
    count = affinity.affinity_count
    assert count[0, 1].item() == 3 and count[0, 2].item() == 2


def test_resume_continues_bit_for_bit():
    x, y = constructed_batch()

    def run(model, optimizer, affinity, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            losses = losses_of(model, x, y)
            affinity.observe(losses, shared=model.parameters(), evaluate=lambda: losses_of(model, x, y))
            sum(losses.values()).backward()
            optimizer.step()

    def fresh():
        model = SharedRegressor()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, optimizer, TaskAffinity(TASKS, lr=0.05, every=2)

    straight = fresh()
    run(*straight, 8)
    first = fresh()
    run(*first, 3)
    buffer = io.BytesIO()
    torch.save([first[0].state_dict(), first[1].state_dict(), first[2].state_dict()], buffer)
    buffer.seek(0)
    states = torch.load(buffer, weights_only=True)
    resumed = fresh()
    for obj, state in zip(resumed, states, strict=True):
        obj.load_state_dict(state)
    run(*resumed, 5)
    assert torch.equal(straight[2].matrix(), resumed[2].matrix())
    assert resumed[2].step_count == 8
    for a, b in zip(straight[0].parameters(), resumed[0].parameters(), strict=True):
        assert torch.equal(a, b)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="lr"):
        TaskAffinity(TASKS, lr=0.0)
    with pytest.raises(ValueError, match="every"):
        TaskAffinity(TASKS, lr=0.1, every=0)
    with pytest.raises(ValueError, match="mode"):
        TaskAffinity(TASKS, lr=0.1, mode="second_order")
    model = SharedRegressor()
    x, y = constructed_batch()
    with pytest.raises(ValueError, match="evaluate"):
        TaskAffinity(TASKS, lr=0.1).observe(losses_of(model, x, y), shared=model.parameters())


# -------------------------------------------------------------------------------------- grouping search
def set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest):
        for i in range(len(partition)):
            yield partition[:i] + [[first] + partition[i]] + partition[i + 1:]
        yield [[first]] + partition


def brute_force_best(matrix, num_groups):
    candidates = [p for p in set_partitions(list(range(len(matrix)))) if len(p) == num_groups]
    return max(grouping_score(matrix, p) for p in candidates)


def planted(sizes, seed=0, inside=1.0, across=-0.5, noise=0.1):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    matrix = np.where(labels[:, None] == labels[None, :], inside, across)
    return matrix + noise * rng.standard_normal(matrix.shape), labels


def test_score_counts_mean_inbound_affinity_per_task():
    z = np.array([[9.0, 1.0, 2.0], [3.0, 9.0, 4.0], [5.0, 6.0, 9.0]])
    # group {0, 1, 2}: task j receives the mean of Z[i, j] over i != j
    expected = (3 + 5) / 2 + (1 + 6) / 2 + (2 + 4) / 2
    assert grouping_score(z, [[0, 1, 2]]) == pytest.approx(expected)
    assert grouping_score(z, [[0], [1], [2]]) == 0.0
    assert grouping_score(z, [[0, 2], [1]]) == pytest.approx(5 + 2)


def test_best_partition_recovers_planted_groups():
    matrix, labels = planted([3, 2, 1])
    names = [f"task{i}" for i in range(6)]
    best = best_partition(matrix, 3, names)
    expected = {tuple(names[i] for i in np.flatnonzero(labels == g)) for g in range(3)}
    assert set(best.groups) == expected
    assert best.score == pytest.approx(brute_force_best(matrix, 3))


@pytest.mark.parametrize("seed", range(4))
def test_exact_search_equals_brute_force(seed):
    matrix = np.random.default_rng(seed).standard_normal((6, 6))
    for g in range(1, 7):
        result = best_partition(matrix, g)
        assert len(result.groups) == g
        assert sorted(t for group in result.groups for t in group) == sorted(f"t{i}" for i in range(6))
        assert result.score == pytest.approx(brute_force_best(matrix, g))


def test_greedy_beyond_the_exhaustive_limit():
    matrix, labels = planted([4, 4, 3, 2], seed=3)
    best = best_partition(matrix, 4, exhaustive_limit=8)  # 13 tasks: greedy
    expected = {tuple(f"t{i}" for i in np.flatnonzero(labels == g)) for g in range(4)}
    assert set(best.groups) == expected
    random = np.random.default_rng(5).standard_normal((7, 7))
    greedy = best_partition(random, 3, exhaustive_limit=4)
    assert greedy.score <= best_partition(random, 3).score + 1e-12
    assert len(greedy.groups) == 3


def test_suggestions_and_argument_checks():
    matrix, _ = planted([2, 2])
    suggestions = suggest_groupings(torch.tensor(matrix), ["a", "b", "c", "d"], max_groups=3)
    assert [len(s.groups) for s in suggestions] == [1, 2, 3]
    assert set(suggestions[1].groups) == {("a", "b"), ("c", "d")}
    with pytest.raises(ValueError, match="num_groups"):
        best_partition(matrix, 5)
    with pytest.raises(ValueError, match="square"):
        best_partition(np.zeros((2, 3)), 1)
    nan_matrix = matrix.copy()
    nan_matrix[0, 1] = math.nan
    assert math.isfinite(best_partition(nan_matrix, 2).score)


# -------------------------------------------------------------------------------------- brief training + plot
def tiny_data(n=256):
    def split(seed, size):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(size, 6, generator=g)
        w = torch.randn(6, generator=torch.Generator().manual_seed(100))
        v = torch.randn(6, generator=torch.Generator().manual_seed(101))
        same = torch.sin(x @ w)
        mask = torch.rand(size, generator=g) < 0.8  # c is partially labelled
        labelled = torch.ones(size, dtype=torch.bool)
        targets = {"a": same, "b": same.clone(), "c": torch.sin(x @ v)}
        return Split(x, targets, {"a": labelled, "b": labelled, "c": mask})

    tasks = tuple(Task(name, "regression") for name in ("a", "b", "c"))
    return MultiTaskData("tiny", tasks, split(0, n), split(1, 32), split(2, 32))


def test_compute_task_affinity_groups_identical_tasks():
    # per-task heads start random, so early steps are noisy; 40 steps settle it (checked over 16 seeds)
    result = compute_task_affinity(tiny_data(), steps=40, every=2, batch_size=64, lr=0.3, hidden=16,
                                   layers=1)
    z = result.matrix
    assert z.shape == (3, 3) and torch.isfinite(z).all()
    assert result.steps == 40 and result.observed == 20
    assert z[0, 1] > z[0, 2] and z[1, 0] > z[1, 2]
    assert set(result.groupings[1].groups) == {("a", "b"), ("c",)}
    data = result.to_dict()
    assert data["groupings"][0]["groups"] == [["a", "b", "c"]]
    assert data["protocol"]["dataset"] == "tiny"


def test_affinity_colour_scale_leaves_the_diagonal_out():
    matrix = [[50.0, -0.5, 0.2], [0.4, 80.0, math.nan], [0.1, -0.3, 60.0]]
    assert affinity_colour_limit(matrix) == 0.5  # not 80: self-affinity would wash the cross-task cells out
    assert affinity_colour_limit([[3.0]]) == 1.0 and affinity_colour_limit([[2.0, 0.0], [0.0, 2.0]]) == 1.0
    figure = affinity_figure(matrix, TASKS, annotate=False)
    axes = figure.axes[0]
    scaled = axes.images[-1]
    assert scaled.get_clim() == (-0.5, 0.5)
    assert np.ma.getmaskarray(scaled.get_array()).diagonal().all()  # the diagonal is not on the colour scale
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())
    height = pixels.shape[0]

    def colour(i: int, j: int) -> np.ndarray:  # the pixel at the centre of cell (row i, column j)
        x, y = axes.transData.transform((j, i))
        return pixels[int(round(height - y)), int(round(x)), :3].astype(int)

    red = colour(0, 1)  # −0.5 (hurts) ends the scale: dark red, not the near-white it is on a ±80 scale
    assert red[0] - red[1] > 80 and red[1] < 40
    grey = colour(0, 0)
    assert abs(int(grey[0]) - int(grey[2])) < 5 and 150 < grey[0] < 250


def test_plot_affinity_writes_a_png(tmp_path):
    import matplotlib.image

    matrix = torch.tensor([[1.0, -0.5, math.nan], [0.2, 1.0, 0.1], [-0.3, 0.4, 1.0]])
    path = plot_affinity(matrix, TASKS, tmp_path / "plots" / "affinity.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
