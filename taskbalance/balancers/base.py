"""The :class:`Balancer` contract and the two family bases built on it.

A balancer replaces ``loss.backward()``::

    balancer = taskbalance.make("ema", tasks=["seg", "depth"])
    record = balancer.backward({"seg": l_seg, "depth": l_depth}, shared=model.trunk.parameters())
    optimizer.step()

It fills ``.grad`` of every parameter the losses reach: shared parameters with the balanced update,
task-specific parameters with their own task's gradient scaled as the method says. It owns no model code
and nothing is injected into it behind its back; its whole state round-trips through ``state_dict()``.

**The training-loop protocol** (identical for every method; no-ops where a method does not use them):

* ``balancer.backward(losses, shared=..., features=...)`` once per step, instead of ``loss.backward()``;
* ``balancer.end_epoch()`` after each epoch (DWA, STCH and GradNorm read epoch-averaged losses, which the
  balancer accumulates itself from the losses it saw);
* if ``balancer.needs_post_step_losses``: after ``optimizer.step()``, recompute the losses on the same
  batch under ``torch.no_grad()`` and pass them to ``balancer.after_step(losses)`` (FAMO);
* if ``balancer.extra_batches``: pass ``backward(..., extra_losses=fn)``, a closure returning the losses on
  the next batch of ``balancer.extra_batch_source`` (Auto-λ, ARML, MoDo, SDMGrad, HydaLearn's held-out
  variant; :mod:`taskbalance.balancers.extra_batches`, ``docs/extra-batches.md``). It may always be passed:
  methods that draw no extra batch never call it.

**Scaling out** (``docs/scaling.md``): ``balancer.set_reducer(DistributedReducer())`` makes every rank of a
data-parallel job take the step one process would take on the global batch (see
:mod:`taskbalance.distributed`); ``backward(..., scaler=scaler)`` works with ``torch.amp.GradScaler``.

Learnable balancer parameters (UW's log-variances, GradNorm's logits, …) are ``nn.Parameter`` s reachable
through ``balancer.parameters()``: add them to your optimiser, e.g.
``torch.optim.Adam([*model.parameters(), *balancer.parameters()])``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import Tensor, nn

from ..batching import BatchingChoice
from ..gramian import GramianEngine
from ..jacobian import (
    JacobianBlocks,
    accumulate_grad,
    add_to_grad,
    backward_through,
    exact_gramian,
    jacobian_blocks,
    reachable_leaves,
)
from ..record import StepRecord
from .extra_batches import ExtraBatches, ExtraBatchSource, LossClosure, missing_closure_message
from .inputs import NonFinitePolicy, TaskLosses, collect_losses, nonfinite_drops, validate_tasks
from .registry import MethodInfo
from .state import check_loadable

__all__ = [
    "Balancer",
    "LossBalancer",
    "GradientBalancer",
    "GradientStep",
    "Aggregation",
    "GradientLevel",
    "GradientNeed",
    "EngineChoice",
    "Reducer",
]

GradientLevel = Literal["parameters", "features"]
GradientNeed = Literal["gramian", "jacobian"]
EngineChoice = Literal["auto", "gramian", "jacobian"]
_POLICIES = ("raise", "skip", "propagate")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class Reducer(Protocol):
    """What a balancer asks of a data-parallel communicator (implemented by
    :class:`taskbalance.distributed.DistributedReducer`; see ``docs/scaling.md``)."""

    def globalize_losses(self, losses: Mapping[str, Tensor], tasks: tuple[str, ...]) -> Mapping[str, Tensor]:
        """The losses with their *values* replaced by the global-batch values (gradients stay local)."""
        ...

    def reduce_jacobian(self, jacobian: Tensor, level: GradientLevel) -> Tensor:
        """The global-batch Jacobian from this rank's one."""
        ...

    def local_direction(self, direction: Tensor, level: GradientLevel) -> Tensor:
        """This rank's share of a global update computed from :meth:`reduce_jacobian`'s output."""
        ...

    def backward_mean(
        self, roots: Sequence[Tensor], grad_tensors: Sequence[Tensor], inputs: Sequence[Tensor]
    ) -> None:
        """Back-propagate locally and accumulate the rank-averaged gradient into ``inputs``' ``.grad``."""
        ...


