"""Lookahead inter-task affinity and task-grouping suggestions (Fifty et al., NeurIPS 2021).

Fifty, Amid, Zhao, Yu, Anil & Finn, "Efficiently Identifying Task Groupings for Multi-Task Learning" (TAG),
Eq. 2–3: with ``θ_s`` the shared parameters and ``g_i = ∇_{θ_s} L_i`` on the current batch, the affinity of
task ``i`` onto task ``j`` at step ``t`` is

    ``Z^t_{i→j} = 1 − L_j(θ_s − η g_i) / L_j(θ_s)``

(task ``j``'s relative loss decrease after a step on task ``i`` alone; task-specific parameters fixed, same
batch), and the reported affinity is its average over the training steps. Positive: training on ``i`` helps
``j``; negative: it hurts.

Grouping (TAG §3.2): a partition of the tasks is scored by ``Σ_groups Σ_{j∈S} mean_{i∈S, i≠j} Z_{i→j}``, each
task counting the mean affinity it receives from its group-mates; a task alone contributes 0. TAG searches
overlapping groups with a branch-and-bound over a group budget; we search **partitions** into exactly ``g``
groups (our choice; simpler to act on), exactly by dynamic programming over subsets for up to
``exhaustive_limit`` tasks and greedily (agglomerative merging, then single-task moves) beyond.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..balancers.inputs import collect_losses, validate_tasks
from ..jacobian import parameter_jacobian
from ..progress import Progress
from ..record import StepRecord

if TYPE_CHECKING:
    from ..data.base import MultiTaskData
    from .conflict import ConflictMonitor

__all__ = [
    "AffinityResult",
    "Grouping",
    "TaskAffinity",
    "affinity_colour_limit",
    "affinity_figure",
    "best_partition",
    "compute_task_affinity",
    "grouping_score",
    "plot_affinity",
    "suggest_groupings",
]

AffinityMode = Literal["exact", "first_order"]
Evaluate = Callable[[], Mapping[str, Tensor]]


class TaskAffinity(nn.Module):
    """Lookahead inter-task affinity ``Z_{i→j}`` (Fifty et al. 2021, Eq. 2–3), averaged over observed steps.

    In the user's loop, before the ordinary backward or ``balancer.backward``::

        affinity = TaskAffinity(tasks, lr=0.05, every=10)
        ...
        losses = compute_losses(model, x, y)
        affinity.observe(losses, shared=model.trunk.parameters(),
                         evaluate=lambda: compute_losses(model, x, y))
        balancer.backward(losses, shared=model.trunk.parameters())
        ...
        affinity.matrix()          # (K, K), row i = "from task i", column j = "onto task j"

    Args:
        tasks: task names.
        lr: the lookahead step size ``η``. The paper uses the training learning rate with the optimiser's own
            update; we take a plain SGD step ``θ_s − η g_i`` (our choice; exact for SGD training, a
            first-order stand-in for adaptive optimisers).
        every: observe one step in ``every`` (steps ``0, n, 2n, …``); the paper averages over all steps
            (``every=1``).
        mode: ``"exact"`` (default): ``K + 1`` extra forward passes on the same batch under ``no_grad``
            (one at ``θ_s``, one per lookahead), the method as published; ``"first_order"``:
            ``L_j(θ_s − η g_i) ≈ L_j − η ⟨g_i, g_j⟩``, i.e. ``Z_{i→j} ≈ η G_ij / L_j`` from the Gramian —
            no extra forward, and free with :meth:`observe_record` when a balancer exposes the Gramian.

    ``evaluate`` must recompute the losses of the same batch with the model's *current* parameters and must
    not change any state: the lookahead forwards run under ``torch.no_grad()`` with the RNG state restored
    afterwards (so dropout does not shift the training run), but buffers such as BatchNorm running statistics
    are not restored — evaluate in ``model.eval()`` or without such layers. The denominator ``L_j(θ_s)`` is
    re-evaluated with the same ``evaluate`` (our choice, so both sides of the ratio use the same forward).
    Pairs whose ``L_j(θ_s) ≤ 0`` (ratio undefined) are left out of the average for that step.

    Cost on an active step, exact mode: one batched per-task backward (the Jacobian engine, ``retain_graph``
    kept for the training backward) and ``K + 1`` forwards; these ``K`` lookahead forwards are a Python loop
    over tasks — inherent to the method, since each needs different parameters. Inactive steps cost a counter
    increment. No host read anywhere: the sums stay on the device until you read :meth:`matrix`.
    """

    affinity_sum: Tensor
    affinity_count: Tensor

    def __init__(
        self, tasks: Sequence[str], *, lr: float, every: int = 1, mode: AffinityMode = "exact"
    ) -> None:
        super().__init__()
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if mode not in ("exact", "first_order"):
            raise ValueError(f"mode must be 'exact' or 'first_order', got {mode!r}")
        self.tasks: tuple[str, ...] = validate_tasks(tasks)
        self._task_index = {name: i for i, name in enumerate(self.tasks)}
        self.lr = float(lr)
        self.every = every
        self.mode: AffinityMode = mode
        self.step_count = 0
        self.steps_observed = 0
        k = len(self.tasks)
        self.register_buffer("affinity_sum", torch.zeros(k, k))
        self.register_buffer("affinity_count", torch.zeros(k, k))

    @property
    def active(self) -> bool:
        """Whether the next ``observe*`` call computes affinities."""
        return self.step_count % self.every == 0

    def observe(
        self,
        losses: Mapping[str, Tensor],
        *,
        shared: Iterable[Tensor],
        evaluate: Evaluate | None = None,
    ) -> Tensor | None:
        """Count one step; on an active step add this step's ``Z^t`` (returned, ``(K, K)``, NaN where absent).

        Call it before the backward of ``losses`` (their graph is retained). Tasks left out of ``losses`` are
        absent for the step. ``evaluate`` is required in exact mode.
        """
        if self.mode == "exact" and evaluate is None:
            raise ValueError("mode='exact' needs evaluate=lambda: <losses of the same batch>; "
                             "or use mode='first_order'")
        if not self._begin_step():
            return None
        batch = collect_losses(losses, self.tasks, self._task_index, "propagate", method="TaskAffinity")
        roots = batch.present_values
        if not roots.requires_grad:
            raise RuntimeError(
                "none of the given losses requires grad; compute them from the model under autograd"
            )
        parameters = [p for p in shared if p.requires_grad]
        if not parameters:
            raise ValueError("shared= contained no parameter that requires grad")
        jacobian = parameter_jacobian(roots, parameters, retain_graph=True)
        if self.mode == "first_order":
            return self._add(self.lr * (jacobian @ jacobian.T) / roots.detach()[None, :], roots.detach(),
                             batch.index)
        assert evaluate is not None
        before, after = self._lookahead(parameters, jacobian, batch.index, evaluate)
        return self._add(1.0 - after / before[None, :], before, batch.index)

    def observe_record(self, record: StepRecord) -> Tensor | None:
        """First-order mode only: count one step and use the Gramian a gradient-level balancer left in
        ``record.extras["gramian"]`` (no extra backward, no forward)."""
        if self.mode != "first_order":
            raise ValueError("observe_record needs mode='first_order' (the exact lookahead needs evaluate=)")
        gramian = record.extras.get("gramian")
        if gramian is None:
            raise KeyError(
                "this record carries no 'gramian' extra; call affinity.observe(losses, shared=...) "
                "before balancer.backward instead"
            )
        if tuple(record.tasks) != self.tasks:
            raise ValueError(f"record tasks {list(record.tasks)} differ from {list(self.tasks)}")
        if not self._begin_step():
            return None
        index = [i for i, name in enumerate(self.tasks) if name not in record.skipped]
        losses = record.losses.detach()[index]
        return self._add(self.lr * gramian.detach() / losses[None, :], losses, index)

    def matrix(self) -> Tensor:
        """``(K, K)`` mean affinity, entry ``[i, j] = Z_{i→j}`` (NaN for pairs never observed)."""
        count = self.affinity_count
        nan = torch.full_like(count, math.nan)
        return torch.where(count > 0, self.affinity_sum / count.clamp_min(1), nan)

    # ------------------------------------------------------------------ internals
    def _begin_step(self) -> bool:
        active = self.step_count % self.every == 0
        # plain attribute write: nn.Module.__setattr__ costs microseconds, which an inactive step should not
        object.__setattr__(self, "step_count", self.step_count + 1)
        return active

    def _lookahead(
        self, parameters: list[Tensor], jacobian: Tensor, index: list[int], evaluate: Evaluate
    ) -> tuple[Tensor, Tensor]:
        names = [self.tasks[i] for i in index]
        sizes = [p.numel() for p in parameters]
        cuda = sorted({p.device.index or 0 for p in parameters if p.device.type == "cuda"})
        originals = [p.detach().clone() for p in parameters]
        rows: list[Tensor] = []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            try:
                before = self._losses_of(evaluate(), names)
                for row in jacobian:  # one lookahead forward per task: inherent to the method
                    pieces = torch.split(row, sizes)
                    for parameter, original, piece in zip(parameters, originals, pieces, strict=True):
                        # through .data: the pending training graph saved these parameters, and an ordinary
                        # in-place write would bump their version counter and break its backward; the exact
                        # original values are restored below before that backward runs.
                        parameter.data.copy_(original - self.lr * piece.view_as(original).to(original.dtype))
                    rows.append(self._losses_of(evaluate(), names))
            finally:
                for parameter, original in zip(parameters, originals, strict=True):
                    parameter.data.copy_(original)
        return before, torch.stack(rows)

    def _losses_of(self, losses: Mapping[str, Tensor], names: list[str]) -> Tensor:
        missing = [n for n in names if n not in losses]
        if missing:
            raise KeyError(f"evaluate() returned no loss for task(s) {missing}")
        return torch.stack([losses[n].detach().reshape(()) for n in names])

    def _add(self, step_affinity: Tensor, baseline: Tensor, index: list[int]) -> Tensor:
        if step_affinity.device != self.affinity_sum.device:
            self.to(step_affinity.device)
        k = len(self.tasks)
        valid = (baseline > 0)[None, :].expand_as(step_affinity) & torch.isfinite(step_affinity)
        at = torch.tensor(index, dtype=torch.long, device=step_affinity.device)
        values = torch.where(valid, step_affinity, torch.zeros_like(step_affinity))
        values = values.to(self.affinity_sum.dtype)
        rows = values.new_zeros(len(index), k).index_copy(1, at, values)
        full_values = torch.zeros_like(self.affinity_sum).index_copy(0, at, rows)
        row_mask = valid.new_zeros(len(index), k).index_copy(1, at, valid)
        mask = valid.new_zeros(k, k).index_copy(0, at, row_mask)
        self.affinity_sum.add_(full_values)
        self.affinity_count.add_(mask.to(self.affinity_count.dtype))
        self.steps_observed += 1
        return torch.where(mask, full_values, torch.full_like(full_values, math.nan))

    def get_extra_state(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "steps_observed": self.steps_observed}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.steps_observed = int(state["steps_observed"])

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}, lr={self.lr}, every={self.every}, mode={self.mode!r}"


# ---------------------------------------------------------------------------------------------- grouping
@dataclass(frozen=True)
class Grouping:
    """A partition of the tasks into groups, with its total affinity score (higher is better)."""

    groups: tuple[tuple[str, ...], ...]
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [list(g) for g in self.groups], "score": self.score}


def _as_matrix(affinity: Tensor | np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    if isinstance(affinity, Tensor):
        affinity = affinity.detach().cpu().double().numpy()
    matrix = np.array(affinity, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"affinity must be a square T × T matrix, got shape {matrix.shape}")
    return np.nan_to_num(matrix, nan=0.0)  # never-observed pairs count as neutral (our choice)


def _names(tasks: Sequence[str] | None, size: int) -> tuple[str, ...]:
    names = tuple(tasks) if tasks is not None else tuple(f"t{i}" for i in range(size))
    if len(names) != size:
        raise ValueError(f"{len(names)} task names for a {size} × {size} affinity matrix")
    return names


def _group_value(matrix: np.ndarray, members: Sequence[int]) -> float:
    if len(members) < 2:
        return 0.0
    block = matrix[np.ix_(members, members)]
    inbound = block.sum(axis=0) - np.diag(block)  # Σ_{i≠j} Z_{i→j} for each member j
    return float(inbound.sum() / (len(members) - 1))


def grouping_score(
    affinity: Tensor | np.ndarray | Sequence[Sequence[float]], groups: Sequence[Sequence[int]]
) -> float:
    """Total affinity of a partition (groups of task positions): ``Σ_S Σ_{j∈S} mean_{i∈S, i≠j} Z_{i→j}``."""
    matrix = _as_matrix(affinity)
    return sum(_group_value(matrix, list(g)) for g in groups)


def _subset_scores(matrix: np.ndarray) -> np.ndarray:
    t = matrix.shape[0]
    masks = np.arange(1 << t)
    members = ((masks[:, None] >> np.arange(t)[None, :]) & 1).astype(np.float64)  # (2^T, T)
    off = matrix - np.diag(np.diag(matrix))
    inbound = members @ off  # [mask, j] = Σ_{i ∈ mask, i≠j} Z_{i→j}
    sizes = members.sum(axis=1)
    total = (inbound * members).sum(axis=1)
    return np.where(sizes > 1, total / np.maximum(sizes - 1, 1), 0.0)


def _exact_partition(matrix: np.ndarray, num_groups: int) -> list[list[int]]:
    """Best partition into exactly ``num_groups`` non-empty groups: DP over subsets, O(g · 3^T)."""
    t = matrix.shape[0]
    scores = _subset_scores(matrix)
    full = (1 << t) - 1
    best: list[dict[int, tuple[float, int]]] = [{0: (0.0, 0)}]
    for g in range(1, num_groups + 1):
        layer: dict[int, tuple[float, int]] = {}
        previous = best[g - 1]
        for mask in range(1, full + 1):
            if bin(mask).count("1") < g:
                continue
            low = mask & -mask
            rest = mask ^ low
            sub = rest
            top: tuple[float, int] | None = None
            while True:  # every subset containing the lowest task of mask
                group = sub | low
                remainder = mask ^ group
                if remainder in previous:
                    value = scores[group] + previous[remainder][0]
                    if top is None or value > top[0] + 1e-12:
                        top = (value, group)
                if sub == 0:
                    break
                sub = (sub - 1) & rest
            if top is not None:
                layer[mask] = top
        best.append(layer)
    groups: list[list[int]] = []
    mask = full
    for g in range(num_groups, 0, -1):
        group = best[g][mask][1]
        groups.append([i for i in range(t) if group >> i & 1])
        mask ^= group
    return sorted(groups)


def _greedy_partition(matrix: np.ndarray, num_groups: int, max_rounds: int = 100) -> list[list[int]]:
    """Agglomerative merging down to ``num_groups`` groups, then single-task moves while they improve."""
    groups = [[i] for i in range(matrix.shape[0])]
    while len(groups) > num_groups:
        best_gain, best_pair = -math.inf, (0, 1)
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                gain = (_group_value(matrix, groups[a] + groups[b]) - _group_value(matrix, groups[a])
                        - _group_value(matrix, groups[b]))
                if gain > best_gain + 1e-12:
                    best_gain, best_pair = gain, (a, b)
        a, b = best_pair
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    for _ in range(max_rounds):
        improved = False
        for source in range(len(groups)):
            for task in list(groups[source]):
                if len(groups[source]) == 1:
                    continue
                without = [i for i in groups[source] if i != task]
                loss = _group_value(matrix, groups[source]) - _group_value(matrix, without)
                for target in range(len(groups)):
                    if target == source:
                        continue
                    joined = sorted(groups[target] + [task])
                    gain = _group_value(matrix, joined) - _group_value(matrix, groups[target])
                    if gain - loss > 1e-12:
                        groups[source] = without
                        groups[target] = sorted(groups[target] + [task])
                        improved = True
                        break
                if improved:
                    break
            if improved:
                break
        if not improved:
            break
    return sorted(groups)


def best_partition(
    affinity: Tensor | np.ndarray | Sequence[Sequence[float]],
    num_groups: int,
    tasks: Sequence[str] | None = None,
    *,
    exhaustive_limit: int = 10,
) -> Grouping:
    """The partition of the tasks into exactly ``num_groups`` groups with the highest :func:`grouping_score`.

    Exact (dynamic programming over subsets, ``O(g · 3^T)``) for ``T <= exhaustive_limit`` tasks; greedy
    beyond (agglomerative merging by best score gain, then single-task moves while the score improves; a good
    partition, not guaranteed optimal). NaN entries (pairs never observed) count as 0.
    """
    matrix = _as_matrix(affinity)
    t = matrix.shape[0]
    names = _names(tasks, t)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or not 1 <= num_groups <= t:
        raise ValueError(f"num_groups must be an int in [1, {t}], got {num_groups!r}")
    if exhaustive_limit > 16:
        raise ValueError(f"exhaustive_limit above 16 would enumerate 3^T subsets; got {exhaustive_limit}")
    if t <= exhaustive_limit:
        groups = _exact_partition(matrix, num_groups)
    else:
        groups = _greedy_partition(matrix, num_groups)
    return Grouping(tuple(tuple(names[i] for i in g) for g in groups), grouping_score(matrix, groups))


def suggest_groupings(
    affinity: Tensor | np.ndarray | Sequence[Sequence[float]],
    tasks: Sequence[str] | None = None,
    *,
    max_groups: int | None = None,
    exhaustive_limit: int = 10,
) -> list[Grouping]:
    """The best partition for each number of groups ``1 … max_groups`` (default: all tasks apart)."""
    matrix = _as_matrix(affinity)
    limit = matrix.shape[0] if max_groups is None else min(max_groups, matrix.shape[0])
    return [best_partition(matrix, g, tasks, exhaustive_limit=exhaustive_limit) for g in range(1, limit + 1)]


# -------------------------------------------------------------------------------------- brief training run
@dataclass
class AffinityResult:
    """What :func:`compute_task_affinity` found.

    Attributes:
        tasks: task names, the order of :attr:`matrix`.
        matrix: ``(T, T)`` mean affinity, ``[i, j] = Z_{i→j}`` (row: the task stepped on; column: the task
            whose loss is measured).
        groupings: best partition for 1, 2, … groups.
        steps: training steps run; ``observed``: steps the affinity was computed on.
        protocol: the settings used (dataset name, steps, lr, …), for the results store.
    """

    tasks: tuple[str, ...]
    matrix: Tensor
    groupings: list[Grouping]
    steps: int
    observed: int
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        matrix = [[None if math.isnan(v) else v for v in row] for row in self.matrix.detach().cpu().tolist()]
        return {
            "tasks": list(self.tasks),
            "matrix": matrix,
            "groupings": [g.to_dict() for g in self.groupings],
            "steps": self.steps,
            "observed": self.observed,
            "protocol": dict(self.protocol),
        }

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return target


class _ProbeNet(nn.Module):
    """A small hard-parameter-sharing MLP on flattened inputs: the probe model of the brief training run."""

    def __init__(self, in_features: int, outputs: Mapping[str, int], hidden: int, layers: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_features
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.trunk = nn.Sequential(nn.Flatten(), *blocks)
        self.heads = nn.ModuleDict({name: nn.Linear(width, size) for name, size in outputs.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.trunk(x)
        return {name: head(z) for name, head in self.heads.items()}


def compute_task_affinity(
    data: MultiTaskData,
    *,
    steps: int = 200,
    batch_size: int = 128,
    lr: float = 0.05,
    hidden: int = 128,
    layers: int = 2,
    every: int = 1,
    mode: AffinityMode = "exact",
    max_groups: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    monitor: ConflictMonitor | None = None,
    progress: bool | None = False,
) -> AffinityResult:
    """Train a small shared-trunk MLP briefly on ``data.train`` and measure the task affinities.

    All tasks are trained jointly with equal weights by plain SGD (learning rate ``lr``, which is also the
    lookahead step, so the lookahead is exactly the optimiser's step on the trunk); a batch's tasks without
    any label are left out of that step. This is TAG's recipe on a probe model (our choice of model: an MLP
    of ``layers`` × ``hidden`` ReLU units on the flattened input, one linear head per task), meant to be
    cheap enough to run before choosing how to group tasks.

    Args:
        data: a :class:`~taskbalance.data.MultiTaskData`.
        steps: training steps (mini-batches; epochs repeat with a fresh shuffle).
        every: compute the affinity every ``every`` steps.
        mode: ``"exact"`` lookahead or ``"first_order"`` (see :class:`TaskAffinity`).
        max_groups: largest number of groups to suggest (default: number of tasks).
        monitor: an optional :class:`~taskbalance.diagnostics.ConflictMonitor` fed on every step.
        progress: ``False`` (default): silent; ``None``: ``rich`` bars on a terminal, else one line per pass
            over the training split on stderr; ``True``: bars (see :mod:`taskbalance.progress`).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    device = torch.device(device)
    tasks = data.tasks
    names = [t.name for t in tasks]
    torch.manual_seed(seed)
    x_all = data.train.x
    model = _ProbeNet(int(np.prod(x_all.shape[1:])), {t.name: t.output_size for t in tasks}, hidden, layers)
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    affinity = TaskAffinity(names, lr=lr, every=every, mode=mode)
    shared = list(model.trunk.parameters())
    generator = torch.Generator().manual_seed(seed)
    done = 0
    per_pass = max(1, math.ceil(len(data.train) / batch_size))
    passes = math.ceil(steps / per_pass)
    with Progress("diagnose", progress, passes, min(per_pass, steps)) as bars:
        finished_passes = 0
        while done < steps:
            for xb, yb, mb in data.train.batches(batch_size, generator=generator, shuffle=True):
                if done >= steps:
                    break
                present = [t for t in tasks if bool(mb[t.name].any())]  # host data: no device sync
                if not present:
                    continue
                xb = xb.to(device)
                if not xb.is_floating_point():
                    xb = xb.float()
                yb = {k: v.to(device) for k, v in yb.items()}
                mb = {k: v.to(device) for k, v in mb.items()}

                def batch_losses(xb: Tensor = xb, yb: dict[str, Tensor] = yb, mb: dict[str, Tensor] = mb,
                                 present: list[Any] = present) -> dict[str, Tensor]:
                    out = model(xb)
                    return {t.name: t.loss(_prediction(out[t.name], t.output_size), yb[t.name], mb[t.name])
                            for t in present}

                optimizer.zero_grad(set_to_none=True)
                losses = batch_losses()
                affinity.observe(losses, shared=shared, evaluate=batch_losses)
                if monitor is not None:
                    monitor.observe(losses, shared=shared)
                torch.stack(list(losses.values())).sum().backward()
                optimizer.step()
                done += 1
                bars.step()
            finished_passes += 1
            bars.epoch(min(finished_passes, passes), f"step {done}/{steps}")
    matrix = affinity.matrix()
    protocol = {"dataset": data.name, "steps": steps, "batch_size": batch_size, "lr": lr, "hidden": hidden,
                "layers": layers, "every": every, "mode": mode, "seed": seed}
    return AffinityResult(tuple(names), matrix, suggest_groupings(matrix, names, max_groups=max_groups), done,
                          affinity.steps_observed, protocol)


