"""Exceptions raised by taskbalance."""

from __future__ import annotations

__all__ = ["NonFiniteLossError", "TaskError"]


class NonFiniteLossError(FloatingPointError):
    """A task loss was NaN or infinite.

    Raised by :meth:`taskbalance.Balancer.backward` when ``on_nonfinite="raise"`` (the default). The
    balancer's state is left exactly as it was before the call. Pass ``on_nonfinite="skip"`` to drop such
    tasks from the step instead; the returned record then lists them under ``skipped``.
    """

    def __init__(self, tasks: list[str]) -> None:
        self.tasks = tasks
        super().__init__(
            f"non-finite loss for task(s) {', '.join(repr(t) for t in tasks)}; "
            "the balancer state was not changed. Pass on_nonfinite='skip' to skip such tasks for the step."
        )


class TaskError(ValueError):
    """Task names given to a balancer do not match the tasks it was made for."""
