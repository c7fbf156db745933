"""Balancing methods, grouped by what they consume: ``losses/`` and ``gradients/``."""

from .base import Aggregation, Balancer, GradientBalancer, GradientStep, LossBalancer
from .extra_batches import ExtraBatches, LossClosure, ReplayedExtraBatches
from .registry import MethodInfo, available, make, method_info, register

__all__ = [
    "Aggregation",
    "Balancer",
    "ExtraBatches",
    "GradientBalancer",
    "GradientStep",
    "LossBalancer",
    "LossClosure",
    "MethodInfo",
    "ReplayedExtraBatches",
    "available",
    "make",
    "method_info",
    "register",
]
