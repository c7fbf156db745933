"""Balancing methods, grouped by what they consume: ``losses/`` and ``gradients/``."""

from .base import Aggregation, Balancer, GradientBalancer, GradientStep, LossBalancer
from .registry import MethodInfo, available, make, method_info, register

__all__ = [
    "Aggregation",
    "Balancer",
    "GradientBalancer",
    "GradientStep",
    "LossBalancer",
    "MethodInfo",
    "available",
    "make",
    "method_info",
    "register",
]
