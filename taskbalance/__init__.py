"""taskbalance: multi-task and auxiliary-task training without negative transfer.

Quick start::

    import taskbalance as tb
    balancer = tb.make("ema", tasks=["seg", "depth"])
    record = balancer.backward({"seg": l_seg, "depth": l_depth}, shared=model.trunk.parameters())
    optimizer.step()
"""

from ._version import __version__ as __version__
from .balancers import (
    Aggregation,
    Balancer,
    GradientBalancer,
    GradientStep,
    LossBalancer,
    MethodInfo,
    available,
    make,
    method_info,
)
from .errors import NonFiniteError, NonFiniteGradientError, NonFiniteLossError, TaskError
from .record import StepRecord

__all__ = [
    "Aggregation",
    "Balancer",
    "GradientBalancer",
    "GradientStep",
    "LossBalancer",
    "MethodInfo",
    "NonFiniteError",
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "StepRecord",
    "TaskError",
    "available",
    "make",
    "method_info",
]


def __getattr__(name: str) -> object:
    """Lazy public names (heavier imports): ``taskbalance.StudyLog``, reports from your own loop."""
    if name == "StudyLog":
        from .report.own_loop import StudyLog

        return StudyLog
    raise AttributeError(f"module 'taskbalance' has no attribute {name!r}")
