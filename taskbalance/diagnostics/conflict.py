"""Gradient-conflict statistics in the user's own loop, and the per-step histories a run persists.

Statistics of the per-task gradients ``g_1 … g_K`` of the shared part, all computed from the ``K × K`` Gramian
``G = J Jᵀ`` (so they cost nothing once a gradient-level balancer has it):

* pairwise cosine similarity ``cos_ij = G_ij / (‖g_i‖ ‖g_j‖)``;
* conflict rate: the fraction of task pairs ``i < j`` with ``cos_ij < 0``;
* gradient-magnitude similarity (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Def. 2)
  ``GMS_ij = 2 ‖g_i‖ ‖g_j‖ / (‖g_i‖² + ‖g_j‖²)`` — 1 for equal norms, → 0 as one dominates;
* norm ratios ``‖g_i‖ / ‖g_j‖`` and each task's norm relative to the mean norm of the tasks in the step.

Conventions (**our choice**, the papers leave them open): a zero gradient has cosine 0 with everything (so it
never counts as a conflict); ``GMS`` of two zero gradients is 1 (equal magnitudes); tasks absent from a step
give NaN entries in per-step tensors and are left out of averages; with fewer than two tasks the conflict rate
is NaN. :class:`ConflictMonitor` wires these into a training loop; :class:`ConflictHistory` and
:class:`WeightTrajectory` are the small JSON-ready structures a trainer or results store keeps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..balancers.inputs import collect_losses, validate_tasks
from ..jacobian import feature_jacobian, parameter_jacobian
from ..record import StepRecord
from ..sinks.base import Sink

__all__ = [
    "ConflictHistory",
    "ConflictMonitor",
    "ConflictStats",
    "ConflictSummary",
    "WeightTrajectory",
    "conflict_rate",
    "conflict_statistics",
    "cosine_similarity_matrix",
    "gradient_magnitude_similarity",
    "pair_names",
]

_TINY = 1e-30


def _norms(gramian: Tensor) -> Tensor:
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"expected a square k × k Gramian, got shape {tuple(gramian.shape)}")
    return gramian.diagonal().clamp_min(0).sqrt()


def cosine_similarity_matrix(gramian: Tensor) -> Tensor:
    """``cos_ij = G_ij / (‖g_i‖ ‖g_j‖)`` from a ``k × k`` Gramian, in ``[-1, 1]``; 0 for a zero gradient."""
    norms = _norms(gramian)
    scale = norms[:, None] * norms[None, :]
    cosine = torch.where(scale > 0, gramian / scale.clamp_min(_TINY), torch.zeros_like(gramian))
    return cosine.clamp(-1.0, 1.0)


def gradient_magnitude_similarity(gramian: Tensor) -> Tensor:
    """``GMS_ij = 2 ‖g_i‖ ‖g_j‖ / (‖g_i‖² + ‖g_j‖²)`` (Yu et al. 2020, Def. 2); 1 where both are zero."""
    norms = _norms(gramian)
    squares = norms**2
    denominator = squares[:, None] + squares[None, :]
    similarity = 2 * norms[:, None] * norms[None, :] / denominator.clamp_min(_TINY)
    return torch.where(denominator > 0, similarity, torch.ones_like(similarity))


def conflict_rate(gramian: Tensor) -> Tensor:
    """Fraction of pairs ``i < j`` with conflicting gradients (``cos_ij < 0``), 0-d; NaN if ``k < 2``."""
    k = gramian.shape[0]
    upper = torch.triu_indices(k, k, 1, device=gramian.device)
    conflicts = gramian[upper[0], upper[1]] < 0  # the sign of G_ij is the sign of cos_ij
    return conflicts.to(gramian.dtype).mean() if k > 1 else gramian.new_full((), math.nan)


def pair_names(tasks: Sequence[str]) -> list[str]:
    """``"a~b"`` for every pair ``i < j``, in the order of ``torch.triu_indices(K, K, 1)``."""
    return [f"{a}~{b}" for i, a in enumerate(tasks) for b in tasks[i + 1:]]


@dataclass(frozen=True)
class ConflictStats:
    """Conflict statistics of one step, as tensors on the gradients' device (no host synchronisation).

    Attributes:
        tasks: all task names (the monitor's order).
        index: positions of the tasks present in this step (known on the host without synchronising).
        norms: ``(K,)`` gradient norms ``‖g_i‖`` (NaN for absent tasks).
        cosine: ``(K, K)`` cosine similarities (NaN where a task is absent).
        magnitude_similarity: ``(K, K)`` GMS (NaN where a task is absent).
        norm_ratio: ``(K, K)`` ``‖g_i‖ / ‖g_j‖`` (NaN where a task is absent; very large if ``g_j = 0``).
        conflict_rate: 0-d fraction of present pairs with negative cosine (NaN with fewer than two tasks).
    """

    tasks: tuple[str, ...]
    index: tuple[int, ...]
    norms: Tensor
    cosine: Tensor
    magnitude_similarity: Tensor
    norm_ratio: Tensor
    conflict_rate: Tensor

    @property
    def relative_norms(self) -> Tensor:
        """``(K,)`` each norm divided by the mean norm of the present tasks (NaN for absent tasks)."""
        present = self.norms[list(self.index)]
        return self.norms / present.mean().clamp_min(_TINY)

    def to_scalars(self, prefix: str = "conflict") -> dict[str, float]:
        """Flat ``{name: float}`` for a sink (one host synchronisation); absent tasks and pairs are left out.

        Names: ``<prefix>/conflict_rate``, ``<prefix>/cosine/<a>~<b>``,
        ``<prefix>/magnitude_similarity/<a>~<b>``, ``<prefix>/grad_norm/<a>``, ``<prefix>/relative_norm/<a>``,
        ``<prefix>/max_norm_ratio``.
        """
        k = len(self.tasks)
        upper = torch.triu_indices(k, k, 1, device=self.cosine.device)
        packed = torch.cat([
            self.conflict_rate.reshape(1).to(self.norms.dtype),
            self.norms,
            self.relative_norms,
            self.cosine[upper[0], upper[1]],
            self.magnitude_similarity[upper[0], upper[1]],
        ]).detach().cpu().tolist()
        rate, norms = packed[0], packed[1:1 + k]
        relative = packed[1 + k:1 + 2 * k]
        n_pairs = k * (k - 1) // 2
        cosines = packed[1 + 2 * k:1 + 2 * k + n_pairs]
        similarities = packed[1 + 2 * k + n_pairs:]
        present = set(self.index)
        out: dict[str, float] = {}
        if len(present) > 1:
            out[f"{prefix}/conflict_rate"] = rate
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        for (i, j), name, cos, gms in zip(pairs, pair_names(self.tasks), cosines, similarities, strict=True):
            if i in present and j in present:
                out[f"{prefix}/cosine/{name}"] = cos
                out[f"{prefix}/magnitude_similarity/{name}"] = gms
        for i in sorted(present):
            out[f"{prefix}/grad_norm/{self.tasks[i]}"] = norms[i]
            out[f"{prefix}/relative_norm/{self.tasks[i]}"] = relative[i]
        present_norms = [norms[i] for i in present]
        if len(present_norms) > 1:
            out[f"{prefix}/max_norm_ratio"] = max(present_norms) / max(min(present_norms), _TINY)
        return out


def conflict_statistics(
    gramian: Tensor, tasks: Sequence[str] | None = None, index: Sequence[int] | None = None
) -> ConflictStats:
    """All statistics of one step from the ``k × k`` Gramian of the present tasks' gradients.

    Args:
        gramian: ``G = J Jᵀ`` of the ``k`` present tasks (parameter- or feature-level gradients).
        tasks: all task names (default ``t0 … t{k-1}``).
        index: positions in ``tasks`` of the ``k`` rows of ``gramian`` (default: all of them, in order).
    """
    k = gramian.shape[0]
    names = tuple(tasks) if tasks is not None else tuple(f"t{i}" for i in range(k))
    positions = tuple(index) if index is not None else tuple(range(len(names)))
    if len(positions) != k:
        raise ValueError(f"the Gramian has {k} rows but {len(positions)} present task positions were given")
    gramian = gramian.detach()
    norms = _norms(gramian)
    cosine = cosine_similarity_matrix(gramian)
    similarity = gradient_magnitude_similarity(gramian)
    ratio = norms[:, None] / norms[None, :].clamp_min(_TINY)
    full = len(names)
    if positions == tuple(range(full)):
        return ConflictStats(names, positions, norms, cosine, similarity, ratio, conflict_rate(gramian))
    at = torch.tensor(positions, dtype=torch.long, device=gramian.device)
    return ConflictStats(
        names,
        positions,
        gramian.new_full((full,), math.nan).index_copy(0, at, norms),
        _expand(cosine, at, full),
        _expand(similarity, at, full),
        _expand(ratio, at, full),
        conflict_rate(gramian),
    )


def _expand(matrix: Tensor, at: Tensor, full: int) -> Tensor:
    rows = matrix.new_full((matrix.shape[0], full), math.nan).index_copy(1, at, matrix)
    return matrix.new_full((full, full), math.nan).index_copy(0, at, rows)


@dataclass(frozen=True)
class ConflictSummary:
    """Averages over the steps a :class:`ConflictMonitor` observed (tensors; NaN where never observed).

    Attributes:
        tasks: task names.
        steps_observed: number of steps the statistics were computed on.
        cosine: ``(K, K)`` mean cosine of each pair over the steps both tasks were present.
        magnitude_similarity: ``(K, K)`` mean GMS, same averaging.
        conflict_frequency: ``(K, K)`` fraction of those steps on which the pair conflicted.
        norms: ``(K,)`` mean gradient norm of each task over the steps it was present.
        conflict_rate: 0-d mean per-step conflict rate.
    """

    tasks: tuple[str, ...]
    steps_observed: int
    cosine: Tensor
    magnitude_similarity: Tensor
    conflict_frequency: Tensor
    norms: Tensor
    conflict_rate: Tensor

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready lists (one host synchronisation); NaN becomes ``None``."""
        return {
            "tasks": list(self.tasks),
            "steps_observed": self.steps_observed,
            "cosine": _json(self.cosine),
            "magnitude_similarity": _json(self.magnitude_similarity),
            "conflict_frequency": _json(self.conflict_frequency),
            "norms": _json(self.norms),
            "conflict_rate": _json(self.conflict_rate),
        }


def _json(tensor: Tensor) -> Any:
    return _nan_to_none(tensor.detach().cpu().tolist())


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _none_to_nan(value: Any) -> Any:
    if isinstance(value, list):
        return [_none_to_nan(v) for v in value]
    return math.nan if value is None else value


@dataclass
class ConflictHistory:
    """Per-step conflict statistics of a run as plain lists; the results store saves :meth:`to_dict` as JSON.

    Attributes:
        tasks: task names.
        steps: the training steps that were observed.
        conflict_rate: per observed step (``None`` with fewer than two tasks present).
        cosine: per observed step, the cosine of every pair ``i < j`` in :func:`pair_names` order.
        magnitude_similarity: same layout, the GMS.
        norms: per observed step, the gradient norm of every task.

    Missing values (absent tasks) are ``None``.
    """

    tasks: list[str]
    steps: list[int] = field(default_factory=list)
    conflict_rate: list[float | None] = field(default_factory=list)
    cosine: list[list[float | None]] = field(default_factory=list)
    magnitude_similarity: list[list[float | None]] = field(default_factory=list)
    norms: list[list[float | None]] = field(default_factory=list)

    @property
    def pairs(self) -> list[str]:
        """Names ``"a~b"`` of the columns of :attr:`cosine` and :attr:`magnitude_similarity`."""
        return pair_names(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "pairs": self.pairs,
            "steps": list(self.steps),
            "conflict_rate": list(self.conflict_rate),
            "cosine": [list(row) for row in self.cosine],
            "magnitude_similarity": [list(row) for row in self.magnitude_similarity],
            "norms": [list(row) for row in self.norms],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConflictHistory:
        return cls(
            tasks=list(data["tasks"]),
            steps=[int(s) for s in data["steps"]],
            conflict_rate=list(data["conflict_rate"]),
            cosine=[list(row) for row in data["cosine"]],
            magnitude_similarity=[list(row) for row in data["magnitude_similarity"]],
            norms=[list(row) for row in data["norms"]],
        )


class ConflictMonitor(nn.Module):
    """Gradient-conflict statistics every ``every`` steps of the user's own loop, beside any balancer.

    Two ways to feed it, one call per training step:

    * ``monitor.observe(losses, shared=model.trunk.parameters())`` **before** ``balancer.backward(...)``: on
      an active step it computes the per-task gradients with the batched Jacobian engine (one vmapped backward
      of ``K`` rows, with ``retain_graph=True`` so the balancer's backward still works); ``features=z``
      instead of ``shared=`` measures conflict on the shared representation (MGDA-UB style; cheaper, since
      only the heads are back-propagated). It works with any balancer, loss-level ones included.
    * ``monitor.observe_record(record)`` **after** ``record = balancer.backward(...)``, for gradient-level
      balancers that put the Gramian of the gradients they used in ``record.extras["gramian"]``: no extra
      backward at all.

    Cost: an inactive step is a counter increment — no graph is retained, no tensor touched, no host read.
    An active step costs one batched per-task backward (``observe``) or nothing (``observe_record``), plus
    ``O(K²)`` tensor ops; statistics stay on the device. Only when a ``sink`` is given is there a host read,
    once per active step, to write the scalars (see :meth:`ConflictStats.to_scalars` for the names).

    Steps are counted by calls; the first call is active, then every ``every``-th (steps ``0, n, 2n, …``;
    our choice). The monitor's state (step counter, running sums, history) is in ``state_dict()``, so a
    resumed run continues bit-for-bit; keep ``history=False`` for very long runs with many tasks if memory
    matters.

    Args:
        tasks: task names, as given to the balancer.
        every: observe one step in ``every`` (``>= 1``).
        sink: optional :class:`~taskbalance.sinks.Sink` written on every active step.
        history: keep per-step statistics for :meth:`history` (default true).
        prefix: name prefix of the scalars written to the sink.
    """

    cosine_sum: Tensor
    magnitude_similarity_sum: Tensor
    conflict_count: Tensor
    pair_count: Tensor
    norm_sum: Tensor
    task_count: Tensor
    conflict_rate_sum: Tensor
    conflict_rate_count: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        every: int = 10,
        sink: Sink | None = None,
        history: bool = True,
        prefix: str = "conflict",
    ) -> None:
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if sink is not None and not isinstance(sink, Sink):
            raise TypeError(f"sink must be a taskbalance.sinks.Sink, got {type(sink).__name__}")
        self.tasks: tuple[str, ...] = validate_tasks(tasks)
        self._task_index = {name: i for i, name in enumerate(self.tasks)}
        self.every = every
        self.sink = sink
        self.keep_history = history
        self.prefix = prefix
        self.step_count = 0
        self.steps_observed = 0
        self._history_steps: list[int] = []
        self._history_rows: list[Tensor] = []
        k = len(self.tasks)
        self.register_buffer("cosine_sum", torch.zeros(k, k))
        self.register_buffer("magnitude_similarity_sum", torch.zeros(k, k))
        self.register_buffer("conflict_count", torch.zeros(k, k))
        self.register_buffer("pair_count", torch.zeros(k, k))
        self.register_buffer("norm_sum", torch.zeros(k))
        self.register_buffer("task_count", torch.zeros(k))
        self.register_buffer("conflict_rate_sum", torch.zeros(()))
        self.register_buffer("conflict_rate_count", torch.zeros(()))

    # ------------------------------------------------------------------ loop API
    @property
    def active(self) -> bool:
        """Whether the next ``observe*`` call computes statistics."""
        return self.step_count % self.every == 0

    def observe(
        self,
        losses: Mapping[str, Tensor],
        *,
        shared: Iterable[Tensor] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
    ) -> ConflictStats | None:
        """Count one step; on an active step compute the statistics from the losses' graph.

        Call it before ``balancer.backward(losses, ...)`` (the graph is retained for it). Tasks left out of
        ``losses`` are absent for this step. Returns the step's :class:`ConflictStats`, or ``None`` on an
        inactive step.
        """
        if shared is None and features is None:
            raise ValueError("observe needs shared=model.trunk.parameters() or features=z")
        if not self._begin_step():
            return None
        batch = collect_losses(losses, self.tasks, self._task_index, "propagate", method="ConflictMonitor")
        roots = batch.present_values
        if not roots.requires_grad:
            raise RuntimeError(
                "none of the given losses requires grad; compute them from the model under autograd"
            )
        try:
            if shared is not None:
                inputs = [p for p in shared if p.requires_grad]
                if not inputs:
                    raise ValueError("shared= contained no parameter that requires grad")
                jacobian = parameter_jacobian(roots, inputs, retain_graph=True)
            else:
                assert features is not None
                feature_list = [features] if isinstance(features, Tensor) else list(features)
                jacobian = feature_jacobian(roots, feature_list, retain_graph=True)
        except RuntimeError as error:
            if "second time" in str(error):
                raise RuntimeError(
                    "the losses' graph was already freed: call monitor.observe(losses, ...) before "
                    "balancer.backward(losses, ...), or use monitor.observe_record(record) after it"
                ) from error
            raise
        wide = jacobian.to(torch.float64)  # float64, as the balancers' Gramian (exact for wide trunks)
        return self._update(wide @ wide.T, batch.index)

    def observe_record(self, record: StepRecord) -> ConflictStats | None:
        """Count one step; on an active step use the Gramian a gradient-level balancer left in its record.

        Raises:
            KeyError: the record has no ``extras["gramian"]`` (e.g. a loss-level method); use :meth:`observe`.
        """
        gramian = record.extras.get("gramian")
        if gramian is None:
            raise KeyError(
                "this record carries no 'gramian' extra (loss-level methods and some gradient methods do not "
                "expose one); call monitor.observe(losses, shared=...) before balancer.backward instead"
            )
        if tuple(record.tasks) != self.tasks:
            raise ValueError(
                f"record tasks {list(record.tasks)} differ from the monitor's {list(self.tasks)}"
            )
        if not self._begin_step():
            return None
        index = [i for i, name in enumerate(self.tasks) if name not in record.skipped]
        return self._update(gramian, index)

    def observe_gramian(self, gramian: Tensor, present: Sequence[str] | None = None) -> ConflictStats | None:
        """Count one step; on an active step use ``gramian`` (``k × k``, rows in the order of ``present``)."""
        if not self._begin_step():
            return None
        names = list(self.tasks) if present is None else list(present)
        unknown = [n for n in names if n not in self._task_index]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; the monitor tracks {list(self.tasks)}")
        return self._update(gramian, sorted(self._task_index[n] for n in names))

    # ------------------------------------------------------------------ results
    def summary(self) -> ConflictSummary:
        """Averages over the observed steps (tensors on the monitor's device; no host read)."""
        pairs = self.pair_count
        nan = torch.full_like(pairs, math.nan)
        seen = self.task_count
        return ConflictSummary(
            tasks=self.tasks,
            steps_observed=self.steps_observed,
            cosine=torch.where(pairs > 0, self.cosine_sum / pairs.clamp_min(1), nan),
            magnitude_similarity=torch.where(
                pairs > 0, self.magnitude_similarity_sum / pairs.clamp_min(1), nan
            ),
            conflict_frequency=torch.where(pairs > 0, self.conflict_count / pairs.clamp_min(1), nan),
            norms=torch.where(seen > 0, self.norm_sum / seen.clamp_min(1), torch.full_like(seen, math.nan)),
            conflict_rate=torch.where(
                self.conflict_rate_count > 0,
                self.conflict_rate_sum / self.conflict_rate_count.clamp_min(1),
                torch.full_like(self.conflict_rate_sum, math.nan),
            ),
        )

    def history(self) -> ConflictHistory:
        """The per-step statistics kept so far, as plain lists (one host synchronisation)."""
        if not self.keep_history:
            raise RuntimeError("this monitor was created with history=False")
        k = len(self.tasks)
        n_pairs = k * (k - 1) // 2
        out = ConflictHistory(tasks=list(self.tasks), steps=list(self._history_steps))
        if not self._history_rows:
            return out
        rows = _nan_to_none(torch.stack(self._history_rows).cpu().tolist())
        for row in rows:
            out.conflict_rate.append(row[0])
            out.norms.append(row[1:1 + k])
            out.cosine.append(row[1 + k:1 + k + n_pairs])
            out.magnitude_similarity.append(row[1 + k + n_pairs:])
        return out

    # ------------------------------------------------------------------ internals
    def _begin_step(self) -> bool:
        active = self.step_count % self.every == 0
        # plain attribute write: nn.Module.__setattr__ costs microseconds, which an inactive step should not
        object.__setattr__(self, "step_count", self.step_count + 1)
        return active

    def _update(self, gramian: Tensor, index: Sequence[int]) -> ConflictStats:
        gramian = gramian.detach()
        if gramian.device != self.cosine_sum.device:
            self.to(gramian.device)
        stats = conflict_statistics(gramian, self.tasks, index)
        dtype = self.cosine_sum.dtype
        observed = ~torch.isnan(stats.cosine)
        zero = torch.zeros_like(self.cosine_sum)
        self.cosine_sum.add_(torch.where(observed, stats.cosine.to(dtype), zero))
        self.magnitude_similarity_sum.add_(torch.where(observed, stats.magnitude_similarity.to(dtype), zero))
        self.conflict_count.add_((observed & (stats.cosine < 0)).to(dtype))
        self.pair_count.add_(observed.to(dtype))
        seen = ~torch.isnan(stats.norms)
        self.norm_sum.add_(torch.where(seen, stats.norms.to(dtype), torch.zeros_like(self.norm_sum)))
        self.task_count.add_(seen.to(dtype))
        if len(index) > 1:
            self.conflict_rate_sum.add_(stats.conflict_rate.to(dtype))
            self.conflict_rate_count.add_(1)
        step = self.step_count - 1
        self.steps_observed += 1
        if self.keep_history:
            k = len(self.tasks)
            upper = torch.triu_indices(k, k, 1, device=gramian.device)
            self._history_steps.append(step)
            self._history_rows.append(torch.cat([
                stats.conflict_rate.reshape(1).to(dtype),
                stats.norms.to(dtype),
                stats.cosine[upper[0], upper[1]].to(dtype),
                stats.magnitude_similarity[upper[0], upper[1]].to(dtype),
            ]))
        if self.sink is not None:
            self.sink.log_scalars(step, stats.to_scalars(self.prefix))  # the one host read, on active steps
        return stats

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "step_count": self.step_count,
            "steps_observed": self.steps_observed,
            "history_steps": list(self._history_steps),
            "history_rows": [row.clone() for row in self._history_rows],
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.steps_observed = int(state["steps_observed"])
        self._history_steps = [int(s) for s in state["history_steps"]]
        self._history_rows = [row.to(self.cosine_sum.device) for row in state["history_rows"]]

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}, every={self.every}"


