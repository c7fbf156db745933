"""Exceptions raised by taskbalance."""

from __future__ import annotations

__all__ = ["NonFiniteError", "NonFiniteLossError", "NonFiniteGradientError", "TaskError"]


class NonFiniteError(FloatingPointError):
    """A task's loss or gradient was NaN or infinite (base of the two errors below).

    ``tasks`` lists the offending task names. The balancer's state and every ``.grad`` are left exactly as
    they were before the call.
    """

    def __init__(self, tasks: list[str], message: str) -> None:
        self.tasks = tasks
        super().__init__(message)


class NonFiniteLossError(NonFiniteError):
    """A task loss was NaN or infinite.

    Raised by :meth:`taskbalance.Balancer.backward` when ``on_nonfinite="raise"`` (the default). The
    balancer's state is left exactly as it was before the call. Pass ``on_nonfinite="skip"`` to drop such
    tasks from the step instead; the returned record then lists them under ``skipped``.
    """

    def __init__(self, tasks: list[str]) -> None:
        super().__init__(
            tasks,
            f"non-finite loss for task(s) {', '.join(repr(t) for t in tasks)}; "
            "the balancer state was not changed. Pass on_nonfinite='skip' to skip such tasks for the step.",
        )


class NonFiniteGradientError(NonFiniteError):
    """A task's loss was finite but its gradient w.r.t. the shared part was not (e.g. ``sqrt`` at 0).

    Raised by gradient-level balancers when ``on_nonfinite="raise"`` (the default), before any ``.grad`` or
    state is written. ``on_nonfinite="skip"`` drops such tasks for the step (``record.skipped`` says
    ``"non-finite gradient"``).
    """

    def __init__(self, tasks: list[str]) -> None:
        super().__init__(
            tasks,
            f"non-finite gradient for task(s) {', '.join(repr(t) for t in tasks)} (the loss itself is "
            "finite: look for sqrt/log/division at 0 or an overflow in that task's loss); the balancer "
            "state and every .grad were not changed. Pass on_nonfinite='skip' to skip such tasks for the "
            "step.",
        )


class TaskError(ValueError):
    """The losses, task names or state given to a balancer do not match what it was made for."""