class Balancer(nn.Module):
    """Base of every balancing method.

    Args:
        tasks: task names, fixed for the balancer's life. Losses are passed keyed by these names.
        on_nonfinite: what to do with a NaN/inf task loss, and (gradient-level methods) a NaN/inf per-task
            gradient of a finite loss: ``"raise"`` (default) raises :class:`~taskbalance.NonFiniteLossError` /
            :class:`~taskbalance.NonFiniteGradientError` naming the task and leaves the state and every
            ``.grad`` untouched; ``"skip"`` leaves such tasks out of the step (as if missing;
            ``record.skipped`` says why); ``"propagate"`` does no check at all (no host read per step; NaN
            flows as in plain PyTorch, into the method's state too).

    Subclasses implement :meth:`_step`. Python-side counters live in ``step_count`` / ``epoch_count``
    and in the attributes named by ``extra_state_fields``; they are saved through ``state_dict()``.
    """

    info: ClassVar[MethodInfo]
    needs_post_step_losses: ClassVar[bool] = False
    takes_log_of_losses: ClassVar[bool] = False
    extra_state_fields: ClassVar[tuple[str, ...]] = ()
    # Gradient-level methods apply on_nonfinite to losses and gradients together, in one host read.
    _screens_gradients: ClassVar[bool] = False
    # State entries whose size is set at the first step (load_state_dict accepts another shape for them).
    resizable_state: ClassVar[tuple[str, ...]] = ()
    #: Batches beyond the step's own that the method reads per step (the extra-batch protocol); a class
    #: default that an instance may override (e.g. HydaLearn's ``main_gradient="held_out"``).
    extra_batches: int = 0
    #: Where those batches come from: ``"training"`` (independent training batches) or ``"validation"``.
    extra_batch_source: ExtraBatchSource | None = None

    def __init__(self, tasks: Sequence[str], *, on_nonfinite: NonFinitePolicy = "raise") -> None:
        super().__init__()
        if on_nonfinite not in _POLICIES:
            raise ValueError(f"on_nonfinite must be one of {_POLICIES}, got {on_nonfinite!r}")
        self.tasks: tuple[str, ...] = validate_tasks(tasks)
        self.on_nonfinite: NonFinitePolicy = on_nonfinite
        self._task_index = {name: i for i, name in enumerate(self.tasks)}
        self.step_count = 0
        self.epoch_count = 0
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)
        self._reducer: Reducer | None = None  # transient: not part of the state
        self._grad_scale: Tensor | None = None  # set only during backward(..., scaler=...)
        self._extra_losses: LossClosure | None = None  # set only during backward(..., extra_losses=...)

    @property
    def num_tasks(self) -> int:
        """Number of tasks K."""
        return len(self.tasks)

    @property
    def name(self) -> str:
        """Registry name of the method."""
        return self.info.name

    @property
    def reducer(self) -> Reducer | None:
        """The data-parallel reducer set with :meth:`set_reducer`, or ``None`` (single process)."""
        return self._reducer

    def set_reducer(self, reducer: Reducer | None) -> Balancer:
        """Take global-batch steps under data parallelism (``None`` goes back to single-process behaviour).

        With a reducer, the loss values that drive the weights and the state are averaged over ranks (so every
        rank keeps an identical state), and gradient-level methods average the per-task Jacobian and the head
        gradients over ranks. See :mod:`taskbalance.distributed` and ``docs/scaling.md``. Returns ``self``.
        """
        self._reducer = reducer
        return self

    # ------------------------------------------------------------------ protocol
    def backward(
        self,
        losses: Mapping[str, Tensor],
        *,
        shared: Iterable[Tensor] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
        scaler: Any = None,
        extra_losses: LossClosure | None = None,
    ) -> StepRecord:
        """Back-propagate the balanced combination of ``losses``; replaces ``loss.backward()``.

        Args:
            losses: ``{task name: scalar loss}``. Tasks left out (no labels in this batch) are skipped for
                this step: weight 0, state not updated, listed in ``record.skipped``.
            shared: the shared parameters (e.g. ``model.trunk.parameters()``). Required by gradient-level
                methods in parameter mode; ignored by loss-level methods.
            features: the shared representation tensor(s) the task heads read. Required by gradient-level
                methods in feature mode (``gradients="features"``); ignored otherwise.
            scaler: an enabled ``torch.amp.GradScaler`` for float16 mixed precision. Pass the *unscaled*
                losses: weights and state are computed from true loss values and true (unscaled) per-task
                gradients; the backward passes run on scaled losses and ``.grad`` is left *scaled*, so
                ``scaler.step(optimizer)`` / ``scaler.update()`` follow as usual (they unscale, and skip the
                step on overflow). On an overflowing step a gradient method's buffers are restored on-device.
            extra_losses: the extra-batch closure (required when :attr:`extra_batches` > 0, never called
                otherwise): each call evaluates the model, with its current parameters and under autograd, on
                the next batch of :attr:`extra_batch_source` and returns ``{task: scalar loss}``. See
                :mod:`taskbalance.balancers.extra_batches`.

        Returns:
            A :class:`~taskbalance.StepRecord` of detached tensors (weights, losses, skipped tasks).
        """
        if self.extra_batches:
            if extra_losses is None:
                raise ValueError(
                    missing_closure_message(self.info.name, self.extra_batches, str(self.extra_batch_source))
                )
            if not callable(extra_losses):
                raise TypeError(f"extra_losses must be a callable, got {type(extra_losses).__name__}")
            if self._reducer is not None:
                raise NotImplementedError(
                    f"{self.info.name} draws extra batches, which is not supported under data parallelism "
                    "(set_reducer) yet; train it in one process"
                )
        if self._reducer is not None:
            losses = self._reducer.globalize_losses(losses, self.tasks)
        batch = collect_losses(
            losses,
            self.tasks,
            self._task_index,
            self.on_nonfinite,
            needs_positive=self.takes_log_of_losses,
            method=self.info.name,
            require_graph=True,
            check_finite=not self._screens_gradients,
            ceiling=self.loss_ceiling,
        )
        if batch.above_ceiling:
            self._on_loss_above_ceiling(batch.above_ceiling)
        if batch.values.device != self._device_anchor.device:
            self.to(batch.values.device)
        # plain attribute writes: nn.Module.__setattr__ costs microseconds on every step
        object.__setattr__(self, "_grad_scale", self._scale_of(scaler, batch.values.device))
        object.__setattr__(self, "_extra_losses", extra_losses if self.extra_batches else None)
        try:
            record = self._step(batch, shared=shared, features=features)
        finally:
            object.__setattr__(self, "_grad_scale", None)
            object.__setattr__(self, "_extra_losses", None)
        object.__setattr__(self, "step_count", self.step_count + 1)
        return record

    def _scale_of(self, scaler: Any, device: torch.device) -> Tensor | None:
        """The GradScaler's current scale as a 0-d float32 tensor (no host read), or ``None``."""
        if scaler is None or not scaler.is_enabled():
            return None
        if type(self)._step not in (LossBalancer._step, GradientBalancer._step):
            raise NotImplementedError(
                f"{self.info.name} overrides _step and does not support scaler=; unscale yourself instead"
            )
        return scaler.scale(torch.ones((), dtype=torch.float32, device=device))

    def end_epoch(self) -> None:
        """Mark the end of a training epoch (used by DWA, STCH, GradNorm; a no-op elsewhere)."""
        self._on_epoch_end()
        self.epoch_count += 1

    def after_step(self, losses: Mapping[str, Tensor]) -> None:
        """Losses re-evaluated on the same batch after ``optimizer.step()`` (used by FAMO only).

        Call it only when :attr:`needs_post_step_losses` is true, to save the extra forward pass otherwise.
        """
        if self.needs_post_step_losses:
            if self._reducer is not None:
                losses = self._reducer.globalize_losses(losses, self.tasks)
            batch = collect_losses(
                losses, self.tasks, self._task_index, self.on_nonfinite, method=self.info.name
            )
            self._on_post_step_losses(batch)

    # ------------------------------------------------------------------ for subclasses
    def _step(
        self,
        batch: TaskLosses,
        *,
        shared: Iterable[Tensor] | None,
        features: Tensor | Sequence[Tensor] | None,
    ) -> StepRecord:
        raise NotImplementedError

    def loss_ceiling(self, dtype: torch.dtype) -> float | None:
        """The largest loss the method handles faithfully in ``dtype`` (``None``: no limit).

        Losses above it are found in the step's one host read and reported to :meth:`_on_loss_above_ceiling`.
        """
        return None

    def _on_loss_above_ceiling(self, tasks: list[str]) -> None:
        """Hook: some losses exceed :meth:`loss_ceiling` (e.g. BMTL warns and names ``temperature``)."""

    def _on_epoch_end(self) -> None:
        """Hook for epoch-level methods."""

    def _on_post_step_losses(self, batch: TaskLosses) -> None:
        """Hook for methods that read the losses after the optimiser step."""

    def _record(
        self, batch: TaskLosses, weights: Tensor, extras: Mapping[str, Tensor] | None = None
    ) -> StepRecord:
        return StepRecord(
            tasks=self.tasks,
            losses=batch.values.detach(),
            weights=weights.detach(),
            present=batch.present,
            skipped=dict(batch.skipped),
            extras=dict(extras or {}),
        )

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "method": self.info.name,
            "tasks": list(self.tasks),
            "step_count": self.step_count,
            "epoch_count": self.epoch_count,
        }
        for name in self.extra_state_fields:
            state[name] = getattr(self, name)
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.epoch_count = int(state["epoch_count"])
        for name in self.extra_state_fields:
            setattr(self, name, state[name])

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Everything is checked before anything is written: a refused state leaves the balancer as it was.
        check_loadable(self, state_dict, prefix, strict=strict)
        self._prepare_load(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _prepare_load(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        """Hook run after the state was validated and before it is copied in (e.g. to re-size a buffer)."""

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}"


class LossBalancer(Balancer):
    """Base of loss-level methods: they need only the loss values (and their own history).

    A subclass implements :meth:`objective`, returning the scalar to back-propagate and the effective
    weight of each task loss. The cost is one ordinary backward.
    """

    def objective(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """Combine the task losses.

        Args:
            losses: ``(K,)`` losses with gradient; entries of absent tasks are constant zeros.
            present: ``(K,)`` bool mask of the tasks in this step.

        Returns:
            ``(total, weights)``: the scalar to back-propagate and the ``(K,)`` effective weights
            ``∂ total / ∂ losses`` (0 for absent tasks), detached.
        """
        raise NotImplementedError

    def _step(
        self,
        batch: TaskLosses,
        *,
        shared: Iterable[Tensor] | None,
        features: Tensor | Sequence[Tensor] | None,
    ) -> StepRecord:
        total, weights = self.objective(batch.values, batch.present)
        if not total.requires_grad:
            raise RuntimeError(
                "none of the given losses requires grad; compute them from the model under autograd "
                "(not inside torch.no_grad())"
            )
        if self._grad_scale is not None:
            total = (total.float() if total.dtype in _LOW_PRECISION else total) * self._grad_scale
        total.backward()
        return self._record(batch, weights)


@dataclass(frozen=True, eq=False)
class GradientStep:
    """Everything a gradient-level method may read for one step (immutable; one per ``backward``).

    Attributes:
        losses: ``(k,)`` detached losses of the ``k`` present tasks.
        index: ``(k,)`` long positions of the present tasks in the balancer's ``tasks`` (for per-task state).
        jacobian: ``(k, P)`` per-task gradients (w.r.t. the shared parameters or features), or ``None`` when
            the engine computed only the Gramian (methods whose :attr:`GradientBalancer.needs` is
            ``"gramian"``).
        dtype: the dtype of the update the engine will assemble (weights are cast to it).
        extra: the step's extra batches (:class:`~taskbalance.balancers.extra_batches.ExtraBatches`) for
            methods that declare :attr:`Balancer.extra_batches`; ``None`` otherwise. Draw from it before
            changing any state, so that an error on an extra batch leaves the method as it was.
        blocks: the same Jacobian as its per-input column blocks
            (:class:`~taskbalance.jacobian.JacobianBlocks`), as the Jacobian path computes it. For
            ``"gramian"`` methods on that path it is the only form: :attr:`jacobian` is ``None`` and
            :meth:`require_jacobian` joins the blocks on demand (once).

    :attr:`gramian` is the ``k × k`` matrix ``J Jᵀ`` in float64, computed once on first use (every entry of
    the Jacobian widened to float64 before it is multiplied, block by block: exact to float64 rounding
    whatever the model's dtype, without a float64 copy of ``J``; :func:`~taskbalance.jacobian.exact_gramian`),
    or handed over by the engine.
    """

    losses: Tensor
    index: Tensor
    jacobian: Tensor | None = None
    dtype: torch.dtype = torch.float32
    precomputed_gramian: Tensor | None = None
    extra: ExtraBatches | None = None
    blocks: JacobianBlocks | None = None

    @classmethod
    def of(
        cls,
        jacobian: Tensor,
        losses: Tensor | None = None,
        index: Tensor | None = None,
        extra: ExtraBatches | None = None,
    ) -> GradientStep:
        """A step from a ``(k, P)`` Jacobian (losses default to ones, index to ``0..k-1``): for experiments
        and tests that call :meth:`GradientBalancer.aggregate` directly. ``extra``: the extra batches of
        methods that draw them, e.g. a :class:`~taskbalance.balancers.extra_batches.ReplayedExtraBatches`."""
        k = jacobian.shape[0]
        if losses is None:
            losses = torch.ones(k, dtype=jacobian.dtype, device=jacobian.device)
        if index is None:
            index = torch.arange(k, device=jacobian.device)
        return cls(losses=losses, index=index, jacobian=jacobian, dtype=jacobian.dtype, extra=extra)

    @cached_property
    def gramian(self) -> Tensor:
        """``(k, k)`` float64 Gramian ``J Jᵀ`` of the present tasks' gradients."""
        if self.precomputed_gramian is not None:
            return self.precomputed_gramian.to(torch.float64)
        if self.blocks is not None:
            return self.blocks.gramian()
        return exact_gramian([self.require_jacobian("the Gramian")])

    @cached_property
    def _joined_jacobian(self) -> Tensor:
        assert self.blocks is not None
        return self.blocks.matrix()

    def _reads_gramian(self, from_gramian: bool) -> bool:
        """Whether a finiteness check reads the Gramian (asked, already known, or no Jacobian at hand)."""
        return from_gramian or "gramian" in self.__dict__ or (self.jacobian is None and self.blocks is None)

    @property
    def num_tasks(self) -> int:
        """Number ``k`` of present tasks."""
        return int(self.losses.shape[0])

    @property
    def device(self) -> torch.device:
        return self.losses.device

    def finite_rows(self, *, from_gramian: bool = True) -> Tensor:
        """``(k,)`` bool on the device: which tasks' gradients are entirely finite.

        Read from the float64 Gramian's diagonal (``‖g_k‖²``, NaN/inf exactly when row ``k`` has a NaN/inf)
        when it is at hand or ``from_gramian``; otherwise from the Jacobian itself.
        """
        if self._reads_gramian(from_gramian):
            return torch.isfinite(self.gramian.diagonal())
        if self.jacobian is not None:
            return torch.isfinite(self.jacobian).all(dim=1)
        assert self.blocks is not None
        return self.blocks.finite_rows()

    def surely_finite(self, *, gradients: bool = True, from_gramian: bool = True) -> bool:
        """Whether the losses (and, with ``gradients``, the gradients) are all finite, in one host read.

        A NaN or an infinity survives a sum, so finite sums of the losses and of the Gramian's diagonal (or of
        the Jacobian, as in :meth:`finite_rows`) mean every term is finite: ``True`` is certain. ``False``
        may be a false alarm (large finite values whose sum overflows), which :meth:`finite_rows` settles.
        On the CPU the sums are read as two Python numbers (a host read costs nothing there)."""
        losses = self.losses.sum(dtype=torch.float64)
        grads: Tensor | None = None
        if gradients:
            if self._reads_gramian(from_gramian):
                grads = self.gramian.trace()
            elif self.jacobian is not None:
                grads = self.jacobian.sum(dtype=torch.float64)
            else:
                assert self.blocks is not None
                grads = self.blocks.sum64()
        if losses.device.type == "cpu":
            return math.isfinite(float(losses) + (0.0 if grads is None else float(grads)))
        return bool(torch.isfinite(losses if grads is None else losses + grads))

    def rows(self, keep: Tensor) -> GradientStep:
        """The step restricted to the present tasks at positions ``keep`` (the Gramian is sliced, not
        recomputed, when it is already known)."""
        gramian = self.__dict__.get("gramian", self.precomputed_gramian)
        jacobian = None if self.jacobian is None else self.jacobian[keep]
        blocks = self.blocks
        if blocks is not None:  # views of the sliced matrix where there is one, else the blocks' rows
            blocks = (
                blocks.select(keep) if jacobian is None else JacobianBlocks.of_matrix(jacobian, blocks.shapes)
            )
        return GradientStep(
            losses=self.losses[keep],
            index=self.index[keep],
            jacobian=jacobian,
            dtype=self.dtype,
            precomputed_gramian=None if gramian is None else gramian[keep][:, keep],
            extra=self.extra,
            blocks=blocks,
        )

    def require_jacobian(self, what: str = "this method") -> Tensor:
        """The Jacobian (joined from :attr:`blocks` on first use where only they are at hand), or a clear
        error when the engine computed only the Gramian."""
        if self.jacobian is None:
            if self.blocks is not None:
                return self._joined_jacobian
            raise RuntimeError(
                f"{what} needs the per-task Jacobian but the engine computed only the Gramian; "
                "declare needs = 'jacobian' on the method (or pass engine='jacobian')"
            )
        return self.jacobian


@dataclass
class Aggregation:
    """What a gradient-level method decides for one step.

    Attributes:
        weights: ``(k,)`` coefficients of the present tasks. Task-specific parameters get
            ``weights[k] ∇L_k`` (or ``∇L_k`` if the method's ``scale_heads`` is false); the shared update is
            ``weights @ jacobian`` unless ``shared_weights`` or ``direction`` is given.
        shared_weights: optional ``(k,)`` coefficients of the shared update ``shared_weights @ jacobian``
            when they differ from the heads' ``weights`` (IMTL, Nash-MTL's clipped update). Prefer this to
            ``direction``: it needs only the Gramian.
        direction: optional explicit shared update (``P`` entries), for methods that edit gradients
            element-wise (they declare ``needs = "jacobian"``).
        extras: diagnostics for the step record.
    """

    weights: Tensor
    direction: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    shared_weights: Tensor | None = None

    def shared_update(self, jacobian: Tensor) -> Tensor:
        """The update of the shared part, ``(P,)`` in ``jacobian``'s dtype, from the ``(k, P)`` Jacobian."""
        if self.direction is not None:
            return self.direction.to(jacobian.dtype)
        coefficients = self.weights if self.shared_weights is None else self.shared_weights
        return coefficients.to(jacobian.dtype) @ jacobian

    def shared_updates(self, blocks: JacobianBlocks) -> list[Tensor]:
        """:meth:`shared_update` cut per input, one tensor of each input's shape, from the Jacobian's
        per-input blocks (no ``P``-long vector formed unless the method handed one over)."""
        if self.direction is not None:
            direction = self.direction.to(blocks.dtype)
            pieces = torch.split(direction, [math.prod(s) for s in blocks.shapes])
            return [piece.view(shape) for piece, shape in zip(pieces, blocks.shapes, strict=True)]
        coefficients = self.weights if self.shared_weights is None else self.shared_weights
        return blocks.combine(coefficients.detach())


class GradientBalancer(Balancer):
    """Base of gradient-level methods: they read per-task gradients of the shared part.

    Args:
        tasks: task names.
        gradients: ``"parameters"`` (default): per-task gradients w.r.t. the shared parameters, computed
            in one batched call; ``"features"``: per-task gradients w.r.t. the shared representation passed
            as ``features=`` (MGDA-UB style), combined, then one ordinary trunk backward. Methods not defined
            at the feature level refuse it with an error naming the alternatives.
        on_nonfinite: see :class:`Balancer`.

    A subclass implements :meth:`aggregate`.

    **Engine** (``make(..., engine=...)`` or :meth:`set_engine`): ``"auto"`` (default) computes only what the
    method declares in :attr:`needs`: for ``"gramian"`` methods at the parameter level, the Gramian engine
    (:mod:`taskbalance.gramian`: the ``k × k`` Gramian layer by layer and the update per layer, never the
    ``k × P`` Jacobian); otherwise the batched Jacobian (:mod:`taskbalance.jacobian`). ``"jacobian"`` forces
    the Jacobian path; ``"gramian"`` forces the Gramian engine (an error for methods that need the Jacobian).
    Both give the same step up to float rounding (tested). ``on_nonfinite="skip"`` takes the Jacobian path
    under ``"auto"``: dropping a task after the fact needs the other tasks' gradients again, which the Gramian
    engine (it releases the graph) cannot give; ``engine="gramian"`` with ``"skip"`` is refused.

    Set ``balancer.record_gramian = True`` to put the ``k × k`` Gramian ``J Jᵀ`` of the present tasks in
    ``record.extras["gramian"]`` every step (one small matmul), which
    :class:`taskbalance.diagnostics.ConflictMonitor` reads for free with ``observe_record``.
    """

    scale_heads: ClassVar[bool] = True
    _screens_gradients: ClassVar[bool] = True
    needs: GradientNeed = "gramian"  # "jacobian" for methods that edit gradients element-wise
    record_gramian: bool = False
    engine: EngineChoice = "auto"
    _gramian_engine: GramianEngine | None = None

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        gradients: GradientLevel = "parameters",
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(tasks, on_nonfinite=on_nonfinite)
        if gradients not in ("parameters", "features"):
            raise ValueError(f"gradients must be 'parameters' or 'features', got {gradients!r}")
        level = self.info.feature_level
        if gradients == "features" and level == "no":
            raise ValueError(
                f"{self.info.name} is not defined on feature-level gradients (the reference "
                f"implementation refuses them); use gradients='parameters', or a method that accepts "
                f"features: {', '.join(_feature_methods())}"
            )
        if gradients == "parameters" and level == "only":
            raise ValueError(
                f"{self.info.name} is defined only on feature-level gradients; use gradients='features'"
            )
        self.gradients: GradientLevel = gradients
        self._index_cache: dict[tuple[int, ...], Tensor] = {}
        self._batching = BatchingChoice()  # loop or vmap for the Jacobian, measured per shape
        self._verified_trunks: set[tuple[int, ...]] = set()  # shared= sets known to compute features=

    def aggregate(self, step: GradientStep) -> Aggregation:
        """Decide the step from the per-task gradients.

        Args:
            step: the present tasks' losses, their positions in :attr:`tasks`, and their gradients: the
                float64 Gramian ``step.gramian`` always; the ``(k, P)`` Jacobian ``step.jacobian`` when the
                method declares ``needs = "jacobian"``.
        """
        raise NotImplementedError

    def set_engine(self, engine: EngineChoice, *, last_layers: int | None = None) -> GradientBalancer:
        """Choose how per-task gradients are computed (see the class docstring); returns ``self``.

        ``last_layers=N`` (Gramian engine only) is the opt-in **approximation** of
        :class:`taskbalance.gramian.GramianEngine`: weights from the Gramian of the last ``N`` shared layers.
        """
        if engine not in ("auto", "gramian", "jacobian"):
            raise ValueError(f"engine must be 'auto', 'gramian' or 'jacobian', got {engine!r}")
        if engine == "gramian" and self.needs == "jacobian":
            raise ValueError(
                f"{self.info.name} edits per-task gradients element-wise and needs the Jacobian; "
                "use engine='jacobian' or 'auto'"
            )
        if engine == "gramian" and self.on_nonfinite == "skip":
            raise ValueError(_GRAMIAN_SKIP)
        if engine == "gramian" and self.gradients != "parameters":
            raise ValueError(
                f"{self.info.name}: the Gramian engine computes parameter-level gradients; with "
                f"gradients={self.gradients!r} the feature Jacobian is used. Use engine='auto' or "
                "gradients='parameters'"
            )
        if last_layers is not None and engine == "jacobian":
            raise ValueError("last_layers= is an option of the Gramian engine; use engine='gramian'")
        object.__setattr__(self, "engine", engine)
        object.__setattr__(self, "_gramian_engine", GramianEngine(last_layers=last_layers))
        return self

    def _uses_gramian_engine(self) -> bool:
        if self.gradients != "parameters" or self.needs != "gramian" or self.engine == "jacobian":
            return False
        if self.extra_batches:  # the extra batches' gradients are Jacobian rows
            return False
        return self.engine == "gramian" or self.on_nonfinite != "skip"

    def _index_tensor(self, index: list[int], device: torch.device) -> Tensor:
        key = tuple(index)
        cached = self._index_cache.get(key)
        if cached is None or cached.device != device:
            cached = torch.tensor(index, dtype=torch.long, device=device)
            self._index_cache[key] = cached
        return cached

    def _step(
        self,
        batch: TaskLosses,
        *,
        shared: Iterable[Tensor] | None,
        features: Tensor | Sequence[Tensor] | None,
    ) -> StepRecord:
        # 1. Structural checks of shared= / features= (no device read, nothing written yet).
        shared_list = self._trainable_shared(shared)
        feature_list = self._checked_features(features, shared_list) if self.gradients == "features" else None
        if shared_list is not None and self._uses_gramian_engine():
            return self._gramian_step(batch, shared_list)
        # 2. Per-task gradients, and on_nonfinite for losses and gradients together (one host read).
        step = self._gradient_step(batch, shared_list, feature_list)
        batch, step = self._screen(batch, step, feature_list or shared_list or [])
        # 3. The method decides; only now is any state or .grad written.
        self._prepare(step)
        aggregation = self._aggregate_guarded(step)
        self._write_gradients(batch.present_values, step, aggregation, shared_list, feature_list)
        weights = batch.values.new_zeros(self.num_tasks).index_copy(
            0, step.index, aggregation.weights.to(batch.values.dtype)
        )
        if self.record_gramian and "gramian" not in aggregation.extras:
            aggregation.extras["gramian"] = step.gramian.detach()
        return self._record(batch, weights, aggregation.extras)

    def _prepare(self, step: GradientStep) -> None:
        """Hook run once the step is validated, before :meth:`aggregate` (e.g. to size a state buffer)."""

    def _trainable_shared(self, shared: Iterable[Tensor] | None) -> list[Tensor] | None:
        if shared is None:
            if self.gradients == "parameters":
                raise ValueError(
                    f"{self.info.name} needs the shared parameters: "
                    "backward(losses, shared=model.trunk.parameters())"
                    + (", or gradients='features' with features=z" if self.info.feature_level != "no" else "")
                )
            return None
        # a parameter listed twice (a tied weight named by both its modules) counts once, as in the Gramian
        # engine
        trainable = list({id(p): p for p in shared if p.requires_grad}.values())
        if not trainable:
            raise ValueError(
                f"{self.info.name}: shared= holds no trainable parameter (it is empty, an already-consumed "
                "generator, or every parameter is frozen with requires_grad=False), so the trunk would train "
                "nothing; pass the trunk's trainable parameters, e.g. shared=list(model.trunk.parameters())"
            )
        return trainable

    def _checked_features(self, features: Tensor | Sequence[Tensor] | None,
                          shared_list: list[Tensor] | None) -> list[Tensor]:
        if features is None:
            raise ValueError(
                f"{self.info.name} with gradients='features' needs the shared representation: "
                "backward(losses, features=z)"
            )
        feature_list = [features] if isinstance(features, Tensor) else list(features)
        if not feature_list or not all(isinstance(f, Tensor) for f in feature_list):
            raise TypeError(f"{self.info.name}: features= must be a tensor or a non-empty list of tensors")
        if not all(f.requires_grad for f in feature_list):
            raise ValueError(
                f"{self.info.name}: features= does not require grad (detached, or computed under "
                "torch.no_grad()), so the trunk would train nothing; pass the tensor the task heads read, "
                "z = model.trunk(x), as computed"
            )
        if shared_list is None and all(f.grad_fn is None for f in feature_list):
            raise ValueError(
                f"{self.info.name}: features= is a leaf tensor, not computed by a trunk (e.g. "
                "z.detach().requires_grad_()), so no trunk would train; pass the tensor the trunk returned, "
                "or name the parameters behind it with shared="
            )
        if shared_list is not None:
            self._check_trunk_behind(feature_list, shared_list)
        return feature_list

    def _check_trunk_behind(self, feature_list: list[Tensor], shared_list: list[Tensor]) -> None:
        """Some ``shared=`` parameter must be behind the features (a graph walk, once per parameter set)."""
        verified = self._verified_trunks
        key = tuple(id(p) for p in shared_list)
        if key in verified:
            return
        behind = {id(t) for t in reachable_leaves(feature_list)} | {id(f) for f in feature_list}
        if not any(id(p) in behind for p in shared_list):
            raise ValueError(
                f"{self.info.name}: none of the shared= parameters computes features=, so the trunk would "
                "get no gradient; pass the parameters of the module that returns the features, or leave "
                "shared= out (every parameter behind the features is then trained)"
            )
        if len(verified) > 64:
            verified.clear()
        verified.add(key)

    def _scaled(self, roots: Tensor) -> Tensor:
        """The graph roots to back-propagate: under a GradScaler, the losses times its scale."""
        scale = self._grad_scale
        if scale is None:
            return roots
        return (roots.float() if roots.dtype in _LOW_PRECISION else roots) * scale

    def _gradient_step(
        self, batch: TaskLosses, shared_list: list[Tensor] | None, feature_list: list[Tensor] | None
    ) -> GradientStep:
        """The step's per-task gradients as :class:`~taskbalance.jacobian.JacobianBlocks`, joined into the
        ``K × P`` matrix only for methods that need it, or under a reducer (whose all-reduce takes it).

        The heads are not inputs of the batched call (our choice): their ``k`` rows per head parameter cost
        more there (about 4 ms a step with 11 linear heads on CPU) than one ordinary backward of the weighted
        losses afterwards (under 1 ms)."""
        roots = batch.present_values
        inputs = feature_list if feature_list is not None else shared_list
        assert inputs is not None  # _trainable_shared / _checked_features made sure
        blocks, unreached = jacobian_blocks(self._scaled(roots), inputs, batching=self._batching)
        if feature_list is not None and unreached:
            raise ValueError(
                f"{self.info.name}: features= is not in the losses' graph (the heads read another tensor: "
                "a second forward pass, a clone or a detached copy), so the trunk would train nothing; pass "
                "the exact tensor the task heads read"
            )
        if feature_list is None and len(unreached) == len(inputs):
            raise ValueError(_UNREACHED_SHARED.format(name=self.info.name))
        if self._grad_scale is not None:  # every backward ran on scaled losses: unscale before aggregate
            blocks = blocks.divided(self._grad_scale)
        jacobian: Tensor | None = None
        if self._reducer is not None:  # the reducer's all-reduce takes the matrix (and may widen it)
            jacobian = self._reducer.reduce_jacobian(blocks.matrix(), self.gradients)
            step_blocks = None
        elif self.needs == "jacobian":  # the method reads the matrix: join once, the blocks become its views
            jacobian = blocks.matrix()
            step_blocks = JacobianBlocks.of_matrix(jacobian, blocks.shapes)
        else:
            step_blocks = blocks
        del blocks
        index = self._index_tensor(batch.index, roots.device)
        extra = None
        if self._extra_losses is not None:
            if shared_list is None:
                raise ValueError(f"{self.info.name} draws extra batches and needs shared= parameters")
            extra = ExtraBatches(
                self._extra_losses, source=str(self.extra_batch_source), limit=self.extra_batches,
                parameters=shared_list, method=self.info.name, batching=self._batching,
                check_finite=self.on_nonfinite != "propagate",
            )
        dtype = jacobian.dtype if jacobian is not None else step_blocks.dtype  # type: ignore[union-attr]
        return GradientStep(
            losses=roots.detach(), index=index, jacobian=jacobian, dtype=dtype, extra=extra,
            blocks=step_blocks,
        )

    def _screen(
        self, batch: TaskLosses, step: GradientStep, inputs: list[Tensor]
    ) -> tuple[TaskLosses, GradientStep]:
        """``on_nonfinite`` for the present tasks' losses *and* gradients, with one host read (a second only
        on a step with a non-finite value or an overflowing sum: :meth:`GradientStep.surely_finite`).

        The gradient check reads the Gramian's diagonal (or the Jacobian): data the step has on the device.
        Under a GradScaler an overflowing gradient is the scaler's business (:meth:`_aggregate_guarded`).
        """
        if self.on_nonfinite == "propagate":
            return batch, step
        if not self.takes_log_of_losses and step.surely_finite(
            gradients=self._grad_scale is None, from_gramian=self.needs == "gramian"
        ):  # the one host read per step
            return batch, step
        # something is not finite, or a sum overflowed: which tasks (a second read, on such steps only)
        problem = ~torch.isfinite(step.losses)
        if self.takes_log_of_losses:
            problem = problem | (step.losses < 0)
        finite_rows = None
        if self._grad_scale is None:
            finite_rows = step.finite_rows(from_gramian=self.needs == "gramian")
            problem = problem | ~finite_rows
        if not bool(problem.any()):
            return batch, step
        if finite_rows is not None and not bool(finite_rows.all()) and self._reducer is None and inputs:
            step = self._isolate_nonfinite(batch, step, finite_rows, inputs)
            finite_rows = step.finite_rows(from_gramian=False)
        names = [self.tasks[i] for i in batch.index]
        dropped = nonfinite_drops(
            names, step.losses, finite_rows, self.on_nonfinite, self.takes_log_of_losses, self.info.name
        )
        keep = torch.tensor([i for i in range(len(names)) if i not in dropped], device=step.device)
        return batch.without(dropped, self.tasks), step.rows(keep)

    def _gramian_step(self, batch: TaskLosses, shared: list[Tensor]) -> StepRecord:
        """The step through the Gramian engine: same result as the Jacobian path, without forming ``J``."""
        engine = self._gramian_engine
        if engine is None:
            engine = GramianEngine()
            object.__setattr__(self, "_gramian_engine", engine)
        reducer = self._reducer
        reduce_rows = None
        if reducer is not None:
            def reduce_rows(rows: Tensor) -> Tensor:
                return reducer.reduce_jacobian(rows, "parameters")
        roots = batch.present_values
        computed = engine.gramian(self._scaled(roots), shared, reduce_rows)
        if len(computed.unreached) == len(shared):
            raise ValueError(_UNREACHED_SHARED.format(name=self.info.name))
        gramian = computed.gramian
        scale = self._grad_scale
        if scale is not None:
            gramian = gramian / scale.to(gramian.dtype) ** 2
        index = self._index_tensor(batch.index, roots.device)
        step = GradientStep(
            losses=roots.detach(), index=index, dtype=shared[0].dtype, precomputed_gramian=gramian
        )
        screened, step = self._screen(batch, step, [])
        if screened is not batch:  # only under engine="gramian" with "skip", which set_engine refuses
            raise RuntimeError(_GRAMIAN_SKIP)
        aggregation = self._aggregate_guarded(step)
        if aggregation.direction is not None:
            raise RuntimeError(
                f"{self.info.name} returned an explicit direction, which needs the Jacobian: declare "
                "needs = 'jacobian' on the method"
            )
        coefficients = aggregation.shared_weights
        if coefficients is None:
            coefficients = aggregation.weights
        shared_weights = coefficients.detach()
        head_weights: Tensor | None = None  # scale_heads off: every head its own gradient (weight 1)
        if self.scale_heads:  # the same object when the heads take the shared weights: one product
            same = aggregation.weights is coefficients
            head_weights = shared_weights if same else aggregation.weights.detach()
        engine.apply(computed, shared_weights, head_weights, shared)
        if len(batch.index) == len(self.tasks):  # every task present, in task order (collect_losses)
            weights = aggregation.weights.to(roots.dtype, copy=True)
        else:
            weights = batch.values.new_zeros(self.num_tasks).index_copy(
                0, index, aggregation.weights.to(roots.dtype)
            )
        if self.record_gramian and "gramian" not in aggregation.extras:
            aggregation.extras["gramian"] = step.gramian.detach()
        return self._record(batch, weights, aggregation.extras)

    def _isolate_nonfinite(
        self, batch: TaskLosses, step: GradientStep, finite_rows: Tensor, inputs: list[Tensor]
    ) -> GradientStep:
        """Slow path: find which tasks really have a non-finite gradient.

        The batched backward sends zero cotangents through every task's graph, and ``0 · inf = NaN``: one task
        with an infinite local derivative (``sqrt`` at 0) makes *every* row non-finite. The flagged rows are
        recomputed one task at a time from each task's own loss tensor, whose graph holds no other task's
        nodes. (Under a data-parallel reducer the rows stay as reduced: every flagged task is dropped.)
        """
        if step.blocks is None:
            raise RuntimeError("the non-finite gradient check needs the per-task Jacobian")
        jacobian = None if step.jacobian is None else step.jacobian.clone()
        shapes = step.blocks.shapes
        blocks = (
            JacobianBlocks.of_matrix(jacobian, shapes) if jacobian is not None
            else JacobianBlocks([block.clone() for block in step.blocks.blocks], shapes)
        )
        flagged = [i for i, ok in enumerate(finite_rows.tolist()) if not ok]
        for i in flagged:  # only on a step with a non-finite gradient
            grads = torch.autograd.grad(batch.items[i], inputs, retain_graph=True, allow_unused=True)
            for block, grad in zip(blocks.blocks, grads, strict=True):
                if grad is None:
                    block[i] = 0
                else:
                    block[i] = grad.reshape(-1)
        return GradientStep(losses=step.losses, index=step.index, jacobian=jacobian, dtype=step.dtype,
                            extra=step.extra, blocks=blocks)

    def _write_gradients(
        self,
        roots: Tensor,
        step: GradientStep,
        aggregation: Aggregation,
        shared_list: list[Tensor] | None,
        feature_list: list[Tensor] | None,
    ) -> None:
        """Heads get their (weighted) own gradient; the shared part gets the aggregated update."""
        reducer = self._reducer
        if reducer is None:
            assert step.blocks is not None  # _gradient_step keeps them in one process
            self._write_from_blocks(roots, step.blocks, aggregation, shared_list, feature_list)
            return
        # under a reducer: the update from the reduced matrix, then this rank's share of it
        jacobian = step.require_jacobian("assembling the shared update")
        direction = aggregation.shared_update(jacobian)
        scale = self._grad_scale
        if scale is not None:
            direction = direction * scale.to(direction.dtype)
        direction = reducer.local_direction(direction, self.gradients)
        scaled_roots = self._scaled(roots)
        if feature_list is not None:
            leaves = reachable_leaves([roots], stop_at=feature_list, exclude=shared_list or ())
            self._backward_heads(scaled_roots, aggregation, leaves)
            trunk = shared_list if shared_list is not None else reachable_leaves(feature_list)
            pieces = torch.split(direction, [f.numel() for f in feature_list])
            grads = [piece.view_as(f) for piece, f in zip(pieces, feature_list, strict=True)]
            reducer.backward_mean(feature_list, grads, trunk)
        else:
            assert shared_list is not None  # checked by _trainable_shared
            leaves = reachable_leaves([roots], exclude=shared_list)
            self._backward_heads(scaled_roots, aggregation, leaves)
            accumulate_grad(shared_list, direction, owned=aggregation.direction is None)

    def _write_from_blocks(
        self,
        roots: Tensor,
        blocks: JacobianBlocks,
        aggregation: Aggregation,
        shared_list: list[Tensor] | None,
        feature_list: list[Tensor] | None,
    ) -> None:
        """:meth:`_write_gradients` in one process: the update ``wᵀJ`` block by block, straight into each
        input's ``.grad`` (no ``P``-long vector to cut)."""
        owned = aggregation.direction is None
        updates = aggregation.shared_updates(blocks)
        scale = self._grad_scale
        if scale is not None:
            updates = [update * scale.to(update.dtype) for update in updates]
            owned = True
        if feature_list is not None:
            head_leaves = reachable_leaves([roots], stop_at=feature_list, exclude=shared_list or ())
            self._backward_heads(self._scaled(roots), aggregation, head_leaves)
            backward_through(feature_list, updates, shared_list)
            return
        assert shared_list is not None  # checked by _trainable_shared
        self._backward_heads(self._scaled(roots), aggregation, reachable_leaves([roots], exclude=shared_list))
        add_to_grad(shared_list, updates, owned=owned)

    def _aggregate_guarded(self, step: GradientStep) -> Aggregation:
        """:meth:`aggregate`, which under a GradScaler keeps the buffers and poisons the step on overflow.

        Both are done on-device with ``torch.where`` (no host read): ``scaler.step`` then skips the step.
        """
        if self._grad_scale is None:
            return self.aggregate(step)
        finite = torch.isfinite(step.gramian.diagonal()).all()
        before = {name: buffer.clone() for name, buffer in self.named_buffers()}
        aggregation = self.aggregate(step)
        with torch.no_grad():
            for name, buffer in self.named_buffers():
                old = before.get(name)
                if old is not None and old.shape == buffer.shape:  # a re-sized buffer cannot be rolled back
                    buffer.copy_(torch.where(finite, buffer, old))
        poison = torch.where(finite, 0.0, float("nan")).to(aggregation.weights.dtype)
        aggregation.weights = aggregation.weights + poison
        if aggregation.direction is not None:
            aggregation.direction = aggregation.direction + poison.to(aggregation.direction.dtype)
        if aggregation.shared_weights is not None:
            shared = aggregation.shared_weights
            aggregation.shared_weights = shared + poison.to(shared.dtype)
        return aggregation

    def _backward_heads(self, roots: Tensor, aggregation: Aggregation, heads: list[Tensor]) -> None:
        if not heads:
            return
        head_weights = aggregation.weights.to(roots.dtype) if self.scale_heads else torch.ones_like(roots)
        if self._reducer is not None:
            self._reducer.backward_mean([roots], [head_weights.detach()], heads)
        else:
            torch.autograd.backward(roots, grad_tensors=head_weights.detach(), inputs=heads)

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}, gradients={self.gradients!r}"


_UNREACHED_SHARED = (
    "{name}: no loss reaches any shared= parameter (their Jacobian would be all zero and the real trunk "
    "would be trained as a task head); pass the parameters the losses are computed through, e.g. "
    "shared=model.trunk.parameters()"
)
_GRAMIAN_SKIP = (
    "on_nonfinite='skip' needs the other tasks' gradients again after dropping one, which the Gramian engine "
    "cannot give (it releases the graph); use engine='auto' or 'jacobian' with on_nonfinite='skip'"
)


def _feature_methods() -> list[str]:
    from .registry import available

    return [m.name for m in available() if m.family == "gradient" and m.feature_level != "no"]