@dataclass
class WeightTrajectory:
    """Task weights and losses over a run, from the balancers' :class:`~taskbalance.StepRecord` s.

    ``append(step, record)`` keeps detached device tensors (no host read); :meth:`to_dict` moves everything to
    the host once, as JSON-ready lists (losses of tasks skipped in a step are ``None``)::

        trajectory = WeightTrajectory(balancer.tasks)
        ...
        record = balancer.backward(losses, shared=...)
        if step % 10 == 0:
            trajectory.append(step, record)
        ...
        json.dump(trajectory.to_dict(), handle)

    Attributes:
        tasks: task names.
        steps: the training steps appended.
    """

    tasks: tuple[str, ...]
    steps: list[int] = field(default_factory=list)
    _weights: list[Tensor] = field(default_factory=list, repr=False)
    _losses: list[Tensor] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.tasks = validate_tasks(self.tasks)

    def __len__(self) -> int:
        return len(self.steps)

    def append(self, step: int, record: StepRecord) -> None:
        """Keep the weights and losses of ``record`` (taken at training step ``step``)."""
        if tuple(record.tasks) != self.tasks:
            raise ValueError(
                f"record tasks {list(record.tasks)} differ from the trajectory's {list(self.tasks)}"
            )
        losses = record.losses.detach()
        if record.skipped:
            losses = torch.where(record.present, losses, torch.full_like(losses, math.nan))
        self.steps.append(int(step))
        self._weights.append(record.weights.detach())
        self._losses.append(losses)

    @property
    def weights(self) -> Tensor:
        """``(N, K)`` weights, one row per appended step."""
        return torch.stack(self._weights) if self._weights else torch.zeros(0, len(self.tasks))

    @property
    def losses(self) -> Tensor:
        """``(N, K)`` losses (NaN for skipped tasks)."""
        return torch.stack(self._losses) if self._losses else torch.zeros(0, len(self.tasks))

    def to_dict(self) -> dict[str, Any]:
        """``{"tasks", "steps", "weights", "losses"}`` as lists (one host synchronisation)."""
        return {
            "tasks": list(self.tasks),
            "steps": list(self.steps),
            "weights": _json(self.weights),
            "losses": _json(self.losses),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WeightTrajectory:
        return cls(
            tuple(data["tasks"]),
            [int(s) for s in data["steps"]],
            [torch.tensor(_none_to_nan(row)) for row in data["weights"]],
            [torch.tensor(_none_to_nan(row)) for row in data["losses"]],
        )
