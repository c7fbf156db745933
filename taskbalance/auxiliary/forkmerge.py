"""ForkMerge — fork a model into branches with different task weights, train, merge on target validation.

Jiang, Chen, Pan, Wang, Liu, Jiang & Long, "ForkMerge: Mitigating Negative Transfer in Auxiliary-Task
Learning", NeurIPS 2023 (arXiv:2301.12618); official code ``thuml/ForkMerge@develop``. Specification:
``docs/method-notes.md`` §3; user guide: ``docs/auxiliary.md``.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..balancers.inputs import validate_tasks
from ..train.checkpoint import read_state_file
from .branch import (
    BalancerFactory,
    BranchJob,
    BranchOutcome,
    EvaluateTarget,
    ModelFactory,
    OptimizerFactory,
    SchedulerFactory,
    TrainSteps,
    derive_seed,
    dumps,
    evaluate_model,
    loads,
    run_branch,
)
from .executor import Executor, SerialExecutor
from .merge import (
    DEFAULT_ALPHAS,
    SEARCHES,
    MergeSearch,
    SearchKind,
    check_alphas,
    greedy_merge_search,
    merge_state_dicts,
    mixture_merge_search,
)
from .pruning import rank_auxiliaries
from .roles import resolve_roles

__all__ = ["ForkMerge", "ForkMergeResult", "task_of_key_by_name"]

BranchCheckpoint = Literal["best_ever", "best_in_segment", "last"]
MergeScope = Literal["all", "shared_and_targets"]
SelectFinal = Literal["best_val", "last"]
_CHECKPOINT_NAME = "forkmerge.pt"
_FORMAT = 2


def task_of_key_by_name(tasks: Sequence[str]) -> Callable[[str], str | None]:
    """Default owner of a ``state_dict`` key: the first dotted component equal to a task name, else ``None``.

    ``"heads.depth.weight"`` → ``"depth"``; ``"trunk.0.weight"`` → ``None`` (shared). Pass your own
    ``task_of_key`` to :class:`ForkMerge` if your model names its heads differently.
    """
    names = set(tasks)

    def owner(key: str) -> str | None:
        for part in key.split("."):
            if part in names:
                return part
        return None

    return owner


@dataclass
class ForkMergeResult:
    """What :meth:`ForkMerge.fit` returns.

    Attributes:
        model: a fresh model holding the selected merged parameters (``select_final``).
        score: its target validation score.
        history: one entry per merge (see :attr:`ForkMerge.history`).
        ranking: auxiliary ranking used to build the branches (``None`` if none was needed).
        branch_weights: the task-weight vector of each branch.
        finished: whether all segments have run (false when stopped early by ``max_segments``).
    """

    model: nn.Module
    score: float
    history: list[dict[str, Any]]
    ranking: list[tuple[str, float]] | None
    branch_weights: list[dict[str, float]]
    finished: bool = True

    @property
    def lambdas(self) -> list[dict[str, float]]:
        """Per merge, the task weights the merge amounts to (``Σ_b Λ_b ν_b``)."""
        return [entry["task_weights"] for entry in self.history]


@dataclass
class _BranchState:
    current: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    best_state: dict[str, Any] | None = None
    best_score: float = -math.inf
    scheduler: dict[str, Any] | None = None
    balancer: dict[str, Any] | None = None
    steps: int = 0


@dataclass
class _Progress:
    segment: int = 0
    ranking: list[tuple[str, float]] | None = None
    branch_weights: list[dict[str, float]] = field(default_factory=list)
    branches: list[_BranchState] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    merged: dict[str, Any] | None = None
    merged_score: float = -math.inf
    best_merged: dict[str, Any] | None = None
    best_merged_score: float = -math.inf


def _comparable(score: float) -> float:
    return -math.inf if math.isnan(score) else score


class ForkMerge:
    """ForkMerge: fork into branches with different task weights, then merge them on target validation.

    **Algorithm** (official code ``auxiliary_task_scene_understanding/forkmerge.py``;
    ``docs/method-notes.md`` §3.3):

    0. *Rank* the auxiliary tasks by short 1:1 joint runs with the targets (:meth:`rank_auxiliaries`;
       ``pruning_steps`` each) — only when the branches need a ranking.
    1. *Fork*: every branch starts from the same initial model and has its own optimizer for the whole run.
       With ``topk`` (default ``(0, 1, 2)``, the official one), branch ``k`` trains the targets and the ``k``
       best-ranked auxiliaries, every task with weight 1 (the official scripts use EW, a plain sum). Or give
       ``branches=[{task: weight}, ...]``: any weight vectors ``ν_b`` (paper Eq. 13).
    2. Every ``merge_every`` steps: train each branch for the segment (in parallel through ``executor``),
       evaluating the target every ``eval_every`` steps; pick each branch's checkpoint ``θ_b`` and score
       (``branch_checkpoint``); find ``Λ`` on the target's validation score (``search``, below); merge
       ``θ = Σ_b Λ_b θ_b`` and load it into every branch.
    2b. *Λ-pruning* (paper §4.2, used for DomainNet and AliExpress): after merge number ``prune_after``, drop
       the branches with ``Λ_b = 0`` and keep the ``keep_branches`` (K′) with the largest ``Λ``.

    **Search** (``search``): ``"greedy"`` (default) adds branches by their own score and gives each any share
    ``λ`` on the grid ``alphas`` (:func:`~taskbalance.auxiliary.merge.mixture_merge_search`): with two
    branches exactly the paper's Algorithm 1 grid search, so the anchor can end below one half; for three or
    more a generalisation of Algorithm 3 (**our choice**). ``"official"``: the paper's Algorithm 3 as the
    official code runs it (:func:`~taskbalance.auxiliary.merge.greedy_merge_search`; the i-th added branch
    gets at most ``1/(i+2)``, so with two branches the better branch keeps at least one half).
    ``"binary"``: Algorithm 1's binary search on ``λ`` (``binary_steps`` halvings; our reconstruction).

    **Per-branch training state**: every branch keeps its optimiser, its LR scheduler
    (``scheduler_factory(optimizer)``, stepped every ``scheduler_every`` steps of the branch's run, as the
    official code's per-branch schedulers; the state travels with the optimiser's through merges, processes
    and checkpoints) and its balancer (``balancer_factory(task_weights)``, passed to
    ``train_steps(..., balancer=b)``; its state is carried across segments, never merged).
    3. Return the best merged model on validation (``select_final="best_val"``) or the last one.

    To first order a merge equals training with the task weights ``Σ_b Λ_b ν_b``; :attr:`history` records them
    (``task_weights``) with ``Λ`` (``coefficients``) and the merged validation score.

    **Defaults** from the official code, converted to steps: ``alphas = (0, .2, .4, .6, .8, 1)``,
    ``topk = (0, 1, 2)`` (cut to the number of auxiliaries — our choice), ``merge_every = 30/200`` of
    ``total_steps`` (released NYUv2 script: 30 of 200 epochs; the paper says 10 of 200), ``pruning_steps =
    10/200`` of ``total_steps`` (argparse default 10 epochs), ``eval_every`` and ``scheduler_every`` = one
    epoch: ``steps_per_epoch`` when given, else ``total_steps / 200`` (the official code evaluates and steps
    its schedulers every epoch of its 200).

    **Quirks of the official code, decided here** (``docs/method-notes.md`` §3.4; see ``docs/auxiliary.md``):

    * ``branch_checkpoint="best_ever"`` (faithful): a branch merges its best-scoring checkpoint over the whole
      run, which may be *stale* (from before an earlier merge) if it did not improve in this segment. Also
      ``"best_in_segment"`` and ``"last"``.
    * ``reset_optimizer_on_merge=False`` (faithful): optimizer state (momentum, Adam moments) survives merges;
      ``True`` builds a fresh optimizer for every branch after each merge.
    * The merge combines floating-point tensors only; integer buffers (``num_batches_tracked``) come from
      branch 0 (the official code averages them into an integer buffer). BatchNorm running statistics are
      averaged, as in the official code.
    * ``merge_scope="all"`` (faithful): every entry is merged, including auxiliary heads a branch never
      trained (they are mixed at their initial values; this does not affect the target).
      ``"shared_and_targets"`` merges only entries not owned by an auxiliary task (``task_of_key``); each
      branch
      keeps its own auxiliary heads, and the returned model takes them from the branch with the largest ``Λ``.
    * Ties in the search go to the smaller coefficient; the final model is the best merge on validation
      (``select_final="best_val"``, scene-understanding code; DomainNet code: ``"last"``).

    **Our choices** where the paper and code are silent: all branches and ranking runs of a segment share
    one random stream (torch's global RNG is seeded with a value derived from ``seed`` and the segment
    before each branch trains, inside ``fork_rng``), so branches see the same batches if ``train_steps``
    draws them from torch's RNG — the merge identity of §3.2 then holds exactly for one SGD step; the
    initial model is built under ``torch.manual_seed(seed)`` when a factory is given.

    **Determinism and resume**: given ``seed`` (and a ``train_steps`` / ``evaluate_target`` that are
    deterministic given torch's RNG), the run is deterministic for a given executor. With
    ``checkpoint_dir``, the whole state (branches, optimizers, best checkpoints, ranking, history, best merge)
    is written atomically after the ranking and after every merge, and :meth:`fit` resumes from it; a resumed
    run equals an uninterrupted one bit for bit. Checkpoints are read with ``torch.load(weights_only=True)``.

    **Cost**: ``#branches × total_steps`` training steps, plus ``#auxiliaries × pruning_steps`` for the
    ranking, plus ``(#branches − 1) · |alphas|`` validation passes per merge; memory for one model and
    optimizer per branch.

    Args:
        model: a model (deep-copied for every branch) or a zero-argument factory building one.
        optimizer_factory: ``optimizer_factory(model) -> Optimizer``.
        train_steps: ``train_steps(model, optimizer, task_weights, n)`` takes ``n`` optimisation steps on
            ``Σ_t task_weights[t] · L_t`` (weight 0: task not in the branch); it may use any balancer.
        evaluate_target: ``evaluate_target(model) -> float``, the targets' validation score, higher is better
            (called in eval mode under ``torch.no_grad()``).
        tasks: all task names.
        targets: the target task names (the others are auxiliary).
        total_steps: training steps per branch.
        merge_every: steps between merges (Δt).
        branches: explicit task-weight vectors, one per branch (exclusive with ``topk``).
        topk: nested branches: targets plus the ``k`` best-ranked auxiliaries, for each ``k``.
        alphas: the coefficient grid of the greedy search.
        pruning_steps: steps of each auxiliary-ranking run.
        eval_every: steps between target evaluations inside a segment (branch checkpointing).
        seed: master seed.
        branch_checkpoint: ``"best_ever"`` | ``"best_in_segment"`` | ``"last"``.
        reset_optimizer_on_merge: rebuild every optimizer after a merge.
        merge_scope: ``"all"`` | ``"shared_and_targets"``.
        task_of_key: which task owns a ``state_dict`` key (``None``: shared); default
            :func:`task_of_key_by_name`.
        select_final: ``"best_val"`` | ``"last"``.
        executor: where branches train (default :class:`~taskbalance.auxiliary.executor.SerialExecutor`);
            a process pool needs picklable callables and model.
        checkpoint_dir: directory for the resumable checkpoint (``forkmerge.pt``); ``None``: no checkpoint.
        search: ``"greedy"`` | ``"official"`` | ``"binary"`` (see above).
        binary_steps: halvings of ``search="binary"``.
        prune_after: prune the branches after this merge (1 = the first; ``None``: never, unless
            ``keep_branches`` is given, then 1).
        keep_branches: K′, the branches kept by pruning (largest ``Λ``; ``None``: all with ``Λ > 0``).
        steps_per_epoch: sets the defaults of ``eval_every`` and ``scheduler_every``.
        scheduler_factory: ``scheduler_factory(optimizer)``, one LR scheduler per branch (``None``: none).
        scheduler_every: steps between scheduler steps.
        balancer_factory: ``balancer_factory(task_weights)``, one balancer per branch (``None``: none).
    """

    def __init__(
        self,
        model: nn.Module | ModelFactory,
        optimizer_factory: OptimizerFactory,
        train_steps: TrainSteps,
        evaluate_target: EvaluateTarget,
        tasks: Sequence[str],
        targets: Sequence[str],
        *,
        total_steps: int,
        merge_every: int | None = None,
        branches: Sequence[Mapping[str, float]] | None = None,
        topk: Sequence[int] | None = None,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        pruning_steps: int | None = None,
        eval_every: int | None = None,
        seed: int = 0,
        branch_checkpoint: BranchCheckpoint = "best_ever",
        reset_optimizer_on_merge: bool = False,
        merge_scope: MergeScope = "all",
        task_of_key: Callable[[str], str | None] | None = None,
        select_final: SelectFinal = "best_val",
        executor: Executor | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        search: SearchKind = "greedy",
        binary_steps: int = 4,
        prune_after: int | None = None,
        keep_branches: int | None = None,
        steps_per_epoch: int | None = None,
        scheduler_factory: SchedulerFactory | None = None,
        scheduler_every: int | None = None,
        balancer_factory: BalancerFactory | None = None,
    ) -> None:
        self.tasks = validate_tasks(tasks)
        self.roles = resolve_roles(self.tasks, targets=targets, method="ForkMerge")
        if not callable(model):
            raise TypeError(
                f"model must be an nn.Module or a factory returning one, got {type(model).__name__}"
            )
        self.model_factory: ModelFactory = (
            functools.partial(copy.deepcopy, model) if isinstance(model, nn.Module) else model
        )
        for name, value in (("optimizer_factory", optimizer_factory), ("train_steps", train_steps),
                            ("evaluate_target", evaluate_target)):
            if not callable(value):
                raise TypeError(f"{name} must be callable, got {type(value).__name__}")
        self.optimizer_factory = optimizer_factory
        self.train_steps = train_steps
        self.evaluate_target = evaluate_target
        self.total_steps = _positive_int("total_steps", total_steps)
        self.merge_every = _positive_int(
            "merge_every", merge_every if merge_every is not None else max(1, round(total_steps * 30 / 200))
        )
        epoch = (
            _positive_int("steps_per_epoch", steps_per_epoch) if steps_per_epoch is not None
            else max(1, round(total_steps / 200))
        )
        self.steps_per_epoch = epoch
        self.eval_every = _positive_int("eval_every", eval_every if eval_every is not None else epoch)
        self.scheduler_every = _positive_int(
            "scheduler_every", scheduler_every if scheduler_every is not None else epoch
        )
        _choice("search", search, SEARCHES)
        self.search: SearchKind = search
        self.binary_steps = binary_steps
        if isinstance(binary_steps, bool) or not isinstance(binary_steps, int) or binary_steps < 0:
            raise ValueError(f"binary_steps must be an integer >= 0, got {binary_steps!r}")
        if prune_after is None and keep_branches is not None:
            prune_after = 1
        self.prune_after = _positive_int("prune_after", prune_after) if prune_after is not None else None
        self.keep_branches = (
            _positive_int("keep_branches", keep_branches) if keep_branches is not None else None
        )
        factories = (("scheduler_factory", scheduler_factory), ("balancer_factory", balancer_factory))
        for name, factory in factories:
            if factory is not None and not callable(factory):
                raise TypeError(f"{name} must be callable, got {type(factory).__name__}")
        self.scheduler_factory = scheduler_factory
        self.balancer_factory = balancer_factory
        self.pruning_steps = _positive_int(
            "pruning_steps",
            pruning_steps if pruning_steps is not None else max(1, round(total_steps * 10 / 200)),
        )
        self.alphas = check_alphas(alphas)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        _choice("branch_checkpoint", branch_checkpoint, ("best_ever", "best_in_segment", "last"))
        _choice("merge_scope", merge_scope, ("all", "shared_and_targets"))
        _choice("select_final", select_final, ("best_val", "last"))
        self.branch_checkpoint: BranchCheckpoint = branch_checkpoint
        self.reset_optimizer_on_merge = bool(reset_optimizer_on_merge)
        self.merge_scope: MergeScope = merge_scope
        self.task_of_key = task_of_key or task_of_key_by_name(self.tasks)
        self.select_final: SelectFinal = select_final
        self.executor: Executor = executor or SerialExecutor()
        self.checkpoint_path = Path(checkpoint_dir) / _CHECKPOINT_NAME if checkpoint_dir is not None else None

        auxiliaries = self.roles.auxiliaries
        if branches is not None and topk is not None:
            raise ValueError("give either branches=[...] (explicit task weights) or topk=[...], not both")
        self._explicit_branches = (
            [self._check_branch(b, i) for i, b in enumerate(branches)] if branches else None
        )
        if branches is not None and not self._explicit_branches:
            raise ValueError("branches is empty; give at least one task-weight vector")
        if topk is None:
            self.topk: tuple[int, ...] = tuple(sorted({k for k in (0, 1, 2) if k <= len(auxiliaries)}))
        else:
            values = [int(k) for k in topk]
            bad = [k for k in values if k < 0 or k > len(auxiliaries)]
            if not values or bad:
                raise ValueError(
                    f"topk must be a non-empty list of integers in [0, {len(auxiliaries)}] (number of "
                    f"auxiliary tasks), got {list(topk)}"
                )
            if len(set(values)) != len(values):
                raise ValueError(f"topk has duplicates: {list(topk)}")
            self.topk = tuple(values)
        self._initial_state: dict[str, Any] | None = None
        self._progress = _Progress()
        self._eval_model: nn.Module | None = None

    # ------------------------------------------------------------------ configuration helpers
    def _check_branch(self, weights: Mapping[str, float], index: int) -> dict[str, float]:
        unknown = [t for t in weights if t not in self.tasks]
        if unknown:
            raise ValueError(f"branch {index}: unknown task(s) {unknown}; tasks are {list(self.tasks)}")
        full = {t: float(weights.get(t, 0.0)) for t in self.tasks}
        if any(not math.isfinite(w) or w < 0 for w in full.values()):
            raise ValueError(f"branch {index}: task weights must be finite and >= 0, got {full}")
        if not any(full[t] > 0 for t in self.roles.targets):
            raise ValueError(
                f"branch {index}: gives no positive weight to any target {list(self.roles.targets)}"
            )
        return full

    @property
    def needs_ranking(self) -> bool:
        """Whether the branches depend on the auxiliary ranking (``0 < k < #auxiliaries`` in ``topk``)."""
        return self._explicit_branches is None and any(0 < k < len(self.roles.auxiliaries) for k in self.topk)

    def _branch_weights(self, ranking: list[tuple[str, float]] | None) -> list[dict[str, float]]:
        if self._explicit_branches is not None:
            return [dict(b) for b in self._explicit_branches]
        ordered = [name for name, _ in ranking] if ranking is not None else list(self.roles.auxiliaries)
        result = []
        for k in self.topk:
            chosen = set(self.roles.targets) | set(ordered[:k])
            result.append({t: 1.0 if t in chosen else 0.0 for t in self.tasks})
        return result

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "tasks": list(self.tasks),
            "targets": list(self.roles.targets),
            "total_steps": self.total_steps,
            "merge_every": self.merge_every,
            "eval_every": self.eval_every,
            "pruning_steps": self.pruning_steps,
            "alphas": list(self.alphas),
            "seed": self.seed,
            "branches": self._explicit_branches,
            "topk": list(self.topk),
            "branch_checkpoint": self.branch_checkpoint,
            "reset_optimizer_on_merge": self.reset_optimizer_on_merge,
            "merge_scope": self.merge_scope,
            "select_final": self.select_final,
            "search": self.search,
            "binary_steps": self.binary_steps,
            "prune_after": self.prune_after,
            "keep_branches": self.keep_branches,
            "scheduler_every": self.scheduler_every,
            "scheduler": self.scheduler_factory is not None,
            "balancer": self.balancer_factory is not None,
        }

    # ------------------------------------------------------------------ state
    @property
    def initial_state(self) -> dict[str, Any]:
        """The state every branch (and ranking run) starts from."""
        if self._initial_state is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                model = self.model_factory()
            self._initial_state = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                                   for k, v in model.state_dict().items()}
        return self._initial_state

    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per merge: ``segment``, ``step`` (steps trained per branch so far), ``coefficients``
        (``Λ``, per branch), ``task_weights`` (``Σ_b Λ_b ν_b``), ``score`` (merged validation score),
        ``branch_scores`` (each branch's score used for ordering)."""
        return self._progress.history

    @property
    def num_segments(self) -> int:
        return -(-self.total_steps // self.merge_every)

    def state_dict(self) -> dict[str, Any]:
        """The complete resumable state (tensors, numbers, strings, lists, dicts only)."""
        p = self._progress
        return {
            "fingerprint": self._fingerprint(),
            "initial_state": self.initial_state,
            "segment": p.segment,
            "ranking": [[name, score] for name, score in p.ranking] if p.ranking is not None else None,
            "branch_weights": p.branch_weights,
            "branches": [
                {"current": b.current, "optimizer": b.optimizer, "best_state": b.best_state,
                 "best_score": b.best_score, "scheduler": b.scheduler, "balancer": b.balancer,
                 "steps": b.steps}
                for b in p.branches
            ],
            "history": p.history,
            "merged": p.merged,
            "merged_score": p.merged_score,
            "best_merged": p.best_merged,
            "best_merged_score": p.best_merged_score,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; ``ValueError`` if it was written with a different configuration."""
        expected = self._fingerprint()
        found = state.get("fingerprint")
        if found != expected:
            differing = sorted(
                k for k in expected if not isinstance(found, dict) or found.get(k) != expected[k]
            )
            raise ValueError(
                f"the ForkMerge checkpoint was written with a different configuration ({differing})"
            )
        self._initial_state = dict(state["initial_state"])
        ranking = state["ranking"]
        self._progress = _Progress(
            segment=int(state["segment"]),
            ranking=[(str(n), float(s)) for n, s in ranking] if ranking is not None else None,
            branch_weights=[dict(b) for b in state["branch_weights"]],
            branches=[
                _BranchState(dict(b["current"]), b["optimizer"], b["best_state"], float(b["best_score"]),
                             b["scheduler"], b["balancer"], int(b["steps"]))
                for b in state["branches"]
            ],
            history=list(state["history"]),
            merged=state["merged"],
            merged_score=float(state["merged_score"]),
            best_merged=state["best_merged"],
            best_merged_score=float(state["best_merged_score"]),
        )

    def _save(self) -> None:
        if self.checkpoint_path is None:
            return
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.checkpoint_path.with_name(f".{self.checkpoint_path.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as handle:
            torch.save(self.state_dict(), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.checkpoint_path)

    def _load_if_present(self) -> None:
        if self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.load_state_dict(read_state_file(self.checkpoint_path))

    # ------------------------------------------------------------------ steps of the algorithm
    def rank_auxiliaries(self, pruning_steps: int | None = None, *,
                         include_target_only: bool = False) -> list[tuple[str, float]]:
        """Rank the auxiliary tasks by short 1:1 joint runs (best target validation score, best first).

        See :func:`taskbalance.auxiliary.pruning.rank_auxiliaries`; runs start from :attr:`initial_state`.
        """
        steps = _positive_int(
            "pruning_steps", pruning_steps if pruning_steps is not None else self.pruning_steps
        )
        return rank_auxiliaries(
            self.model_factory, self.initial_state, self.optimizer_factory, self.train_steps,
            self.evaluate_target, self.tasks, self.roles.targets, steps=steps,
            eval_every=min(self.eval_every, steps), seed=self.seed, executor=self.executor,
            include_target_only=include_target_only,
        )

    def _start(self) -> None:
        p = self._progress
        if p.branch_weights:
            return
        if self.needs_ranking and p.ranking is None:
            p.ranking = self.rank_auxiliaries()
        p.branch_weights = self._branch_weights(p.ranking)
        p.branches = [_BranchState(dict(self.initial_state)) for _ in p.branch_weights]
        self._save()

    def _segment_jobs(self, segment: int) -> list[BranchJob]:
        p = self._progress
        steps = min(self.merge_every, self.total_steps - segment * self.merge_every)
        seed = derive_seed(self.seed, "segment", segment)
        return [
            BranchJob(
                branch=b,
                model_factory=self.model_factory,
                optimizer_factory=self.optimizer_factory,
                train_steps=self.train_steps,
                evaluate_target=self.evaluate_target,
                model_state=dumps(state.current),
                optimizer_state=dumps(state.optimizer) if state.optimizer is not None else None,
                task_weights=dict(p.branch_weights[b]),
                steps=steps,
                eval_every=min(self.eval_every, steps),
                seed=seed,
                scheduler_factory=self.scheduler_factory,
                scheduler_state=dumps(state.scheduler) if state.scheduler is not None else None,
                scheduler_every=self.scheduler_every,
                start_step=state.steps,
                balancer_factory=self.balancer_factory,
                balancer_state=dumps(state.balancer) if state.balancer is not None else None,
            )
            for b, state in enumerate(p.branches)
        ]

    def _checkpoint_of(self, state: _BranchState, outcome: BranchOutcome) -> tuple[dict[str, Any], float]:
        if self.branch_checkpoint == "last":
            return loads(outcome.last_state), outcome.last_score
        best = loads(outcome.best_state)
        if self.branch_checkpoint == "best_in_segment":
            return best, outcome.best_score
        if state.best_state is None or _comparable(outcome.best_score) > _comparable(state.best_score):
            state.best_state, state.best_score = best, outcome.best_score
        assert state.best_state is not None
        return state.best_state, state.best_score

    def _evaluate_state(self, state: Mapping[str, Any]) -> float:
        if self._eval_model is None:
            self._eval_model = self.model_factory()
        self._eval_model.load_state_dict(state)
        return evaluate_model(self._eval_model, self.evaluate_target)

    def _shared_key(self, key: str) -> bool:
        owner = self.task_of_key(key)
        return owner is None or owner in self.roles.targets

    def _merge(self, states: Sequence[Mapping[str, Any]], coefficients: Sequence[float]) -> dict[str, Any]:
        include = self._shared_key if self.merge_scope == "shared_and_targets" else None
        return merge_state_dicts(states, coefficients, include=include)

    def _run_segment(self, segment: int) -> None:
        p = self._progress
        outcomes = self.executor.map(run_branch, self._segment_jobs(segment))
        outcomes = sorted(outcomes, key=lambda o: o.branch)
        states, scores = [], []
        for state, outcome in zip(p.branches, outcomes, strict=True):
            chosen, score = self._checkpoint_of(state, outcome)
            states.append(chosen)
            scores.append(score)
            state.optimizer = None if self.reset_optimizer_on_merge else loads(outcome.optimizer_state)
            state.scheduler = loads(outcome.scheduler_state) if outcome.scheduler_state is not None else None
            state.balancer = loads(outcome.balancer_state) if outcome.balancer_state is not None else None
            state.steps += min(self.merge_every, self.total_steps - segment * self.merge_every)
        search = self._search(states, scores)
        merged = search.state
        if self.merge_scope == "shared_and_targets":
            leader = max(range(len(states)), key=lambda b: (search.coefficients[b], -b))
            for b, state in enumerate(p.branches):
                own = states[b]
                state.current = {k: (v if self._shared_key(k) else own[k]) for k, v in merged.items()}
            merged = {k: (v if self._shared_key(k) else states[leader][k]) for k, v in merged.items()}
        else:
            for state in p.branches:
                state.current = merged
        mixed = {t: sum(c * w[t] for c, w in zip(search.coefficients, p.branch_weights, strict=True))
                 for t in self.tasks}
        p.history.append({
            "segment": segment,
            "step": min((segment + 1) * self.merge_every, self.total_steps),
            "coefficients": list(search.coefficients),
            "task_weights": mixed,
            "score": search.score,
            "branch_scores": scores,
            "order": list(search.order),
        })
        p.merged, p.merged_score = merged, search.score
        if p.best_merged is None or _comparable(search.score) > _comparable(p.best_merged_score):
            p.best_merged, p.best_merged_score = merged, search.score
        if self.prune_after is not None and len(p.history) == self.prune_after:
            kept = self._pruned(search.coefficients)
            p.history[-1]["kept_branches"] = kept
            p.branches = [p.branches[b] for b in kept]
            p.branch_weights = [p.branch_weights[b] for b in kept]
        p.segment = segment + 1
        self._save()

    def _search(self, states: Sequence[Mapping[str, Any]], scores: Sequence[float]) -> MergeSearch:
        if self.search == "official":
            return greedy_merge_search(states, scores, self._evaluate_state, alphas=self.alphas,
                                       merge=self._merge)
        steps = self.binary_steps if self.search == "binary" else None
        return mixture_merge_search(states, scores, self._evaluate_state, alphas=self.alphas,
                                    binary_steps=steps, merge=self._merge)

    def _pruned(self, coefficients: Sequence[float]) -> list[int]:
        """Λ-pruning: the branches with ``Λ > 0``, at most ``keep_branches`` of them with the largest ``Λ``
        (ties: lower index), in their original order; never empty (the largest is always kept)."""
        ranked = sorted(range(len(coefficients)), key=lambda b: (-coefficients[b], b))
        kept = [b for b in ranked if coefficients[b] > 0] or ranked[:1]
        if self.keep_branches is not None:
            kept = kept[: self.keep_branches]
        return sorted(kept)

    def fit(self, max_segments: int | None = None) -> ForkMergeResult:
        """Run (or resume, from ``checkpoint_dir``) the whole schedule.

        Args:
            max_segments: stop after this many merges *in this call* (the checkpoint lets a later call
            resume).
        """
        self._load_if_present()
        self._start()
        p = self._progress
        ran = 0
        while p.segment < self.num_segments and (max_segments is None or ran < max_segments):
            self._run_segment(p.segment)
            ran += 1
        finished = p.segment >= self.num_segments
        if p.merged is None:
            state, score = dict(self.initial_state), self._evaluate_state(self.initial_state)
        elif self.select_final == "best_val":
            assert p.best_merged is not None
            state, score = p.best_merged, p.best_merged_score
        else:
            state, score = p.merged, p.merged_score
        model = self.model_factory()
        model.load_state_dict(state)
        return ForkMergeResult(model, score, list(p.history), p.ranking, [dict(b) for b in p.branch_weights],
                               finished)


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
