"""Diagnostics: negative transfer against single-task baselines (Δm, per-task verdicts)."""

from .transfer import (
    DELTA_M_CONVENTION,
    TaskTransfer,
    TransferSummary,
    Verdict,
    compare_to_baselines,
    delta_m,
    relative_change,
    student_t_sf,
    verdict,
    welch_t_test,
)

__all__ = [
    "DELTA_M_CONVENTION",
    "TaskTransfer",
    "TransferSummary",
    "Verdict",
    "compare_to_baselines",
    "delta_m",
    "relative_change",
    "student_t_sf",
    "verdict",
    "welch_t_test",
]
