"""ForkMerge end to end on small problems: branches, ranking, checkpoint modes, resume, noise filtering."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from taskbalance.auxiliary import ForkMerge, ProcessExecutor, SerialExecutor, rank_auxiliaries
from taskbalance.auxiliary.pruning import TARGET_ONLY

TASKS = ["target", "helper", "noise"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread avoids thread-pool overhead (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Net(nn.Module):
    def __init__(self, inputs: int = 8, width: int = 16, norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(inputs, width)]
        if norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.Tanh())
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({t: nn.Linear(width, 1) for t in TASKS})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.trunk(x)
        return {t: head(z).squeeze(-1) for t, head in self.heads.items()}


@dataclass
class Problem:
    """Target y = f(x) + noise, few samples; ``helper`` = f(x) (clean); ``noise`` = large random labels."""

    x: Tensor
    y: dict[str, Tensor]
    x_val: Tensor
    y_val: Tensor
    batch: int = 16

    @staticmethod
    def make(seed: int = 0, train: int = 48, noise_scale: float = 4.0, target_noise: float = 0.5) -> Problem:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(8, generator=g)
        x, x_val = torch.randn(train, 8, generator=g), torch.randn(256, 8, generator=g)
        clean = torch.tanh(x @ w / 2)
        y = {
            "target": clean + target_noise * torch.randn(train, generator=g),
            "helper": clean,
            "noise": noise_scale * torch.randn(train, generator=g),
        }
        return Problem(x, y, x_val, torch.tanh(x_val @ w / 2))


def train_steps(problem: Problem, model: nn.Module, optimizer: torch.optim.Optimizer,
                weights: dict[str, float], n: int) -> None:
    for _ in range(n):
        # torch's global RNG, seeded per segment by ForkMerge
        index = torch.randint(0, problem.x.shape[0], (problem.batch,))
        out = model(problem.x[index])
        loss = sum(w * ((out[t] - problem.y[t][index]) ** 2).mean() for t, w in weights.items() if w > 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def evaluate(problem: Problem, model: nn.Module) -> float:
    with torch.no_grad():
        return -float(((model(problem.x_val)["target"] - problem.y_val) ** 2).mean())


def sgd(model: nn.Module, lr: float = 0.05, momentum: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def forkmerge(problem: Problem, **kwargs) -> ForkMerge:
    options = {"total_steps": 40, "merge_every": 10, "seed": 0}
    if "branches" not in kwargs:
        options["topk"] = (0, 2)
    options.update(kwargs)
    return ForkMerge(Net, sgd, functools.partial(train_steps, problem), functools.partial(evaluate, problem),
                     TASKS, ["target"], **options)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- defaults and configuration
def test_defaults_follow_the_official_code():
    fm = ForkMerge(Net, sgd, train_steps, evaluate, TASKS, ["target"], total_steps=200)
    assert fm.alphas == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert fm.topk == (0, 1, 2)
    # evaluation (and schedulers) every epoch, as the official code: one of 200 epochs, or steps_per_epoch
    assert fm.merge_every == 30 and fm.pruning_steps == 10 and fm.eval_every == 1 and fm.scheduler_every == 1
    assert ForkMerge(Net, sgd, train_steps, evaluate, TASKS, ["target"], total_steps=200,
                     steps_per_epoch=7).eval_every == 7
    assert fm.search == "greedy" and fm.prune_after is None
    assert (fm.branch_checkpoint, fm.reset_optimizer_on_merge, fm.merge_scope, fm.select_final) == (
        "best_ever", False, "all", "best_val")
    assert fm.needs_ranking
    one_aux = ForkMerge(Net, sgd, train_steps, evaluate, ["target", "helper"], ["target"], total_steps=10)
    assert one_aux.topk == (0, 1) and not one_aux.needs_ranking


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"topk": (0, 3)}, "topk"),
        ({"branches": [{"helper": 1.0}]}, "no positive weight"),
        ({"branches": [{"target": 1.0, "nope": 1.0}]}, "unknown"),
        ({"branches": [{"target": 1.0}], "topk": (0,)}, "not both"),
        ({"merge_every": 0}, "merge_every"),
        ({"alphas": (0.0, 2.0)}, "alphas"),
        ({"branch_checkpoint": "best"}, "branch_checkpoint"),
        ({"merge_scope": "trunk"}, "merge_scope"),
    ],
)
def test_bad_configuration_raises_clear_errors(kwargs, error):
    with pytest.raises(ValueError, match=error):
        forkmerge(Problem.make(), **kwargs)


# ---------------------------------------------------------------------- the schedule end to end
@pytest.mark.parametrize("search,lam", [("greedy", 0.6), ("official", 0.6 / 1.6)])
def test_one_sgd_step_merge_equals_training_with_the_chosen_weight(search, lam):
    """With one SGD step per segment and branches seeing the same batch, the merged model is exactly the model
    trained with auxiliary weight Λ_joint (docs/method-notes.md §3.2), through the whole ForkMerge
    machinery."""
    problem = Problem.make()
    torch.manual_seed(1)
    start = Net()
    # greedy: λ on the grid directly (Algorithm 1); official: the joint branch is added second with Λ̃ = α

    def reference(weight: float) -> Net:
        model = Net()
        model.load_state_dict(start.state_dict())
        with torch.random.fork_rng():
            torch.manual_seed(123)
            train_steps(problem, model, sgd(model), {"target": 1.0, "noise": weight}, 1)
        return model

    goal = reference(lam).state_dict()

    def closeness(model: nn.Module) -> float:  # a "validation score" that peaks at the λ we want found
        return -sum(float((v - goal[k]).norm()) for k, v in model.state_dict().items())

    fm = ForkMerge(start, sgd, functools.partial(train_steps, problem), closeness, TASKS, ["target"],
                   branches=[{"target": 1.0}, {"target": 1.0, "noise": 1.0}], total_steps=1, merge_every=1,
                   search=search)
    fm._segment_jobs = _with_seed(fm._segment_jobs, 123)  # same batch as the reference
    result = fm.fit()
    assert result.history[0]["coefficients"] == pytest.approx([1 - lam, lam])
    assert result.history[0]["task_weights"]["noise"] == pytest.approx(lam)
    for key, value in result.model.state_dict().items():
        torch.testing.assert_close(value, goal[key], atol=1e-6, rtol=0)


def _with_seed(make_jobs, seed):
    import dataclasses

    return lambda segment: [dataclasses.replace(job, seed=seed) for job in make_jobs(segment)]


def test_history_records_a_convex_merge_per_segment_and_best_validation_model():
    problem = Problem.make()
    fm = forkmerge(problem, total_steps=35, merge_every=10)
    result = fm.fit()
    assert [h["step"] for h in result.history] == [10, 20, 30, 35]
    for entry in result.history:
        assert sum(entry["coefficients"]) == pytest.approx(1.0)
        assert all(c >= 0 for c in entry["coefficients"])
        assert entry["task_weights"]["target"] == pytest.approx(1.0)
    assert result.score == max(h["score"] for h in result.history)
    assert evaluate(problem, result.model.eval()) == pytest.approx(result.score)
    last = forkmerge(problem, total_steps=35, merge_every=10, select_final="last").fit()
    assert last.score == last.history[-1]["score"]


def noise_or_helper_lambdas(auxiliary: str, noise_scale: float = 10.0) -> list[float]:
    """Auxiliary weight chosen at every merge, 3 seeds; narrow trunk, full-batch SGD (no batch noise)."""
    lambdas = []
    for seed in range(3):
        problem = Problem.make(seed=seed, train=64, noise_scale=noise_scale, target_noise=0.3)
        problem.batch = 64
        fm = ForkMerge(functools.partial(Net, width=4), functools.partial(sgd, lr=0.2),
                       functools.partial(train_steps, problem), functools.partial(evaluate, problem), TASKS,
                       ["target"], branches=[{"target": 1.0}, {"target": 1.0, auxiliary: 1.0}],
                       total_steps=60, merge_every=10, eval_every=10, seed=seed)
        lambdas += [h["task_weights"][auxiliary] for h in fm.fit().history]
    return lambdas


def test_pure_noise_auxiliary_weight_tends_to_zero():
    """λ* → 0 for an auxiliary task of pure-noise labels (the official loaders' ``noise`` task), while a
    helpful auxiliary task on the same problem keeps a large weight."""
    noise = noise_or_helper_lambdas("noise")
    helper = noise_or_helper_lambdas("helper")
    assert sum(noise) / len(noise) < 0.1
    assert sum(lam == 0.0 for lam in noise) >= 2 * len(noise) / 3
    assert sum(helper) / len(helper) > 0.5


def test_seeded_runs_are_deterministic_and_seeds_matter():
    problem = Problem.make()
    a, b = forkmerge(problem, seed=3).fit(), forkmerge(problem, seed=3).fit()
    c = forkmerge(problem, seed=4).fit()
    assert a.history == b.history and states_equal(a.model.state_dict(), b.model.state_dict())
    assert not states_equal(a.model.state_dict(), c.model.state_dict())


@pytest.mark.parametrize("mode", ["best_ever", "best_in_segment", "last"])
def test_resume_after_a_merge_equals_an_uninterrupted_run(tmp_path, mode):
    problem = Problem.make()
    options = {"topk": (0, 1, 2), "pruning_steps": 5, "eval_every": 5, "branch_checkpoint": mode,
               "merge_every": 10, "total_steps": 30}
    whole = forkmerge(problem, checkpoint_dir=tmp_path / "whole", **options).fit()

    first = forkmerge(problem, checkpoint_dir=tmp_path / "split", **options).fit(max_segments=1)
    assert not first.finished and len(first.history) == 1
    resumed = forkmerge(problem, checkpoint_dir=tmp_path / "split", **options).fit()
    assert resumed.finished
    assert resumed.history == whole.history
    assert resumed.ranking == whole.ranking
    assert states_equal(resumed.model.state_dict(), whole.model.state_dict())
    saved = torch.load(tmp_path / "split" / "forkmerge.pt", weights_only=True)
    assert saved["segment"] == 3 and not list((tmp_path / "split").glob("*.tmp"))


def test_checkpoint_of_a_different_configuration_is_refused(tmp_path):
    problem = Problem.make()
    forkmerge(problem, checkpoint_dir=tmp_path).fit(max_segments=1)
    with pytest.raises(ValueError, match="different configuration.*merge_every"):
        forkmerge(problem, checkpoint_dir=tmp_path, merge_every=5).fit()


def test_a_corrupt_checkpoint_is_reported_with_its_path_and_the_fix(tmp_path):
    from taskbalance.train import CheckpointError

    problem = Problem.make()
    forkmerge(problem, checkpoint_dir=tmp_path).fit(max_segments=1)
    (checkpoint,) = tmp_path.glob("*.pt")
    checkpoint.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=f"{checkpoint.name} is unreadable.*delete it"):
        forkmerge(problem, checkpoint_dir=tmp_path).fit()


# ---------------------------------------------------------------------- ranking and branches
def test_rank_auxiliaries_puts_the_helpful_task_before_the_noise():
    problem = Problem.make(noise_scale=6.0)
    fm = forkmerge(problem, topk=(0, 1), pruning_steps=30, eval_every=10)
    ranking = fm.rank_auxiliaries(include_target_only=True)
    names = [name for name, _ in ranking]
    assert names.index("helper") < names.index(TARGET_ONLY) < names.index("noise")
    scores = [score for _, score in ranking]
    assert scores == sorted(scores, reverse=True)
    result = fm.fit()
    assert result.ranking[0][0] == "helper"
    assert result.branch_weights == [{"target": 1.0, "helper": 0.0, "noise": 0.0},
                                     {"target": 1.0, "helper": 1.0, "noise": 0.0}]


def _fake_train(effect: dict[str, float], model: nn.Module, optimizer, weights: dict[str, float],
                n: int) -> None:
    with torch.no_grad():
        model.p.add_(n * sum(weights[t] * effect[t] for t in weights))


class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))


def test_ranking_order_is_by_best_score_with_ties_in_task_order():
    tasks = ["t", "a", "b", "c", "d"]
    effect = {"t": 0.0, "a": 1.0, "b": 3.0, "c": 1.0, "d": -2.0}
    ranking = rank_auxiliaries(Scalar, Scalar().state_dict(), sgd, functools.partial(_fake_train, effect),
                               lambda m: float(m.p), tasks, ["t"], steps=2, executor=SerialExecutor())
    assert ranking == [("b", 6.0), ("a", 2.0), ("c", 2.0), ("d", -4.0)]


def test_branch_checkpoint_modes_choose_best_ever_best_in_segment_or_last():
    """One branch drifting past the optimum: p = 1, 2 in segment 1 and onward; score −(p − 1.2)²."""
    def run(mode):
        def score(model: nn.Module) -> float:
            return -(float(model.p) - 1.2) ** 2

        fm = ForkMerge(Scalar, sgd, functools.partial(_fake_train, {"t": 1.0}), score, ["t"], ["t"],
                       topk=(0,), total_steps=4, merge_every=2, eval_every=1,
                       branch_checkpoint=mode, select_final="last")
        result = fm.fit()
        return float(result.model.p.detach()), [h["branch_scores"][0] for h in result.history]

    p, scores = run("best_ever")  # segment 2 (p = 2, 3) never beats p = 1: the stale checkpoint is merged
    assert p == 1.0 and scores == pytest.approx([-0.04, -0.04])
    p, scores = run("best_in_segment")  # segment 2 starts from p = 1: p = 2 is its best
    assert p == 2.0 and scores == pytest.approx([-0.04, -0.64])
    p, _ = run("last")  # segment 1 ends at p = 2, segment 2 at p = 4
    assert p == 4.0


def test_optimizer_state_survives_merges_unless_reset():
    problem = Problem.make()
    kept = forkmerge(problem, topk=(0, 2), total_steps=20)
    kept.optimizer_factory = functools.partial(sgd, momentum=0.9)
    kept.fit()
    assert all(b.optimizer is not None and b.optimizer["state"] for b in kept._progress.branches)
    reset = forkmerge(problem, topk=(0, 2), total_steps=20, reset_optimizer_on_merge=True)
    reset.optimizer_factory = functools.partial(sgd, momentum=0.9)
    reset.fit()
    assert all(b.optimizer is None for b in reset._progress.branches)


def test_merge_scope_all_averages_never_trained_heads_and_shared_scope_keeps_them():
    problem = Problem.make()
    initial = forkmerge(problem).initial_state
    everything = forkmerge(problem, total_steps=10, merge_every=10, select_final="last", topk=(0, 2))
    everything.fit()
    target_only, joint = everything._progress.branches
    lam = everything.history[0]["coefficients"]
    assert states_equal(target_only.current, joint.current)  # faithful: every entry is merged into both

    scoped = forkmerge(problem, total_steps=10, merge_every=10, select_final="last", topk=(0, 2),
                       merge_scope="shared_and_targets")
    result = scoped.fit()
    target_only, joint = scoped._progress.branches
    never_trained = initial["heads.noise.weight"]
    assert torch.equal(target_only.current["heads.noise.weight"], never_trained)
    assert not torch.equal(joint.current["heads.noise.weight"], initial["heads.noise.weight"])
    assert torch.equal(target_only.current["trunk.0.weight"], joint.current["trunk.0.weight"])
    leader = max(range(2), key=lambda b: (scoped.history[0]["coefficients"][b], -b))
    own = (target_only, joint)[leader].current["heads.noise.weight"]
    assert torch.equal(result.model.state_dict()["heads.noise.weight"], own)
    assert lam == pytest.approx(scoped.history[0]["coefficients"])  # the target-side merge is unaffected


# ---------------------------------------------------------------------- executors
def test_process_pool_matches_serial_execution():
    problem = Problem.make()
    serial = forkmerge(problem, total_steps=20).fit()
    with ProcessExecutor(workers=2, threads_per_worker=1) as pool:
        parallel = forkmerge(problem, total_steps=20, executor=pool).fit()
    assert [h["coefficients"] for h in parallel.history] == [h["coefficients"] for h in serial.history]
    for key, value in parallel.model.state_dict().items():
        torch.testing.assert_close(value, serial.model.state_dict()[key], atol=1e-5, rtol=1e-5)
    assert math.isfinite(parallel.score)
