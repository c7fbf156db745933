"""The extra-batch protocol: methods that read more than the step's own batch.

Some methods need per-task losses on batches other than the one being trained on:

* a **validation** batch (Auto-λ's look-ahead on the primary tasks, ARML's main-task gradient, HydaLearn's
  ``main_gradient="held_out"``);
* further independent **training** batches (MoDo's and SDMGrad's unbiased estimates of ``J Jᵀ``, which need
  two Jacobians from independent samples).

Every balancer shares one protocol for them. A method declares how many batches it draws per step
(:attr:`Balancer.extra_batches`) and from which data (:attr:`Balancer.extra_batch_source`); the training loop
passes a closure that evaluates the model, **with its current parameters, on the next batch of that
source** and returns ``{task: loss}``::

    def extra_losses():
        x, y = next(validation_batches)          # a fresh batch each call
        _, predictions = model(x)
        return {t: loss_fn[t](predictions[t], y[t]) for t in tasks}

    balancer.backward(losses, shared=model.trunk.parameters(), extra_losses=extra_losses)

The closure is called only by methods that declare extra batches (at most :attr:`Balancer.extra_batches`
times per step), so a loop may always pass it. :func:`taskbalance.train.fit` and the benchmark build it
themselves from the data's validation or training split. A method that needs it and does not get it raises
an error naming the fix. The method sees the draws through :class:`ExtraBatches` on its
:class:`~taskbalance.balancers.base.GradientStep` (``step.extra``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from ..batching import BatchingChoice
from ..errors import NonFiniteGradientError, NonFiniteLossError
from ..jacobian import batched_jacobian

__all__ = [
    "ExtraBatchSource", "LossClosure", "ExtraBatches", "ReplayedExtraBatches", "missing_closure_message",
]

ExtraBatchSource = Literal["training", "validation"]
LossClosure = Callable[[], Mapping[str, Tensor]]
EXTRA_BATCH_SOURCES: tuple[str, ...] = ("training", "validation")


def missing_closure_message(method: str, count: int, source: str) -> str:
    """The error text when a method that draws extra batches is called without ``extra_losses=``."""
    plural = "es" if count != 1 else ""
    return (
        f"{method} draws {count} extra {source} batch{plural} per step and needs "
        f"backward(losses, shared=..., extra_losses=fn), where fn() evaluates the model on the next "
        f"{source} batch and returns {{task: loss}} (see docs/extra-batches.md); taskbalance.train.fit and "
        "`taskbalance bench` supply it"
    )


class ExtraBatches:
    """The extra batches one step may draw: the user's closure, bounded by what the method declared.

    Each call of :meth:`losses`, :meth:`jacobian` or :meth:`gradient` draws one new batch (one forward pass
    through the user's closure). Drawing more than the method declared is a programming error of the method
    and raises. Losses and gradients are checked for NaN/inf (one host read per draw: these methods pay a
    whole extra forward and backward per draw anyway).

    Args:
        closure: the user's ``extra_losses`` callable.
        source: ``"training"`` or ``"validation"`` (what the closure must draw from; for messages).
        limit: the number of draws allowed in this step (the method's ``extra_batches``).
        parameters: the shared parameters the step's gradients are taken with respect to.
        method: the method's name, for messages.
        batching: loop or vmap for the per-task gradients (the balancer's choice for the step's own batch).
        check_finite: check each draw for NaN/inf (``False`` under ``on_nonfinite="propagate"``).

    A NaN/inf loss or gradient on an extra batch raises :class:`~taskbalance.NonFiniteLossError` /
    :class:`~taskbalance.NonFiniteGradientError` under ``on_nonfinite="raise"`` and ``"skip"`` (no task can
    be skipped from another batch's estimate); nothing has been written then. Under ``"propagate"`` nothing
    is checked, as on the step's own batch (e.g. a NaN training gradient moves Auto-λ's virtual step to NaN,
    and NaN flows into its state).
    """

    def __init__(
        self,
        closure: LossClosure,
        *,
        source: str,
        limit: int,
        parameters: Sequence[Tensor],
        method: str,
        batching: BatchingChoice | None = None,
        check_finite: bool = True,
    ) -> None:
        self._closure = closure
        self._batching = batching
        self.check_finite = check_finite
        self.source = source
        self.limit = limit
        self.parameters = list(parameters)
        self.method = method
        self.drawn = 0

    def losses(self, tasks: Sequence[str]) -> dict[str, Tensor]:
        """Draw the next batch and return the losses of ``tasks`` on it (with their graphs).

        Raises:
            ValueError: the closure did not return a scalar loss with a graph for one of ``tasks``.
        """
        if self.drawn >= self.limit:
            raise RuntimeError(
                f"{self.method} drew more than the {self.limit} extra batch(es) it declares "
                "(extra_batches); this is a bug of the method"
            )
        self.drawn += 1
        returned = self._closure()
        if not isinstance(returned, Mapping):
            raise TypeError(
                f"extra_losses must return a mapping {{task: loss}}, got {type(returned).__name__}"
            )
        picked: dict[str, Tensor] = {}
        for task in tasks:
            loss = returned.get(task)
            if loss is None:
                raise ValueError(
                    f"{self.method}: the extra {self.source} batch has no loss for task {task!r} (returned: "
                    f"{sorted(returned)}); the closure must return every task the method reads, which needs "
                    "a labelled sample of it in each batch (use larger batches for sparse labels)"
                )
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise TypeError(f"extra_losses()[{task!r}] must be a scalar tensor, got {loss!r}")
            if not loss.requires_grad:
                raise ValueError(
                    f"extra_losses()[{task!r}] does not require grad: evaluate the model under autograd "
                    "(not inside torch.no_grad()) in the closure"
                )
            picked[task] = loss.reshape(())
        return picked

    def jacobian(self, tasks: Sequence[str], *, at: Tensor | None = None) -> Tensor:
        """``(len(tasks), P)`` per-task gradients on the next batch, w.r.t. the shared parameters.

        Args:
            tasks: the tasks whose gradients to take (rows in this order).
            at: optional ``(P,)`` displacement: the batch is evaluated at ``θ + at`` (a virtual step, e.g.
                Auto-λ's look-ahead), then the parameters are put back bit for bit. The displacement is
                applied to the parameters' data, outside autograd, so the step's own graph stays valid.
        """
        saved: list[Tensor] | None = None
        if at is not None:
            saved = self._displace(at)
        try:
            losses = self.losses(tasks)
            stacked = torch.stack([losses[t] for t in tasks])
            jacobian, unreached = batched_jacobian(
                stacked, self.parameters, retain_graph=False, batching=self._batching
            )
        finally:
            if saved is not None:
                with torch.no_grad():
                    for parameter, value in zip(self.parameters, saved, strict=True):
                        parameter.data.copy_(value)
        if len(unreached) == len(self.parameters):
            raise ValueError(
                f"{self.method}: the extra {self.source} batch's losses do not depend on the shared "
                "parameters; the closure must evaluate the model being trained"
            )
        if not self.check_finite:
            return jacobian
        loss_ok = torch.isfinite(stacked.detach())
        row_ok = torch.isfinite(jacobian).all(dim=1)
        if not bool((loss_ok & row_ok).all()):  # one host read per draw
            bad_loss = [t for t, ok in zip(tasks, loss_ok.tolist(), strict=True) if not ok]
            if bad_loss:
                raise NonFiniteLossError(bad_loss)
            raise NonFiniteGradientError([t for t, ok in zip(tasks, row_ok.tolist(), strict=True) if not ok])
        return jacobian

    def gradient(self, tasks: Sequence[str], *, at: Tensor | None = None) -> Tensor:
        """``(P,)`` gradient of the **sum** of ``tasks``' losses on the next batch (see :meth:`jacobian`)."""
        return self.jacobian(tasks, at=at).sum(dim=0)

    def _displace(self, at: Tensor) -> list[Tensor]:
        sizes = [p.numel() for p in self.parameters]
        if at.shape != (sum(sizes),):
            raise ValueError(f"at= must have shape ({sum(sizes)},), got {tuple(at.shape)}")
        saved = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for parameter, piece in zip(self.parameters, at.split(sizes), strict=True):
                parameter.data.add_(piece.reshape(parameter.shape).to(parameter.dtype))
        return saved


class ReplayedExtraBatches(ExtraBatches):
    """Extra batches replayed from fixed Jacobians, for experiments and tests that call
    :meth:`~taskbalance.balancers.base.GradientBalancer.aggregate` directly on given gradients.

    Draw ``i`` returns the rows of ``jacobians[i]`` for the requested tasks (row ``j`` of each matrix is the
    gradient of ``tasks[j]``). A replay has no model: its gradients are the same wherever a virtual step
    (``at=``) would move the parameters (as for a model linear in its parameters), and :meth:`losses` is not
    available.
    """

    def __init__(self, jacobians: Sequence[Tensor], tasks: Sequence[str], *, source: str = "training",
                 method: str = "replay") -> None:
        super().__init__(self._no_model, source=source, limit=len(jacobians), parameters=[], method=method)
        self._jacobians = list(jacobians)
        self._rows = {task: i for i, task in enumerate(tasks)}

    @staticmethod
    def _no_model() -> Mapping[str, Tensor]:
        raise RuntimeError("a replay of fixed Jacobians has no model to evaluate")

    def losses(self, tasks: Sequence[str]) -> dict[str, Tensor]:
        raise RuntimeError("a replay of fixed Jacobians has no losses; only jacobian()/gradient()")

    def jacobian(self, tasks: Sequence[str], *, at: Tensor | None = None) -> Tensor:
        if self.drawn >= self.limit:
            raise RuntimeError(f"the replay holds {self.limit} batch(es); {self.method} drew more")
        matrix = self._jacobians[self.drawn]
        self.drawn += 1
        return matrix[[self._rows[t] for t in tasks]]