def _prediction(output: Tensor, size: int) -> Tensor:
    return output.squeeze(-1) if size == 1 else output


# ---------------------------------------------------------------------------------------------- plot
def affinity_colour_limit(affinity: Tensor | np.ndarray | Sequence[Sequence[float]]) -> float:
    """Half-range of the heatmap's symmetric colour scale: the largest finite ``|Z(i → j)|`` with ``i ≠ j``.

    The diagonal (self-affinity) is left out; 1.0 when no off-diagonal cell is finite and non-zero.
    """
    matrix = _as_matrix(affinity)
    values = matrix[~np.eye(matrix.shape[0], dtype=bool)]
    finite = np.abs(values[np.isfinite(values)])
    largest = float(finite.max()) if finite.size else 0.0
    return largest if largest > 0 else 1.0


def plot_affinity(
    affinity: Tensor | np.ndarray | Sequence[Sequence[float]],
    tasks: Sequence[str] | None,
    path: str | os.PathLike[str],
    *,
    title: str = "Inter-task affinity Z(i → j)",
    annotate: bool = True,
) -> Path:
    """Save a heatmap of the affinity matrix as a PNG (needs matplotlib: ``pip install taskbalance[report]``).

    Rows are the task stepped on (``i``), columns the task whose loss is measured (``j``); the diverging
    colour map is centred on 0 (blue: helps, red: hurts). Its range is set by the off-diagonal cells only
    (:func:`affinity_colour_limit`): the self-affinities ``Z(i → i)`` are usually far larger and would wash
    every cross-task cell out to white, so the diagonal is drawn in grey with its value written on it. NaN
    (never observed) cells are left blank. Returns the path.
    """
    figure = affinity_figure(affinity, tasks, title=title, annotate=annotate)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, format="png", dpi=110)
    return target


def affinity_figure(
    affinity: Tensor | np.ndarray | Sequence[Sequence[float]],
    tasks: Sequence[str] | None,
    *,
    title: str = "Inter-task affinity Z(i → j)",
    annotate: bool = True,
) -> Any:
    """The matplotlib ``Figure`` that :func:`plot_affinity` saves (Agg canvas attached)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError("plot_affinity needs matplotlib: pip install 'taskbalance[report]'") from error
    if isinstance(affinity, Tensor):
        affinity = affinity.detach().cpu().double().numpy()
    matrix = np.array(affinity, dtype=np.float64)
    names = _names(tasks, matrix.shape[0])
    limit = affinity_colour_limit(matrix)
    size = max(3.5, 0.6 * len(names) + 2.0)
    figure = Figure(figsize=(size + 1.0, size))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    diagonal = np.eye(matrix.shape[0], dtype=bool)
    grey = np.where(diagonal & np.isfinite(matrix), 1.0, np.nan)
    axes.imshow(np.ma.masked_invalid(grey), cmap="Greys", vmin=0.0, vmax=4.0)  # light grey: not on the scale
    off_diagonal = np.where(diagonal, np.nan, matrix)
    image = axes.imshow(np.ma.masked_invalid(off_diagonal), cmap="RdBu", vmin=-limit, vmax=limit)
    axes.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), labels=names)
    axes.set_xlabel("onto task j (loss measured)")
    axes.set_ylabel("from task i (step taken)")
    axes.set_title(title)
    if annotate and len(names) <= 12:
        for i in range(len(names)):
            for j in range(len(names)):
                if np.isfinite(matrix[i, j]):
                    dark = i != j and abs(matrix[i, j]) > 0.6 * limit
                    axes.text(j, i, f"{matrix[i, j]:.2g}", ha="center", va="center", fontsize=8,
                              color="white" if dark else "black")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="Z(i → j), i ≠ j (diagonal: grey)")
    figure.tight_layout()
    return figure
